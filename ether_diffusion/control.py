"""Control-signal encoders: a control image (segmentation map, edges, …) steers a frozen UNet.

The paper's setting (injection `conv_in`): ControlNet's small "hint" encoder (diffusers'
`ControlNetConditioningEmbedding`, last convolution zero-initialised) turns the control image into features of the
UNet's first width, which are added once to the output of `unet.conv_in`. There is no trainable UNet copy; ETHER
adapters on the frozen UNet learn to use the added features.

Injection `multiscale` (T2I-Adapter's entry points): the same hint encoder as a trunk, its features pooled to every
down block's resolution and projected (zero-initialised 1×1 convolutions) to that block's width, handed to the UNet
as diffusers' `down_intrablock_additional_residuals`, so the map reaches the coarse levels where the layout is
decided without travelling through the fine ones.

Encoders are attached with forward hooks, so diffusers' code is never edited and any UNet2DConditionModel
(SD 1.x, 2.x, SDXL) works.

An attached encoder belongs to an adapter name and has a strength, set together with the adapter's ETHER
strength by `pipelines.set_ether_adapters` (0 = off); its output is multiplied by that strength and by the
conditioning scale of the current control image. An adapter may be an encoder alone (no ETHER vectors).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from .errors import EtherError

ENCODER_CHANNELS = (16, 32, 96, 256)  # ControlNet's hint encoder widths, one stride-2 stage between each
CONTROL_KINDS = ("segmentation", "edges", "depth", "pose", "other")
INJECTIONS = ("conv_in", "multiscale")


def down_block_factors(unet: nn.Module) -> list[int]:
    """Per down block, how many times smaller than the latents the residual diffusers adds there is: a
    cross-attention block takes it before its downsampler, any other block after it."""
    factors, factor = [], 1
    for block in unet.down_blocks:
        halves = getattr(block, "downsamplers", None) is not None
        factors.append(factor * 2 if halves and not getattr(block, "has_cross_attention", False) else factor)
        factor *= 2 if halves else 1
    return factors


def encoder_config(unet: nn.Module, vae_scale_factor: int, injection: str = "conv_in") -> dict:
    """The encoder that fits a UNet: trunk width = the UNet's first block width, one halving per VAE halving;
    `multiscale` adds each down block's width and scale."""
    levels = int(round(math.log2(vae_scale_factor)))
    if 2**levels != vae_scale_factor or not 1 <= levels <= 3:
        raise EtherError(f"control encoders need a VAE scale factor of 2, 4 or 8, got {vae_scale_factor}")
    if injection not in INJECTIONS:
        raise EtherError(f"control injection must be one of {', '.join(INJECTIONS)}, got {injection!r}")
    config = {"conditioning_embedding_channels": int(unet.config.block_out_channels[0]),
              "conditioning_channels": 3,
              "block_out_channels": list(ENCODER_CHANNELS[: levels + 1])}
    if injection == "multiscale":
        config.update(injection="multiscale", level_channels=[int(c) for c in unet.config.block_out_channels],
                      level_factors=down_block_factors(unet))
    return config


def _hint_encoder(config: dict) -> nn.Module:
    from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding

    return ControlNetConditioningEmbedding(
        conditioning_embedding_channels=config["conditioning_embedding_channels"],
        conditioning_channels=config.get("conditioning_channels", 3),
        block_out_channels=tuple(config["block_out_channels"]),
    )


class MultiScaleControlEncoder(nn.Module):
    """The hint encoder as a trunk; per down block, its features average-pooled to the block's resolution and
    projected by a zero-initialised 1×1 convolution to the block's width. Only the projections start at zero (a
    zero trunk behind zero projections would never receive a gradient), so the encoder has no effect before
    training, like the paper's."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        self.trunk = _hint_encoder(config)
        self.trunk.conv_out.reset_parameters()
        width = config["conditioning_embedding_channels"]
        self.levels = nn.ModuleList(nn.Conv2d(width, c, 1) for c in config["level_channels"])
        for proj in self.levels:
            nn.init.zeros_(proj.weight)
            nn.init.zeros_(proj.bias)
        self.level_factors = [int(f) for f in config["level_factors"]]

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        features = F.silu(self.trunk(image))
        return [proj(features if f == 1 else F.avg_pool2d(features, f, ceil_mode=True))
                for proj, f in zip(self.levels, self.level_factors)]


def build_encoder(config: dict) -> nn.Module:
    """The encoder a config describes: diffusers' ControlNet conditioning embedding (its last conv starts at zero:
    no effect before training), or the multiscale encoder built around it."""
    if config.get("injection", "conv_in") == "multiscale":
        return MultiScaleControlEncoder(config)
    return _hint_encoder(config)


def injection_of(encoder: nn.Module) -> str:
    """Where an encoder's features enter the UNet: `conv_in` or `multiscale`."""
    return "multiscale" if isinstance(encoder, MultiScaleControlEncoder) else "conv_in"


def output_parameter_names(encoder: nn.Module) -> list[str]:
    """The encoder's last, zero-initialised layers: scaling them scales its whole output (how an export bakes a
    strength in)."""
    if isinstance(encoder, MultiScaleControlEncoder):
        return [f"levels.{i}.{p}" for i in range(len(encoder.levels)) for p in ("weight", "bias")]
    return ["conv_out.weight", "conv_out.bias"]


@dataclass
class _ControlState:
    """What the `conv_in` hook needs: encoders by adapter name and the current control image."""

    encoders: dict[str, nn.Module] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)
    strengths: dict[str, float] = field(default_factory=dict)
    enabled: bool = True
    image: torch.Tensor | None = None
    scale: float = 1.0
    handles: tuple = ()


def _state(unet: nn.Module, create: bool = False) -> _ControlState | None:
    state = unet.__dict__.get("_ether_control")
    if state is None and create:
        state = _ControlState()
        unet.__dict__["_ether_control"] = state  # kept outside the module tree: unet.state_dict() stays plain
        state.handles = (
            unet.conv_in.register_forward_hook(lambda _m, _i, out: _add_at_conv_in(state, out)),
            unet.register_forward_pre_hook(lambda _m, args, kwargs: _add_multiscale(state, args, kwargs),
                                           with_kwargs=True),
        )
    return state


def _features(state: _ControlState, injection: str, batch: int, device: torch.device):
    """(encoder, strength × scale, its output) of every active encoder of this injection, on the batch's device."""
    if state.image is None or not state.enabled:
        return []
    used = [(name, s) for name, s in state.strengths.items()
            if s and injection_of(state.encoders[name]) == injection]
    if not used:
        return []
    image = state.image
    if batch % image.shape[0]:
        raise EtherError(f"{image.shape[0]} control images for a batch of {batch} latents")
    image = image.repeat(batch // image.shape[0], 1, 1, 1)  # classifier-free guidance doubles the batch
    out = []
    for name, strength in used:
        encoder = state.encoders[name]
        weight = next(encoder.parameters())
        if weight.device != device:
            encoder.to(device)
        out.append((encoder, strength * state.scale, encoder(image.to(device, weight.dtype))))
    return out


def _check_size(features: torch.Tensor, latents: torch.Tensor, factor: int = 1) -> None:
    """Features meant for the latents' size divided by `factor` (rounded up, as the UNet's downsamplers do)."""
    if tuple(features.shape[-2:]) != tuple(-(-n // factor) for n in latents.shape[-2:]):
        raise EtherError(f"control image gives {tuple(n * factor for n in features.shape[-2:])} features for "
                         f"{tuple(latents.shape[-2:])} latents; pass one the size of the generated image")


def _add_at_conv_in(state: _ControlState, out: torch.Tensor) -> torch.Tensor:
    for _, weight, features in _features(state, "conv_in", out.shape[0], out.device):
        _check_size(features, out)
        out = out + weight * features.to(out.dtype)
    return out


def _add_multiscale(state: _ControlState, args: tuple, kwargs: dict):
    """Hand the multiscale encoders' summed outputs to the UNet as `down_intrablock_additional_residuals` (added to
    any the caller passes, e.g. a T2I-Adapter's)."""
    sample = kwargs["sample"] if "sample" in kwargs else args[0]
    used = _features(state, "multiscale", sample.shape[0], sample.device)
    if not used:
        return None
    residuals = kwargs.get("down_intrablock_additional_residuals")
    residuals = list(residuals) if residuals is not None else None
    for encoder, weight, levels in used:
        _check_size(levels[0], sample, encoder.level_factors[0])
        scaled = [weight * level.to(sample.dtype) for level in levels]
        residuals = scaled if residuals is None else [a + b for a, b in zip(residuals, scaled)]
    return args, {**kwargs, "down_intrablock_additional_residuals": residuals}


def attach_control(unet: nn.Module, name: str, encoder: nn.Module, kind: str = "other") -> None:
    """Add `encoder`'s features to the UNet (at `conv_in`, or at every down block for a multiscale encoder)
    whenever adapter `name` is active."""
    state = _state(unet, create=True)
    if name in state.encoders:
        raise EtherError(f"adapter {name!r} already has a control encoder")
    state.encoders[name] = encoder.to(unet.conv_in.weight.device)
    state.kinds[name] = kind
    state.strengths[name] = 1.0


def detach_control(unet: nn.Module, name: str | None = None) -> None:
    """Remove adapter `name`'s encoder (all encoders when None); the hook goes when the last one does."""
    state = _state(unet)
    if state is None:
        return
    for key in [name] if name is not None else list(state.encoders):
        state.encoders.pop(key, None)
        state.kinds.pop(key, None)
        state.strengths.pop(key, None)
    if not state.encoders:
        for handle in state.handles:
            handle.remove()
        del unet.__dict__["_ether_control"]


def control_encoders(unet: nn.Module) -> dict[str, nn.Module]:
    """Adapter name → attached control encoder."""
    state = _state(unet)
    return dict(state.encoders) if state else {}


def control_kinds(unet: nn.Module) -> dict[str, str]:
    """Adapter name → the kind of control image its encoder reads."""
    state = _state(unet)
    return dict(state.kinds) if state else {}


def control_strengths(unet: nn.Module) -> dict[str, float]:
    """Adapter name → encoder strength (0 when off or when the encoders are disabled)."""
    state = _state(unet)
    return {n: (s if state.enabled else 0.0) for n, s in state.strengths.items()} if state else {}


def encoder_config_of(encoder: nn.Module) -> dict:
    """The config `build_encoder` needs to rebuild this encoder."""
    if isinstance(encoder, MultiScaleControlEncoder):
        return dict(encoder.config)
    convs = [encoder.conv_in] + [b for i, b in enumerate(encoder.blocks) if i % 2 == 1]
    return {"conditioning_embedding_channels": encoder.conv_out.out_channels,
            "conditioning_channels": encoder.conv_in.in_channels,
            "block_out_channels": [c.out_channels for c in convs]}


def needed_control(unet: nn.Module) -> dict[str, str]:
    """Active control adapters → the kind of control image each expects."""
    state = _state(unet)
    if state is None:
        return {}
    return {n: state.kinds[n] for n, s in state.strengths.items() if s and state.enabled}


def set_control_strengths(unet: nn.Module, strengths: dict[str, float]) -> None:
    """Strength of every attached encoder: the given ones, 0 for the others (like set_ether_adapters)."""
    state = _state(unet)
    if state is not None:
        state.strengths = {n: float(strengths.get(n, 0.0)) for n in state.encoders}


def enable_control(unet: nn.Module, enabled: bool = True) -> None:
    """Switch all attached encoders on or off without changing their strengths."""
    state = _state(unet)
    if state is not None:
        state.enabled = enabled


def set_control_image(unet: nn.Module, image: torch.Tensor | None, scale: float = 1.0) -> None:
    """The control image(s) every following UNet call is conditioned on: (B or 1, 3, H, W) in [0, 1]."""
    state = _state(unet)
    if state is None:
        if image is not None:
            raise EtherError("a control image was given but no control adapter is loaded")
        return
    state.image, state.scale = image, float(scale)


@contextmanager
def control_image(unet: nn.Module, image: torch.Tensor | None, scale: float = 1.0):
    """`set_control_image` for the duration of a block, then no control image again."""
    set_control_image(unet, image, scale)
    try:
        yield
    finally:
        set_control_image(unet, None)


def prepare_control_image(images: Image.Image | list[Image.Image], width: int, height: int) -> torch.Tensor:
    """Control picture(s) as a (B, 3, height, width) tensor in [0, 1], resized to the generation size.

    Nearest-neighbour resizing keeps label maps and edge maps crisp (no invented in-between classes).
    """
    images = [images] if isinstance(images, Image.Image) else images
    arrays = [np.asarray(im.convert("RGB").resize((width, height), Image.Resampling.NEAREST), np.float32) / 255.0
              for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
