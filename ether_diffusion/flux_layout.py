"""FLUX.1's original (Black Forest Labs) checkpoint layout, the one ComfyUI, Forge and kohya's FLUX LoRAs use.

diffusers splits what BFL stores as one fused weight: a double block's `img_attn.qkv` is diffusers' `attn.to_q`,
`attn.to_k` and `attn.to_v` stacked row-wise, and a single block's `linear1` is `[to_q; to_k; to_v; proj_mlp]`.
The layers that share a fused weight also share its input, so per-layer LoRA factors (up_i, down_i) combine
exactly into one LoRA on the fused weight: down is the row-wise concatenation of the down_i, up is block-diagonal
(part i's rows of the fused output read only part i's rank columns). Parts without an adapter get zero rows.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .errors import EtherError
from .layers import EtherLayer

# BFL module inside a block → the diffusers modules (same block) stacked in its weight, in order
DOUBLE_BLOCK_PARTS = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
}
SINGLE_BLOCK_PARTS = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
}
_BLOCKS = {"transformer_blocks": ("double_blocks", DOUBLE_BLOCK_PARTS),
           "single_transformer_blocks": ("single_blocks", SINGLE_BLOCK_PARTS)}


def bfl_target(layer_name: str) -> tuple[str, str, int] | None:
    """A diffusers FLUX transformer layer → (BFL module, diffusers block prefix, part index in the fused weight);
    None for a layer the BFL layout has no LoRA target for (embedders, norms, the final projection)."""
    match = re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", layer_name)
    if match is None:
        return None
    kind, index, rest = match.groups()
    bfl_kind, parts = _BLOCKS[kind]
    for bfl, names in parts.items():
        if rest in names:
            return f"{bfl_kind}.{index}.{bfl}", f"{kind}.{index}", names.index(rest)
    return None


def _out_features(model: nn.Module, name: str) -> int:
    module = model.get_submodule(name)
    return (module.base if isinstance(module, EtherLayer) else module).out_features


def fused_factors(transformer: nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
                  ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (up, down) of a diffusers FLUX transformer → (up, down) per BFL module, exactly."""
    grouped: dict[str, tuple[str, dict[int, tuple[torch.Tensor, torch.Tensor]]]] = {}
    for layer_name, pair in factors.items():
        target = bfl_target(layer_name)
        if target is None:
            raise EtherError(f"layer {layer_name} has no place in FLUX's original (BFL) layout; export this adapter "
                             "with --to lora (diffusers keys)")
        bfl, prefix, part = target
        grouped.setdefault(bfl, (prefix, {}))[1][part] = pair
    out = {}
    for bfl, (prefix, parts) in grouped.items():
        names = (DOUBLE_BLOCK_PARTS if bfl.startswith("double") else SINGLE_BLOCK_PARTS)[bfl.split(".", 2)[2]]
        sizes = [_out_features(transformer, f"{prefix}.{n}") for n in names]
        ranks = {i: up.shape[1] for i, (up, _) in parts.items()}
        up = torch.zeros(sum(sizes), sum(ranks.values()), dtype=next(iter(parts.values()))[0].dtype)
        downs, row, col = [], 0, 0
        for i, size in enumerate(sizes):
            if i in parts:
                part_up, part_down = parts[i]
                up[row : row + size, col : col + ranks[i]] = part_up
                downs.append(part_down)
                col += ranks[i]
            row += size
        out[bfl] = (up, torch.cat(downs))
    return out
