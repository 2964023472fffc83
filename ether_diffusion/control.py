"""Control-signal encoders: a control image (segmentation map, edges, …) steers a frozen UNet.

The paper's setting: ControlNet's small "hint" encoder (diffusers' `ControlNetConditioningEmbedding`, last
convolution zero-initialised) turns the control image into features of the UNet's first width, which are added
once to the output of `unet.conv_in`. There is no trainable UNet copy; ETHER adapters on the frozen UNet learn to
use the added features. The encoder is attached with a forward hook, so diffusers' code is never edited and any
UNet2DConditionModel (SD 1.x, 2.x, SDXL) works.

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

from .errors import EtherError

ENCODER_CHANNELS = (16, 32, 96, 256)  # ControlNet's hint encoder widths, one stride-2 stage between each
CONTROL_KINDS = ("segmentation", "edges", "depth", "pose", "other")


def encoder_config(unet: nn.Module, vae_scale_factor: int) -> dict:
    """The encoder that fits a UNet: output width = the UNet's first block width, one halving per VAE halving."""
    levels = int(round(math.log2(vae_scale_factor)))
    if 2**levels != vae_scale_factor or not 1 <= levels <= 3:
        raise EtherError(f"control encoders need a VAE scale factor of 2, 4 or 8, got {vae_scale_factor}")
    return {"conditioning_embedding_channels": int(unet.config.block_out_channels[0]),
            "conditioning_channels": 3,
            "block_out_channels": list(ENCODER_CHANNELS[: levels + 1])}


def build_encoder(config: dict) -> nn.Module:
    """diffusers' ControlNet conditioning embedding (its last conv starts at zero: no effect before training)."""
    from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding

    return ControlNetConditioningEmbedding(
        conditioning_embedding_channels=config["conditioning_embedding_channels"],
        conditioning_channels=config.get("conditioning_channels", 3),
        block_out_channels=tuple(config["block_out_channels"]),
    )


@dataclass
class _ControlState:
    """What the `conv_in` hook needs: encoders by adapter name and the current control image."""

    encoders: dict[str, nn.Module] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)
    strengths: dict[str, float] = field(default_factory=dict)
    enabled: bool = True
    image: torch.Tensor | None = None
    scale: float = 1.0
    handle: object = None


def _state(unet: nn.Module, create: bool = False) -> _ControlState | None:
    state = unet.__dict__.get("_ether_control")
    if state is None and create:
        state = _ControlState()
        unet.__dict__["_ether_control"] = state  # kept outside the module tree: unet.state_dict() stays plain
        state.handle = unet.conv_in.register_forward_hook(lambda _m, _i, out: _add_control(state, out))
    return state


def _add_control(state: _ControlState, out: torch.Tensor) -> torch.Tensor:
    if state.image is None:
        return out
    used = [(name, s) for name, s in state.strengths.items() if s] if state.enabled else []
    if not used:
        return out
    image = state.image
    if out.shape[0] % image.shape[0]:
        raise EtherError(f"{image.shape[0]} control images for a batch of {out.shape[0]} latents")
    image = image.repeat(out.shape[0] // image.shape[0], 1, 1, 1)  # classifier-free guidance doubles the batch
    for name, strength in used:
        encoder = state.encoders[name]
        weight = next(encoder.parameters())
        if weight.device != out.device:
            encoder.to(out.device)
        features = encoder(image.to(out.device, weight.dtype))
        if features.shape[-2:] != out.shape[-2:]:
            raise EtherError(f"control image gives {tuple(features.shape[-2:])} features for "
                             f"{tuple(out.shape[-2:])} latents; pass one the size of the generated image")
        out = out + (strength * state.scale) * features.to(out.dtype)
    return out


def attach_control(unet: nn.Module, name: str, encoder: nn.Module, kind: str = "other") -> None:
    """Add `encoder`'s features to `unet.conv_in`'s output whenever adapter `name` is active."""
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
        state.handle.remove()
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
