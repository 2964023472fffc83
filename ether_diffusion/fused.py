"""ETHER trained as the low-rank weight update it is: the training fast path for an adapted Linear.

Why: per block, H − I = B diag(c) Bᵀ where B holds the unit vectors as columns (û, and v̂ for ETHER+) and
c = (−a·s, +b·s). So the adapted weight H_out W H_in differs from W by a matrix of rank m = n (ETHER, one side)
up to 4n (ETHER+, both sides):

    H_out (W H_in x) = W x + L (Aᵀ x),   A = [B_in | Wᵀ B_out],   L = [H_out W B_in D_in | B_out D_out].

The layer then trains like a LoRA of rank m: the base layer's own call on the raw input, one thin product to
(tokens × m), one back, and the function keeps only the input (which the layer before keeps anyway) and the
(tokens × m) projections. Applying the transforms instead passes over the activations three times per side and
keeps the layer output for the output-side vectors' gradients. Building A and L, and carrying their gradients
back to the vectors, takes products of W with the m columns (`low_rank_pays` says when that is worth it). Two
autograd functions with hand-written backward passes do it, because on small layers the number of operations,
not the arithmetic, sets the step time: `_LowRankFactors` builds A and L for one layer, or for a whole group of
layers of one shape at once (`low_rank_groups.py`), and `_LowRankApply` runs each layer with its own.
"""

from __future__ import annotations

import contextlib
from functools import lru_cache

import torch

from .ether import MethodSpec, unit_blocks_and_norms

MAX_RANK_SHARE = 8  # the update's rank m must stay ≤ min(d_in, d_out) / 8, or the applied transforms are cheaper
SMALL_WEIGHT = 256 * 256  # below this, per-operation overhead, not arithmetic, sets a layer's cost


def low_rank_pays(rank: int, tokens: int | None, d_in: int, d_out: int) -> bool:
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
    return d_in * d_out <= SMALL_WEIGHT or (tokens is not None and 4 * tokens >= min(d_in, d_out))


def column_coefficients(a: float, b: float, strength: float, n: int, kinds: int, sides: int, dtype: torch.dtype,
                        device: torch.device) -> torch.Tensor:
    """c as a (m,) tensor, per side: −a·s for the n û columns, +b·s for the n v̂ columns; made once per setting
    in eager mode (no host-to-device copy per call), and as a graph constant under `torch.compile`."""
    if torch.compiler.is_compiling():
        return _column_coefficients.__wrapped__(a, b, strength, n, kinds, sides, dtype, device)
    return _column_coefficients(a, b, strength, n, kinds, sides, dtype, device)


@lru_cache(maxsize=64)
def _column_coefficients(a: float, b: float, strength: float, n: int, kinds: int, sides: int, dtype: torch.dtype,
                         device: torch.device) -> torch.Tensor:
    values = ([-a * strength] * n + [b * strength] * n * (kinds - 1)) * sides
    return torch.tensor(values, dtype=dtype, device=device)


def unit_columns(stack: torch.Tensor, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw vectors (G, K, d) → unit blocks (G, K, n, k) and their norms (G, K, n, 1), in fp32 or wider, and
    B (G, d, K·n) in `dtype`: column κ·n + l holds vector κ's unit block l in the rows of block l."""
    unit, norms = unit_blocks_and_norms(stack, n)
    g, kinds, n, k = unit.shape
    if n == 1:
        columns = unit.view(g, kinds, k).transpose(1, 2)
    else:
        eye = torch.eye(n, dtype=unit.dtype, device=unit.device)
        columns = (unit[..., None] * eye[:, None, :]).permute(0, 2, 3, 1, 4).reshape(g, n * k, kinds * n)
    return unit, norms, columns if columns.dtype == dtype else columns.to(dtype)


def raw_gradients(grad_columns: torch.Tensor, unit: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """dL/dB (G, d, m) → dL/d(raw vectors) (G, K, d): each block's entries of B, then back through the norm."""
    g, kinds, n, k = unit.shape
    if n == 1:
        grad_unit = grad_columns.transpose(1, 2).reshape(g, kinds, 1, k)
    else:
        grad_unit = grad_columns.reshape(g, n, k, kinds, n).diagonal(dim1=1, dim2=4).permute(0, 2, 3, 1)
    grad_unit = grad_unit.to(unit.dtype)
    radial = (grad_unit * unit).sum(-1, keepdim=True)
    return torch.addcmul(grad_unit, unit, radial, value=-1).div_(norms).view(g, kinds, n * k)


def full_precision(device: torch.device):
    """Autocast off where it is on: the factors are built, and their gradients carried back, in W's dtype."""
    on = torch.is_autocast_enabled(device.type)
    return torch.autocast(device.type, enabled=False) if on else contextlib.nullcontext()


class _LowRankFactors(torch.autograd.Function):
    """A (G, d_in, m) and L (G, d_out, m), W' − W = L Aᵀ, for G layers of one shape and setting at once.

    Inputs: the G weights (a list: their products are taken layer by layer, so the weights are never copied
    into one tensor); the coefficients c of all columns (input side first); n; the number
    of input-side columns m_in (0: no input side; m_in = m: no output side); then the raw vectors as stacks
    (G, K, d): one for both sides of a square layer (normalised together: fewer operations), else one per side.
    With B_in = P, B_out = Q, their columns scaled by c as Pc, Qc, and V = W Pc:
        A = [P | Wᵀ Q],   L = [V + Qc (Qᵀ V) | Qc]     (V + Qc Qᵀ V = H_out W B_in D_in).
    """

    @staticmethod
    def forward(ctx, weights, coefs, n, m_in, *stacks):
        with full_precision(coefs.device):
            return _LowRankFactors._build(ctx, weights, coefs, n, m_in, stacks)

    @staticmethod
    def _build(ctx, weights, coefs, n, m_in, stacks):
        sides = [unit_columns(stack, n, weights[0].dtype) for stack in stacks]
        if len(sides) == 1:  # one side, or both sides of a square layer
            columns = sides[0][2]
            scaled = columns * coefs
            p, q, pc, qc = columns[..., :m_in], columns[..., m_in:], scaled[..., :m_in], scaled[..., m_in:]
        else:
            p, q = sides[0][2], sides[1][2]
            pc, qc = p * coefs[:m_in], q * coefs[m_in:]
        v = weight_products(weights, pc) if m_in else None
        if not q.shape[-1]:
            a, l = p, v
        elif not m_in:
            a, l = weight_products(weights, q, transposed=True), qc
        else:
            a = torch.cat([p, weight_products(weights, q, transposed=True)], dim=2)
            l = torch.cat([v + qc @ (q.transpose(1, 2) @ v), qc], dim=2)
        ctx.weights, ctx.n_sides, ctx.m_in = weights, len(sides), m_in
        ctx.save_for_backward(coefs, p, q, qc, v, *(t for side in sides for t in side[:2]))
        return a, l

    @staticmethod
    def backward(ctx, grad_a, grad_l):
        with full_precision(grad_a.device):
            return _LowRankFactors._carry_back(ctx, grad_a, grad_l)

    @staticmethod
    def _carry_back(ctx, grad_a, grad_l):
        coefs, p, q, qc, v, *units = ctx.saved_tensors
        weights, m_in = ctx.weights, ctx.m_in
        grad_a, grad_l = grad_a.to(coefs.dtype), grad_l.to(coefs.dtype)
        if not q.shape[-1]:  # L = W P C
            grad_p, grad_q = grad_a + weight_products(weights, grad_l * coefs, transposed=True), None
        elif not m_in:  # A = Wᵀ Q, L = Q C
            grad_p, grad_q = None, grad_l * coefs + weight_products(weights, grad_a)
        else:
            g_l1, c_in, c_out = grad_l[..., :m_in], coefs[:m_in], coefs[m_in:]
            e = g_l1 * c_in
            grad_p = grad_a[..., :m_in] + weight_products(weights, e + qc @ (q.transpose(1, 2) @ e),
                                                          transposed=True)  # Wᵀ H_out e
            # Q enters A (Wᵀ Q), L's right half (Qc) and H_out = I + Q C Qᵀ
            cross = g_l1 @ (v.transpose(1, 2) @ q) + v @ (g_l1.transpose(1, 2) @ q)
            grad_q = (grad_l[..., m_in:] + cross) * c_out + weight_products(weights, grad_a[..., m_in:])
        if ctx.n_sides == 2:
            grads = (raw_gradients(grad_p, *units[:2]), raw_gradients(grad_q, *units[2:]))
        else:
            present = [g for g in (grad_p, grad_q) if g is not None]
            grads = (raw_gradients(present[0] if len(present) == 1 else torch.cat(present, dim=2), *units),)
        return (None, None, None, None, *grads)


def weight_products(weights: list[torch.Tensor], x: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """W_g x_g (or W_gᵀ x_g) for each of the G layers: (G, ·, m) from x (G, ·, m).

    Taken as (x_gᵀ W_gᵀ)ᵀ, the m thin columns as rows on the left: measured on one CPU thread, 2.5× faster than
    W_g x_g at 640 and 1280 wide (60 against 153 µs, 326 against 688 µs), the same arithmetic and one read of W.
    """
    rows = x.transpose(1, 2)
    return torch.stack([r @ (w if transposed else w.t()) for w, r in zip(weights, rows.unbind(0))]).transpose(1, 2)


def low_rank_factors(weights: list[torch.Tensor], spec: MethodSpec, strength: float, n_blocks: int,
                     input_vectors: list[torch.Tensor], output_vectors: list[torch.Tensor]) -> tuple:
    """A (G, d_in, m), L (G, d_out, m) for G layers of one shape (weights: their G (d_out, d_in) weights); the
    vectors are each side's raw (u[, v]) of every layer, layer-major (an empty list: no transform on that side)."""
    g, (d_out, d_in) = len(weights), weights[0].shape
    sides = [vectors for vectors in (input_vectors, output_vectors) if vectors]
    kinds = len(sides[0]) // g
    coefs = column_coefficients(spec.a, spec.b, float(strength), n_blocks, kinds, len(sides), weights[0].dtype,
                                weights[0].device)
    if len(sides) == 2 and d_in == d_out:  # per layer: its input-side vectors, then its output-side ones
        stacks = [torch.stack([v for i in range(g) for side in sides for v in side[i * kinds:(i + 1) * kinds]])
                  .view(g, 2 * kinds, d_in)]
    else:
        stacks = [torch.stack(vectors).view(g, kinds, -1) for vectors in sides]
    m_in = n_blocks * kinds if input_vectors else 0
    return _LowRankFactors.apply(weights, coefs, n_blocks, m_in, *stacks)


class _LowRankApply(torch.autograd.Function):
    """out = base(x) + (x A) Lᵀ for 2-D x (tokens × features): the base layer's own call, one thin product to
    (tokens × m) and one back; keeps the input and the (tokens × m) projection, never the output."""

    @staticmethod
    def forward(ctx, x, weight, base, a, l):
        y = base(x)  # the wrapped layer itself, under the caller's autocast if there is one
        with full_precision(x.device):
            q = x.to(y.dtype) @ a.to(y.dtype)
            out = torch.addmm(y, q, l.to(y.dtype).t())
        ctx.save_for_backward(x, weight, q, a, l)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, w, q, a, l = ctx.saved_tensors
        grad = grad.contiguous()  # in the output's dtype (autocast's, if any); the factors stay in W's
        r = grad @ l.to(grad.dtype)
        grad_x = torch.addmm(grad @ w.to(grad.dtype), r, a.to(grad.dtype).t()) if ctx.needs_input_grad[0] else None
        # xᵀ r as (rᵀ x)ᵀ: the thin side on the left reads the activations in their own layout (on one CPU thread
        # 2–4× faster than with the activations transposed, as nn.Linear's own weight gradient is taken)
        grad_a = (r.t() @ x.to(grad.dtype)).t().to(w.dtype)
        return grad_x, None, None, grad_a, (q.t() @ grad).t().to(w.dtype)


def apply_low_rank(x: torch.Tensor, base: torch.nn.Linear, a: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """base(x) + (x A) Lᵀ on x (..., in), with one layer's A (in, m) and L (out, m)."""
    flat = x.reshape(-1, x.shape[-1])
    out = _LowRankApply.apply(flat, base.weight, base, a, l)
    return out.view(*x.shape[:-1], out.shape[-1])


def low_rank_linear(x: torch.Tensor, base: torch.nn.Linear, spec: MethodSpec, strength: float, n_blocks: int,
                    input_vectors: list[torch.Tensor], output_vectors: list[torch.Tensor]) -> torch.Tensor:
    """A one-adapter ETHER Linear on x (..., in) as base(x) plus its low-rank correction; the vectors are the raw
    (u[, v]) of each side (an empty list: no transform on that side)."""
    a, l = low_rank_factors([base.weight], spec, strength, n_blocks, input_vectors, output_vectors)
    return apply_low_rank(x, base, a[0], l[0])
