"""Exact export of ETHER adapters as LoRA files (diffusers/PEFT keys, kohya keys; FLUX.1 in the BFL layout) and as
merged pipelines.

The update an adapter makes to a weight, ΔW = H_out·W·H_in − W, has low rank: its columns lie in the span of the
output-side vectors and of W times the input-side vectors (rank ≤ n per ETHER side, 2n per ETHER+ side). So
ΔW = up · down with no approximation: we build an orthonormal basis Q of that span (fp64 QR), project
ΔW onto it, and keep the numerically non-zero singular directions of the small projected matrix. The rank
written per layer is the exact rank of that layer's update; LoRA scale is 1 (alpha = rank).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save

from . import bases, control, flux_layout, inject
from .atomic import atomic_write_bytes
from .errors import EtherError
from .ether import unit_blocks
from .layers import EtherLayer
from .naming import canonical_layer_name, kohya_key
from .pipelines import pipeline_components

RANK_TOLERANCE = 1e-10  # singular values below this fraction (of the largest, or of ‖W‖) are fp64 round-off


def _padded_directions(units: torch.Tensor) -> torch.Tensor:
    """Unit blocks (n, k) → their n directions as zero-padded full vectors: (n·k, n)."""
    n, k = units.shape
    full = torch.zeros(n * k, n, dtype=units.dtype)
    for i in range(n):
        full[i * k : (i + 1) * k, i] = units[i]
    return full


def lora_factors(layer: EtherLayer, strengths: dict[str, float]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(up, down) in fp64 with up @ down == merged − base weight (torch layout); None when the update is zero."""
    weight = layer.weight_2d().detach().double()
    delta = layer.merged_weight(strengths, torch.float64) - weight
    spans = []
    for name in strengths:
        adapter = layer.ether_adapters[name]
        for vec_name, p in adapter.vectors.items():
            units = _padded_directions(unit_blocks(p.detach().double(), adapter.config.n_blocks))
            spans.append(weight @ units if vec_name.endswith("input") else units)
    basis, _ = torch.linalg.qr(torch.cat(spans, dim=1))
    projected = basis.T @ delta  # (K, in): exact because delta's columns lie in span(basis)
    u, s, vh = torch.linalg.svd(projected, full_matrices=False)
    if s.numel() == 0 or s[0] <= RANK_TOLERANCE * torch.linalg.matrix_norm(weight):  # fp64 round-off only
        return None
    rank = int((s > s[0] * RANK_TOLERANCE).sum())
    root = s[:rank].sqrt()
    return (basis @ u[:, :rank]) * root, root[:, None] * vh[:rank]


def _all_factors(pipe) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, EtherLayer]]]:
    """component → layer name → (up, down, layer) for the pipeline's active adapters."""
    out: dict[str, dict] = {}
    for comp, model in pipeline_components(pipe).items():
        for layer_name, layer in inject.ether_layers(model):
            if not layer.enabled or not layer.active:
                continue
            factors = lora_factors(layer, layer.active)
            if factors is not None:
                out.setdefault(comp, {})[layer_name] = (*factors, layer)
    if not out:
        raise EtherError("the active adapters change no weight (strength 0 or identity); nothing to export")
    return out


def _shaped(up: torch.Tensor, down: torch.Tensor, layer: EtherLayer, dtype: torch.dtype):
    if layer.is_conv:
        return up[:, :, None, None].to(dtype).contiguous(), down[:, :, None, None].to(dtype).contiguous()
    return up.to(dtype).contiguous(), down.to(dtype).contiguous()


def lora_key_names(comp: str, layer_name: str, style: str, sdxl: bool) -> tuple[str, str, str | None]:
    """(down, up, alpha) tensor keys of one adapted layer: 'diffusers' (PEFT keys, alpha implied) or 'kohya'
    (A1111 / ComfyUI keys), always under the canonical layer name (see `naming`)."""
    name = canonical_layer_name(comp, layer_name)
    if style == "diffusers":
        return f"{comp}.{name}.lora_A.weight", f"{comp}.{name}.lora_B.weight", None
    if style == "kohya":
        key = kohya_key(comp, name, sdxl)
        return f"{key}.lora_down.weight", f"{key}.lora_up.weight", f"{key}.alpha"
    raise EtherError(f"unknown LoRA style {style!r}; use diffusers or kohya")


def lora_state_dict(pipe, style: str = "diffusers", dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The active adapters of `pipe` as LoRA tensors: 'diffusers' (PEFT keys) or 'kohya' (A1111 / ComfyUI keys;
    on FLUX.1 the original BFL layout with fused q/k/v, see `flux_layout`)."""
    family = bases.family(pipe).name
    if style == "kohya" and family == "sd3":
        raise EtherError("--to kohya has no SD3 layout; use --to lora (diffusers keys, which diffusers' "
                         "load_lora_weights and ComfyUI read)")
    factors = _all_factors(pipe)
    sdxl = family == "flux" or bases.is_sdxl(pipe)  # kohya's lora_te1_ / lora_te2_ CLIP keys
    tensors: dict[str, torch.Tensor] = {}

    def put(down_key: str, up_key: str, alpha_key: str | None, up: torch.Tensor, down: torch.Tensor) -> None:
        tensors[down_key], tensors[up_key] = down, up
        if alpha_key:
            tensors[alpha_key] = torch.tensor(float(down.shape[0]), dtype=dtype)  # alpha = rank: scale 1

    for comp, layers in factors.items():
        if style == "kohya" and family == "flux" and comp == "transformer":
            fused = flux_layout.fused_factors(pipe.transformer, {n: (u, d) for n, (u, d, _) in layers.items()})
            for bfl, (up, down) in fused.items():
                key = "lora_unet_" + bfl.replace(".", "_")
                put(f"{key}.lora_down.weight", f"{key}.lora_up.weight", f"{key}.alpha", up.to(dtype).contiguous(),
                    down.to(dtype).contiguous())
            continue
        for layer_name, (up, down, layer) in layers.items():
            up, down = _shaped(up, down, layer, dtype)
            put(*lora_key_names(comp, layer_name, style, sdxl), up, down)
    return tensors


def export_lora(pipe, out: str | Path, style: str = "diffusers", dtype: torch.dtype = torch.float32,
                source: dict | None = None) -> dict:
    """Write the active adapters as a LoRA file; return {'path', 'ranks', 'bytes'}."""
    tensors = lora_state_dict(pipe, style, dtype)
    ranks = sorted({int(v.shape[0]) for k, v in tensors.items() if k.endswith(("lora_A.weight", "lora_down.weight"))})
    meta = {"format": "pt", "exported_from": "ether-diffusion", "ether_source": json.dumps(source or {})}
    path = atomic_write_bytes(out, save(tensors, metadata=meta))
    return {"path": path, "ranks": ranks, "bytes": path.stat().st_size}


ENCODER_USAGE = {  # what an exported control encoder's file says it is and where its output goes
    "conv_in": {"class": "diffusers.models.controlnets.controlnet.ControlNetConditioningEmbedding",
                "usage": "add encoder(control image as RGB in [0, 1] at the generation size) to unet.conv_in's output"},
    "multiscale": {"class": "ether_diffusion.control.MultiScaleControlEncoder",
                   "usage": "pass encoder(control image as RGB in [0, 1] at the generation size), a list with one "
                            "tensor per down block, as the UNet's down_intrablock_additional_residuals"},
}


def export_control_encoders(pipe, out: str | Path) -> list[Path]:
    """Write each active control encoder beside the export, its strength baked into the last (linear) conv.

    A LoRA or merged UNet cannot carry the encoder, so it travels as its own file: the state dict of diffusers'
    `ControlNetConditioningEmbedding` with its config in the metadata; add its output on the control image
    (RGB in [0, 1], generation size) to `unet.conv_in`'s output. A multiscale encoder's file holds
    `ether_diffusion.control.MultiScaleControlEncoder`; its outputs go to the UNet as
    `down_intrablock_additional_residuals`. Returns the paths written.
    """
    denoiser = bases.denoiser(pipe)
    state = control.control_encoders(denoiser)
    strengths = {n: s for n, s in control.control_strengths(denoiser).items() if s}
    out = Path(out)
    paths = []
    for name, strength in strengths.items():
        encoder, kind, config = state[name], control.control_kinds(denoiser)[name], control.encoder_config_of(state[name])
        tensors = {k: v.detach().to("cpu", torch.float32).clone() for k, v in encoder.state_dict().items()}
        for key in control.output_parameter_names(encoder):
            tensors[key] *= strength
        suffix = f".{name}.control_encoder.safetensors" if len(strengths) > 1 else ".control_encoder.safetensors"
        path = out / suffix.lstrip(".") if out.is_dir() or not out.suffix else out.with_name(out.stem + suffix)
        meta = {"format": "pt", "config": json.dumps(config), "control_kind": kind, **ENCODER_USAGE[control.injection_of(encoder)]}
        paths.append(atomic_write_bytes(path, save(tensors, metadata=meta)))
    return paths


def export_merged(pipe, out: str | Path, single_file_unet: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Save the whole pipeline with the active adapters fused, as plain diffusers (no trace of this package),
    cast to `dtype` after fusing when given."""
    for model in pipeline_components(pipe).values():
        inject.fuse_and_unload(model)
    if dtype is not None:
        pipe.to(dtype)
    out = Path(out)
    if single_file_unet:
        tensors = {k: v.contiguous() for k, v in bases.denoiser(pipe).state_dict().items()}
        return atomic_write_bytes(out, save(tensors, metadata={"format": "pt"}))
    pipe.save_pretrained(out)
    return out
