"""ETHER trained as the low-rank weight update it is: the training fast path for an adapted Linear.

Why: per block, H − I = B diag(c) Bᵀ where B holds the unit vectors as columns (û, and v̂ for ETHER+) and
c = (−a·s, +b·s). So the adapted weight H_out W H_in differs from W by a matrix of rank m = n (ETHER, one side)
up to 4n (ETHER+, both sides):

    H_out (W H_in x) = W x + L (Aᵀ x),   A = [B_in | Wᵀ B_out],   L = [H_out W B_in D_in | B_out D_out].

The layer then trains like a LoRA of rank m: the base layer's own call on the raw input, one thin product to
(tokens × m), one back, and the function keeps only the input (which the layer before keeps anyway) and the
(tokens × m) projections. Applying the transforms instead passes over the activations three times per side and
keeps the layer output for the output-side vectors' gradients. Building A and L, and carrying their gradients
back to the vectors, takes products of W with the m columns (`low_rank_pays` says when that is worth it). One
autograd function does it all, because on small layers the number of recorded operations, not the arithmetic,
sets the step time.
"""

from __future__ import annotations

import contextlib
from functools import lru_cache

import torch

from .ether import MethodSpec, unit_blocks_and_norms

MAX_RANK_SHARE = 8  # the update's rank m must stay ≤ min(d_in, d_out) / 8, or the applied transforms are cheaper
SMALL_WEIGHT = 256 * 256  # below this, per-operation overhead, not arithmetic, sets a layer's cost


def low_rank_pays(rank: int, tokens: int, d_in: int, d_out: int) -> bool:
    """Whether training as a low-rank update beats applying the transforms to the activations.

    Both make about the same thin passes over the activations. The low-rank form needs fewer operations and
    does not keep the layer output, but builds A and L (and their gradients) from four products with W, each
    reading the whole weight. On small weights the fewer operations win whatever the token count; on large
    ones the products must be repaid by enough tokens (batch × positions): at least a quarter of the layer's
    narrower width (SD-1.5 at 512 px, batch 1: the 64×64 and 32×32 levels, not the 16×16 and 8×8 ones or the
    77-token text keys and values).
    """
    if rank * MAX_RANK_SHARE > min(d_in, d_out):
        return False
    return d_in * d_out <= SMALL_WEIGHT or 4 * tokens >= min(d_in, d_out)


def column_coefficients(a: float, b: float, strength: float, n: int, kinds: int, dtype: torch.dtype,
                        device: torch.device) -> torch.Tensor:
    """c as a (m,) tensor: −a·s for the n û columns, +b·s for the n v̂ columns; made once per setting in eager
    mode (no host-to-device copy per call), and as a graph constant under `torch.compile`."""
    if torch.compiler.is_compiling():
        return _column_coefficients.__wrapped__(a, b, strength, n, kinds, dtype, device)
    return _column_coefficients(a, b, strength, n, kinds, dtype, device)


@lru_cache(maxsize=64)
def _column_coefficients(a: float, b: float, strength: float, n: int, kinds: int, dtype: torch.dtype,
                         device: torch.device) -> torch.Tensor:
    values = [-a * strength] * n + [b * strength] * n * (kinds - 1)
    return torch.tensor(values, dtype=dtype, device=device)


def unit_columns(vectors: tuple, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One side's raw vectors (d,) → (unit blocks (kinds, n, k) and their norms (kinds, n, 1), in fp32 or wider;
    B (d, kinds·n) in `dtype`: column l of kind κ holds that vector's unit block l in the rows of block l)."""
    unit, norms = unit_blocks_and_norms(torch.stack(vectors), n)
    kinds, n, k = unit.shape
    if n == 1:
        columns = unit.view(kinds, k).t()
    else:
        eye = torch.eye(n, dtype=unit.dtype, device=unit.device)
        columns = (unit[..., None] * eye[None, :, None, :]).permute(1, 2, 0, 3).reshape(n * k, kinds * n)
    return unit, norms, columns if columns.dtype == dtype else columns.to(dtype)


def raw_gradients(grad_columns: torch.Tensor, unit: torch.Tensor, norms: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """dL/dB (d, m) → dL/d(raw vector) (d,) per kind: each block's entries of B, then back through the norm."""
    kinds, n, k = unit.shape
    if n == 1:
        grad_unit = grad_columns.t().reshape(kinds, 1, k)
    else:
        grad_unit = grad_columns.reshape(n, k, kinds, n).diagonal(dim1=0, dim2=3).permute(1, 2, 0)
    grad_unit = grad_unit.to(unit.dtype)
    radial = (grad_unit * unit).sum(-1, keepdim=True)
    return torch.addcmul(grad_unit, unit, radial, value=-1).div_(norms).view(kinds, n * k).unbind(0)


def low_rank_factors(w: torch.Tensor, c_in: torch.Tensor | None, c_out: torch.Tensor | None, n: int, n_in: int,
                     raw: tuple) -> tuple:
    """A, L (W' − W = L Aᵀ) in W's dtype, with what their gradients need: W B_in, B_in, B_out and the unit
    blocks and norms (one pair for both sides of a square layer, whose vectors are normalised together)."""
    if c_in is not None and c_out is not None and w.shape[0] == w.shape[1]:
        unit, norms, columns = unit_columns(raw, n, w.dtype)  # fewer (not smaller) operations
        b_in, b_out, units = columns[:, :n_in * n], columns[:, n_in * n:], (unit, norms, None, None)
    else:
        side_in = unit_columns(raw[:n_in], n, w.dtype) if c_in is not None else (None,) * 3
        side_out = unit_columns(raw[n_in:], n, w.dtype) if c_out is not None else (None,) * 3
        b_in, b_out, units = side_in[2], side_out[2], (*side_in[:2], *side_out[:2])
    w_b = w @ b_in if b_in is not None else None
    if b_out is None:
        return b_in, w_b * c_in, w_b, b_in, b_out, units
    if b_in is None:
        return w.t() @ b_out, b_out * c_out, w_b, b_in, b_out, units
    h_w_b = torch.addmm(w_b, b_out, (b_out.t() @ w_b) * c_out[:, None])  # H_out W B_in
    a = torch.cat([b_in, w.t() @ b_out], dim=1)
    return a, torch.cat([h_w_b * c_in, b_out * c_out], dim=1), w_b, b_in, b_out, units


class _LowRankEther(torch.autograd.Function):
    """out = base(x) + (x A) Lᵀ for 2-D x (tokens × features), A and L built from the vectors as above.

    After the fixed inputs come the raw vectors (u, then v for ETHER+) of the input side, `n_in` of them, then
    those of the output side; `c_in` / `c_out` are the sides' column coefficients (None: no such side).
    """

    @staticmethod
    def forward(ctx, x, weight, base, c_in, c_out, n, n_in, *raw):
        y = base(x)  # the wrapped layer itself, under the caller's autocast if there is one
        with torch.autocast(x.device.type, enabled=False) if torch.is_autocast_enabled(x.device.type) \
                else contextlib.nullcontext():
            a, l, w_b, b_in, b_out, units = low_rank_factors(weight, c_in, c_out, n, n_in, raw)
            q = x.to(y.dtype) @ a.to(y.dtype)
            out = torch.addmm(y, q, l.to(y.dtype).t())
        ctx.save_for_backward(x, weight, q, a, l, w_b, b_in, b_out, c_in, c_out, *units)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, w, q, a, l, w_b, b_in, b_out, c_in, c_out, unit, norms, unit_out, norms_out = ctx.saved_tensors
        grad = grad.contiguous()  # in the output's dtype (autocast's, if any); the factors stay in W's
        r = grad @ l.to(grad.dtype)
        grad_x = torch.addmm(grad @ w.to(grad.dtype), r, a.to(grad.dtype).t()) if ctx.needs_input_grad[0] else None
        grad_a, grad_l = (x.to(grad.dtype).t() @ r).to(w.dtype), (grad.t() @ q).to(w.dtype)
        if b_out is None:
            raw = raw_gradients(torch.addmm(grad_a, w.t(), grad_l * c_in), unit, norms)
        elif b_in is None:
            raw = raw_gradients(torch.addmm(grad_l * c_out, w, grad_a), unit_out, norms_out)
        else:
            m_in = b_in.shape[1]
            e = grad_l[:, :m_in] * c_in  # dL/d(H_out W B_in)
            grad_w_b = torch.addmm(e, b_out, (b_out.t() @ e) * c_out[:, None])  # H_out e (H symmetric)
            grad_b_in = torch.addmm(grad_a[:, :m_in], w.t(), grad_w_b)
            # B_out enters A (Wᵀ B_out), L's right half (B_out D_out) and H_out = I + B_out D_out B_outᵀ
            cross = torch.addmm(e @ (w_b.t() @ b_out), w_b, e.t() @ b_out)
            grad_b_out = torch.addmm((grad_l[:, m_in:] + cross) * c_out, w, grad_a[:, m_in:])
            if unit_out is None:
                raw = raw_gradients(torch.cat([grad_b_in, grad_b_out], dim=1), unit, norms)
            else:
                raw = raw_gradients(grad_b_in, unit, norms) + raw_gradients(grad_b_out, unit_out, norms_out)
        return (grad_x, None, None, None, None, None, None, *raw)


def low_rank_linear(x: torch.Tensor, base: torch.nn.Linear, spec: MethodSpec, strength: float, n_blocks: int,
                    input_vectors: list[torch.Tensor], output_vectors: list[torch.Tensor]) -> torch.Tensor:
    """A one-adapter ETHER Linear on x (..., in) as base(x) plus its low-rank correction; the vectors are the raw
    (u[, v]) of each side (an empty list: no transform on that side)."""
    w = base.weight
    coefs = [column_coefficients(spec.a, spec.b, float(strength), n_blocks, len(vectors), w.dtype, w.device)
             if vectors else None for vectors in (input_vectors, output_vectors)]
    flat = x.reshape(-1, x.shape[-1])
    out = _LowRankEther.apply(flat, base.weight, base, *coefs, n_blocks, len(input_vectors),
                              *input_vectors, *output_vectors)
    return out.view(*x.shape[:-1], out.shape[-1])
