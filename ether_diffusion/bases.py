"""The base families ether-diffusion adapts, and what differs between them.

A UNet base (SD 1.x, 2.x, SDXL) is denoised by `pipe.unet` with DDPM-style training; a FLUX.1 or SD3 / SD3.5
base by `pipe.transformer` with flow matching. The family is read from the loaded denoiser's class, never from a
folder or hub name. Everything else (injection, files, export) works on the component names given here: the
denoiser under its pipeline attribute name, and the CLIP text encoders only (T5 is never adapted: it is the
memory hog and diffusers' FLUX / SD3 scripts never train it either).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import EtherError


@dataclass(frozen=True)
class BaseFamily:
    """One family of bases: how its pipeline names the denoiser and its adaptable text encoders."""

    name: str
    pipelines: tuple[str, ...]  # diffusers pipeline classes of this family (for messages and the refusal)
    denoiser_class: str
    denoiser: str  # the pipeline attribute holding the denoiser
    text_encoders: tuple[str, ...]  # CLIP encoders, adaptable
    flow_matching: bool


FAMILIES = (
    BaseFamily("unet", ("StableDiffusionPipeline", "StableDiffusionXLPipeline"), "UNet2DConditionModel", "unet",
               ("text_encoder", "text_encoder_2"), flow_matching=False),
    BaseFamily("flux", ("FluxPipeline",), "FluxTransformer2DModel", "transformer", ("text_encoder",),
               flow_matching=True),
    BaseFamily("sd3", ("StableDiffusion3Pipeline",), "SD3Transformer2DModel", "transformer",
               ("text_encoder", "text_encoder_2"), flow_matching=True),
)
SUPPORTED_PIPELINES = tuple(p for f in FAMILIES for p in f.pipelines)
DENOISER_NAMES = tuple(dict.fromkeys(f.denoiser for f in FAMILIES))
COMPONENT_NAMES = (*DENOISER_NAMES, "text_encoder", "text_encoder_2")


def family_of_class(denoiser_class: str) -> BaseFamily | None:
    return next((f for f in FAMILIES if f.denoiser_class == denoiser_class), None)


def family(pipe) -> BaseFamily:
    """The family of a loaded pipeline, from its denoiser's class (a subclass counts as its parent)."""
    for attr in DENOISER_NAMES:
        model = getattr(pipe, attr, None)
        if model is None:
            continue
        for cls in type(model).__mro__:
            found = family_of_class(cls.__name__)
            if found is not None and found.denoiser == attr:
                return found
    raise EtherError(f"{type(pipe).__name__} is not supported: its denoiser is none of "
                     f"{', '.join(f.denoiser_class for f in FAMILIES)} ({', '.join(SUPPORTED_PIPELINES)})")


def denoiser(pipe) -> nn.Module:
    """The pipeline's UNet or transformer."""
    return getattr(pipe, family(pipe).denoiser)


def check_model_index(model_index: dict) -> None:
    """Refuse, in one sentence naming it and the supported ones, a pipeline folder whose denoiser no family has."""
    for f in FAMILIES:
        entry = model_index.get(f.denoiser)
        if isinstance(entry, (list, tuple)) and len(entry) == 2 and family_of_class(entry[1]) is not None:
            return
    kind = model_index.get("_class_name", "this pipeline")
    found = next((v[1] for k, v in model_index.items() if k in ("unet", "transformer", "prior")
                  and isinstance(v, (list, tuple)) and len(v) == 2), "none")
    raise EtherError(f"{kind} (denoiser: {found}) is not supported: ether-diffusion works with "
                     f"{', '.join(SUPPORTED_PIPELINES)} (SD 1.x, 2.x, SDXL, FLUX.1, SD3 / SD3.5)")


def is_sdxl(pipe) -> bool:
    """An SDXL UNet base (two CLIP encoders, pooled embeddings and size ids); SD3 also has a `text_encoder_2`."""
    return family(pipe).name == "unet" and getattr(pipe, "text_encoder_2", None) is not None


def default_resolution(pipe) -> int:
    """The picture size the base was made for."""
    model = denoiser(pipe)
    if family(pipe).name == "unet":
        return int(model.config.sample_size) * pipe.vae_scale_factor
    return int(pipe.default_sample_size) * pipe.vae_scale_factor


def size_multiple(pipe) -> int:
    """Picture sizes must be a multiple of this: the UNet's downsamplings, or the transformer's patches
    (FLUX packs 2×2 latent patches)."""
    model, name = denoiser(pipe), family(pipe).name
    if name == "unet":
        return pipe.vae_scale_factor * 2 ** (len(model.config.block_out_channels) - 1)
    if name == "flux":
        return pipe.vae_scale_factor * 2
    return pipe.vae_scale_factor * int(model.config.patch_size)


def require_unet(pipe, what: str) -> nn.Module:
    """The UNet, or one sentence saying `what` needs one (control encoders feed a UNet's `conv_in`)."""
    f = family(pipe)
    if f.name != "unet":
        raise EtherError(f"{what} works on UNet bases (SD 1.x, 2.x, SDXL) only; this base is {f.name.upper()} "
                         f"({type(pipe).__name__})")
    return pipe.unet
