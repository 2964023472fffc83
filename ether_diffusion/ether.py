"""The ETHER math, applied to activations: a few vector ops per token, never a dense d×d matrix.

Every transform here has the form, per block i of size d/n (contiguous chunks, each normalised on its own):

    H_i = I + s · (−a · û_i û_iᵀ + b · v̂_i v̂_iᵀ)

ETHER   (Householder reflection):  a = 2, b = 0     → H = I − 2ûûᵀ
ETHER+  (the paper's relaxation):   a = 1, b = 1     → H⁺ = I − ûûᵀ + v̂v̂ᵀ
`s` is the strength: H_s = I + s·(H − I); s = 1 is the trained transform, s = 0 the identity.
What values in between mean differs by method. ETHER+ starts at the identity and H⁺_s has eigenvalues
1 ± s·|sin∠(u, v)| (and 1), so every s in [0, 1) is an invertible step of the trained deformation. ETHER's H_s
scales the û direction by 1 − 2s: it shrinks that direction for s < 0.5, erases it at s = 0.5 (H_s is then a
singular projection) and flips it for s > 0.5, reaching the trained reflection at s = 1. A reflection cannot be
reached continuously from I through orthogonal maps, so for ETHER only 0 (off) and values near 1 are meaningful.

Because each H_i is symmetric, "H x" for activations and "W H" for weight rows are the same operation,
so merging into weights reuses `apply_transform` on the rows (input side) or columns (output side) of W.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

METHODS = ("ether", "etherplus")
SIDES = ("input", "output", "both")
NORM_EPS = 1e-12


@dataclass(frozen=True)
class MethodSpec:
    """Coefficients of û ûᵀ and v̂ v̂ᵀ in H − I, and whether the method has a v vector at all."""

    a: float
    b: float
    has_v: bool


METHOD_SPECS = {"ether": MethodSpec(2.0, 0.0, False), "etherplus": MethodSpec(1.0, 1.0, True)}


def default_sides(method: str) -> str:
    """ETHER acts on the input (paper's default); ETHER+ on both sides (the paper's best, 0.666 vs 0.618 DINO)."""
    return "input" if method == "ether" else "both"


SWEEP_STRENGTHS = {
    "ether": (0.0, 0.7, 0.8, 0.9, 1.0, 1.1),  # off, then around the reflection, away from the singular s = 0.5
    "etherplus": (0.0, 0.25, 0.5, 0.75, 1.0, 1.25),
}


def check_method(method: str, n_blocks: int, sides: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    if sides not in SIDES:
        raise ValueError(f"unknown sides {sides!r}; choose one of: {', '.join(SIDES)}")
    if not isinstance(n_blocks, int) or n_blocks < 1:
        raise ValueError(f"n_blocks must be a positive integer, got {n_blocks!r}")


def unit_blocks(vector: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """Split a (..., d) vector into n contiguous blocks and normalise each: (..., n, d/n), in fp32 or wider.

    A zero block stays zero (its transform is then the identity), which is what per-sample routing uses for
    samples that take no adapter.
    """
    return unit_blocks_and_norms(vector, n_blocks)[0]


def unit_blocks_and_norms(vector: torch.Tensor, n_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`unit_blocks` and the blocks' norms (..., n, 1), which a hand-written backward pass needs."""
    v = vector.to(torch.promote_types(vector.dtype, torch.float32)).unflatten(-1, (n_blocks, vector.shape[-1] // n_blocks))
    norms = v.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
    return v / norms, norms


def apply_transform(
    x: torch.Tensor,
    u_hat: torch.Tensor,
    v_hat: torch.Tensor | None,
    spec: MethodSpec,
    strength: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """Return H_s x for activations x (..., d), with unit blocks û, v̂ of shape (n, d/n) or, routed, (B, n, d/n).

    Routed vectors carry a leading batch dimension B equal to x's first dimension; `strength` may then be a
    (B,) tensor. The work is O(d) per token whatever n is. The result keeps x's dtype.
    """
    dtype = x.dtype
    blocks = x.unflatten(-1, u_hat.shape[-2:])  # (..., n, d/n)
    routed = u_hat.dim() == 3
    if routed:  # broadcast (B, n, k) over x's middle dimensions
        view = (u_hat.shape[0],) + (1,) * (blocks.dim() - 3) + tuple(u_hat.shape[1:])
        u_hat = u_hat.reshape(view)
        v_hat = v_hat.reshape(view) if v_hat is not None else None
    if isinstance(strength, torch.Tensor):
        strength = strength.to(dtype).reshape((-1,) + (1,) * (blocks.dim() - 1))
    out = blocks
    for vec, coef in ((u_hat, -spec.a), (v_hat, spec.b)):
        if vec is None or not coef:
            continue
        vec = vec.to(dtype)
        if vec.shape[-2] == 1:  # one block: a (per-sample) matrix-vector product, no (tokens × d) temporary
            proj = (torch.einsum("b...k,bk->b...", x, vec.reshape(vec.shape[0], -1)) if routed
                    else x @ vec[0])[..., None, None]
        else:  # (..., n, 1); measured faster than einsum's batched matmul for n > 1
            proj = (blocks * vec).sum(-1, keepdim=True)
        out = torch.addcmul(out, proj * (coef * strength), vec)  # out + c·s·(ûᵀx)·û in one pass
    return out.flatten(-2)


def transform_weight(
    weight: torch.Tensor,
    side: str,
    u_hat: torch.Tensor,
    v_hat: torch.Tensor | None,
    spec: MethodSpec,
    strength: float = 1.0,
) -> torch.Tensor:
    """W H (side 'input') or H W (side 'output') for a torch weight W of shape (out, in), in W's dtype.

    Uses the symmetry of H: the rows of W H are H applied to the rows of W.
    """
    if side == "input":
        return apply_transform(weight, u_hat, v_hat, spec, strength)
    if side == "output":
        return apply_transform(weight.t(), u_hat, v_hat, spec, strength).t()
    raise ValueError(f"side must be 'input' or 'output', got {side!r}")


def dense_transform(
    u_hat: torch.Tensor, v_hat: torch.Tensor | None, spec: MethodSpec, strength: float = 1.0
) -> torch.Tensor:
    """The full d×d matrix H_s (for inspection and export only; the forward pass never builds it)."""
    n, k = u_hat.shape
    eye = torch.eye(n * k, dtype=u_hat.dtype, device=u_hat.device)
    return apply_transform(eye, u_hat, v_hat, spec, strength)
