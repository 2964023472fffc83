"""Canonical layer names: the names the ecosystem's checkpoints use, whatever library version is installed.

transformers 5 dropped the `text_model.` level from `CLIPTextModel` (not from `CLIPTextModelWithProjection`), so
the same SD-1.5 text-encoder layer is `text_model.encoder.layers.0.self_attn.q_proj` under transformers 4 and
`encoder.layers.0.self_attn.q_proj` under 5. Checkpoints, diffusers LoRA files and the kohya / A1111 / ComfyUI
key maps all spell it with `text_model.`. Adapter files and exports therefore always write that canonical
spelling, and reading accepts either spelling and resolves it to the installed model's own module.
"""

from __future__ import annotations

from torch import nn

TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")
TEXT_ROOT = "text_model."


def canonical_layer_name(component: str, name: str) -> str:
    """The version-independent name of an installed module `name` of pipeline component `component`."""
    if component in TEXT_COMPONENTS and not name.startswith(TEXT_ROOT):
        return TEXT_ROOT + name
    return name


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def installed_layer_name(model: nn.Module, component: str, name: str) -> str:
    """The module of `model` that a stored name (canonical or installed-version spelling) denotes.

    Returns `name` unchanged when neither spelling exists, so the caller reports the missing layer by the name
    the file uses.
    """
    if _has_module(model, name) or component not in TEXT_COMPONENTS:
        return name
    other = name[len(TEXT_ROOT):] if name.startswith(TEXT_ROOT) else TEXT_ROOT + name
    return other if _has_module(model, other) else name


def kohya_key(component: str, canonical_name: str, sdxl: bool) -> str:
    """kohya / A1111 / ComfyUI module key: `lora_unet_…`, `lora_te_…` (SD 1.x/2.x) or `lora_te1_…`/`lora_te2_…`
    (SDXL), followed by the canonical name with dots turned into underscores."""
    if component == "unet":
        prefix = "lora_unet"
    elif component == "text_encoder":
        prefix = "lora_te1" if sdxl else "lora_te"
    elif component == "text_encoder_2":
        prefix = "lora_te2"
    else:
        raise ValueError(f"no kohya key prefix for component {component!r}")
    return f"{prefix}_{canonical_name.replace('.', '_')}"
