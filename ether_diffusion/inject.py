"""Put ETHER adapters into any `nn.Module` by module-name patterns, and manage them model-wide.

A pattern is a preset name (`attn`, `attn+ff`, `text`) or a regular expression matched against the end of a
module's dotted name at a dot boundary: `to_q` matches `…attn1.to_q`, `attn2\\.to_(k|v)` only cross-attention
keys and values. Several patterns are separated by commas. Only `nn.Linear`, 1×1 `nn.Conv2d` and bitsandbytes'
quantised Linears are adapted; a selected Linear or Conv2d of any other kind is refused by name.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch
from torch import nn

from . import low_rank_groups
from .errors import EtherError
from .layers import AdapterConfig, EtherAdapter, EtherLayer, check_blocks, is_adaptable, layer_sizes, unsupported_reason

PRESETS: dict[str, tuple[str, ...]] = {
    # the paper's subject-driven choice: q, k, v, out of every attention module (self and cross)
    "attn": (r"to_(q|k|v)", r"to_out\.0"),
    # the paper's controllable-generation choice: attention plus the feed-forward Linears
    "attn+ff": (r"to_(q|k|v)", r"to_out\.0", r"ff\.net\.0\.proj", r"ff\.net\.2"),
    # CLIP text encoders
    "text": (r"self_attn\.(q|k|v|out)_proj",),
}
_DIT_ATTN = (r"attn\.to_(q|k|v)", r"attn\.to_out\.0", r"attn\.add_(q|k|v)_proj", r"attn\.to_add_out")
_DIT_FF = (r"ff\.net\.0\.proj", r"ff\.net\.2", r"ff_context\.net\.0\.proj", r"ff_context\.net\.2")
MODEL_PRESETS: dict[str, dict[str, tuple[str, ...]]] = {
    # diffusers' FLUX / SD3 DreamBooth scripts' layers: image and context streams' q, k, v and outputs (FLUX's
    # single blocks have q, k, v only); SD3.5's second attention (`attn2`) is left alone, as there
    "FluxTransformer2DModel": {"attn": _DIT_ATTN,
                               "attn+ff": (*_DIT_ATTN, *_DIT_FF, r"single_transformer_blocks\.\d+\.proj_(mlp|out)")},
    "SD3Transformer2DModel": {"attn": _DIT_ATTN, "attn+ff": (*_DIT_ATTN, *_DIT_FF)},
}


def presets_for(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """The preset table for a model, by its class (a FLUX or SD3 transformer has its own `attn` / `attn+ff`)."""
    for cls in type(model).__mro__:
        if cls.__name__ in MODEL_PRESETS:
            return {**PRESETS, **MODEL_PRESETS[cls.__name__]}
    return PRESETS


def expand_targets(targets: str, presets: dict[str, tuple[str, ...]] = PRESETS) -> list[str]:
    """Preset names and regular expressions from a comma-separated target string."""
    patterns: list[str] = []
    for item in (t.strip() for t in targets.split(",")):
        if not item:
            continue
        if item in presets:
            patterns += presets[item]
            continue
        try:
            re.compile(item)
        except re.error as exc:
            raise EtherError(f"target pattern {item!r} is not a valid regular expression: {exc}") from None
        patterns.append(item)
    if not patterns:
        raise EtherError(f"no target patterns in {targets!r}; use a preset ({', '.join(PRESETS)}) or a regex")
    return patterns


def _matches(name: str, patterns: list[str]) -> bool:
    return any(re.fullmatch(rf"(?:.*\.)?(?:{p})", name) for p in patterns)


def ether_layers(model: nn.Module) -> Iterator[tuple[str, EtherLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, EtherLayer):
            yield name, module


def find_targets(model: nn.Module, targets: str) -> list[str]:
    """Names of the adaptable modules (or existing ETHER layers) that the targets select."""
    patterns = expand_targets(targets, presets_for(model))
    found = []
    for name, module in model.named_modules():
        if name.endswith(".base") and isinstance(model.get_submodule(name.rsplit(".", 1)[0]), EtherLayer):
            continue
        if not _matches(name, patterns):
            continue
        if isinstance(module, EtherLayer) or is_adaptable(module):
            found.append(name)
        elif isinstance(module, (nn.Linear, nn.Conv2d)):  # a layer we would silently mishandle: say so
            raise EtherError(f"targets {targets!r} select layer {name}, which is {unsupported_reason(module)}")
    return found


def _wrap(model: nn.Module, name: str) -> EtherLayer:
    module = model.get_submodule(name)
    if isinstance(module, EtherLayer):
        return module
    layer = EtherLayer(module, name)
    _replace(model, name, layer)
    return layer


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` where the submodule `name` is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def add_adapter(model: nn.Module, name: str, config: AdapterConfig, layer_names: list[str] | None = None) -> list[str]:
    """Add adapter `name` to every targeted layer of `model`; freeze everything but the new adapter's vectors
    (adapters already there are frozen too, so training the new one never moves them).

    `layer_names` overrides the targets (used when loading a file, which lists its layers). Returns the names of
    the adapted layers. Nothing is changed when any layer is incompatible.
    """
    names = layer_names if layer_names is not None else find_targets(model, config.targets)
    if not names:
        raise EtherError(f"targets {config.targets!r} select no Linear or 1×1 Conv2d layer in {type(model).__name__}")
    for layer_name in names:  # validate everything before touching the model
        module = model.get_submodule(layer_name)
        base = module.base if isinstance(module, EtherLayer) else module
        if not is_adaptable(base):
            raise EtherError(f"layer {layer_name} is {unsupported_reason(base)}")
        check_blocks(config, *layer_sizes(base), layer_name)
        if isinstance(module, EtherLayer) and name in module.ether_adapters:
            raise EtherError(f"an adapter named {name!r} already exists on {layer_name}")
    model.requires_grad_(False)
    for layer_name in names:
        _wrap(model, layer_name).add_adapter(name, config, layer_name).requires_grad_(True)
    low_rank_groups.install(model)
    return names


def adapter_modules(model: nn.Module, name: str) -> dict[str, EtherAdapter]:
    """Layer name → the `EtherAdapter` holding adapter `name`'s vectors on that layer."""
    return {ln: layer.ether_adapters[name] for ln, layer in ether_layers(model) if name in layer.ether_adapters}


def list_adapters(model: nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for _, layer in ether_layers(model):
        names.update(dict.fromkeys(layer.ether_adapters))
    return list(names)


def _require(model: nn.Module, names: list[str]) -> None:
    known = list_adapters(model)
    missing = [n for n in names if n not in known]
    if missing:
        raise EtherError(f"unknown adapter(s) {missing}; loaded: {known or 'none'}")


def strengths_for(names: list[str] | str, weights: list[float] | float | None = None) -> dict[str, float]:
    """{name: strength} from diffusers-style arguments: one name or a list, one weight, a list, or None (1.0)."""
    names = [names] if isinstance(names, str) else list(names)
    if weights is None:
        weights = [1.0] * len(names)
    elif isinstance(weights, (int, float)):
        weights = [float(weights)] * len(names)
    if len(weights) != len(names):
        raise EtherError(f"{len(names)} adapters but {len(weights)} weights")
    return dict(zip(names, (float(w) for w in weights)))


def set_adapters(model: nn.Module, names: list[str] | str, weights: list[float] | float | None = None,
                 strict: bool = True) -> None:
    """Make exactly these adapters active, applied in this order, with these strengths (default 1.0).

    `strict=False` lets a name be absent from this model (a pipeline adapter may have no text-encoder part).
    """
    strengths = strengths_for(names, weights)
    if strict:
        _require(model, list(strengths))
    for _, layer in ether_layers(model):
        layer.set_active(strengths)


def active_adapters(model: nn.Module) -> dict[str, float]:
    for _, layer in ether_layers(model):
        if layer.active:
            return dict(layer.active)
    return {}


def enable_adapters(model: nn.Module, enabled: bool = True) -> None:
    for _, layer in ether_layers(model):
        layer.enabled = enabled


def disable_adapters(model: nn.Module) -> None:
    enable_adapters(model, False)


def merge_adapters(model: nn.Module) -> None:
    """Fuse the active adapters into the base weights (fast inference, same outputs)."""
    for _, layer in ether_layers(model):
        layer.merge()


def unmerge_adapters(model: nn.Module) -> None:
    """Restore the exact original base weights after `merge_adapters`."""
    for _, layer in ether_layers(model):
        layer.unmerge()


def delete_adapter(model: nn.Module, name: str) -> None:
    _require(model, [name])
    for _, layer in ether_layers(model):
        if name in layer.ether_adapters:
            layer.delete_adapter(name)
    for layer_name, layer in list(ether_layers(model)):
        if not layer.ether_adapters:
            _unwrap(model, layer_name, layer)


def _unwrap(model: nn.Module, name: str, layer: EtherLayer) -> None:
    layer.unmerge()
    _replace(model, name, layer.base)


def unload_adapters(model: nn.Module) -> None:
    """Remove every adapter and wrapper: the model is the plain base model again, original weights restored."""
    for name, layer in list(ether_layers(model)):
        _unwrap(model, name, layer)
    low_rank_groups.uninstall(model)


def fuse_and_unload(model: nn.Module) -> None:
    """Bake the active adapters into the weights and remove the wrappers: a plain model with the adapted weights."""
    for name, layer in list(ether_layers(model)):
        layer.merge()
        _replace(model, name, layer.base)
    low_rank_groups.uninstall(model)


@contextlib.contextmanager
def route_adapters(model: nn.Module, per_sample: list[str | None], strengths: list[float] | None = None):
    """Within this block, sample i of each batch uses adapter `per_sample[i]` (None: the base model).

    Many personalised subjects are then served in one forward pass. Routed adapters must share method,
    n_blocks and sides.
    """
    _require(model, [n for n in per_sample if n is not None])
    scale = torch.tensor(strengths if strengths is not None else [1.0] * len(per_sample), dtype=torch.float32)
    layers = [layer for _, layer in ether_layers(model)]
    for layer in layers:
        if layer.merged:
            raise EtherError("adapters are merged into the weights; unmerge before routing")
        layer.routing = (list(per_sample), scale)
    try:
        yield
    finally:
        for layer in layers:
            layer.routing = None


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def count_parameters(model: nn.Module, name: str | None = None) -> int:
    """Number of adapter vector entries, for one adapter or all."""
    total = 0
    for _, layer in ether_layers(model):
        for adapter_name, adapter in layer.ether_adapters.items():
            if name is None or adapter_name == name:
                total += sum(p.numel() for p in adapter.parameters())
    return total
