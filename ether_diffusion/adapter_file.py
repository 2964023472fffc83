"""Adapter files: one `.safetensors` file with the vectors and JSON metadata that says what they are.

The format is specified in docs/adapter-format.md. Loading validates everything before any model is touched
and raises `AdapterFileError` with a message that names the problem.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from .atomic import atomic_write_bytes
from .control import attach_control, build_encoder, control_encoders
from .errors import AdapterFileError
from .inject import add_adapter, adapter_modules, ether_layers
from .layers import AdapterConfig, EtherLayer, is_adaptable, layer_sizes
from .naming import canonical_layer_name, installed_layer_name

FORMAT_NAME = "ether-diffusion-adapter"
FORMAT_VERSION = 1
METADATA_KEY = "ether_diffusion"
VECTOR_NAMES = ("u_input", "v_input", "u_output", "v_output")
EXTRA_PREFIX = "extra."  # non-ETHER tensors (e.g. a control encoder) live under "extra.<module>.<param>"
CONTROL_MODULE = "control_encoder"


@dataclass
class AdapterFile:
    """The parsed, validated content of an adapter file."""

    path: Path
    metadata: dict
    tensors: dict[str, torch.Tensor] = field(repr=False)

    @property
    def components(self) -> dict[str, dict]:
        return self.metadata["components"]

    def config(self, component: str) -> AdapterConfig:
        return AdapterConfig(**self.components[component]["config"])

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for k, t in self.tensors.items() if not k.startswith(EXTRA_PREFIX))

    @property
    def control(self) -> dict | None:
        """{'kind': …, 'encoder': config} for a control adapter (it needs a control image), else None."""
        return self.metadata.get("control")

    def extra_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Non-ETHER tensors stored under `extra.<prefix>.`, keyed without that prefix."""
        head = f"{EXTRA_PREFIX}{prefix}."
        return {k[len(head):]: v for k, v in self.tensors.items() if k.startswith(head)}


def layer_fingerprint(layers: dict[str, list[int]]) -> str:
    """Hash of the targeted layers' names and shapes: identifies the base architecture an adapter fits."""
    text = "\n".join(f"{name}:{shape[1]}x{shape[0]}" for name, shape in sorted(layers.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def weight_hash(model: torch.nn.Module, layer_names: list[str]) -> str:
    """Hash of the targeted base weights (as fp16, so fp16 and fp32 copies of one checkpoint agree)."""
    h = hashlib.sha256()
    for name in sorted(layer_names):
        module = model.get_submodule(name)
        base = module.base if isinstance(module, EtherLayer) else module
        weight = base.weight
        if isinstance(module, EtherLayer) and module.merged:
            weight = module._original_weight
        h.update(weight.detach().to("cpu", torch.float16).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _layer_table(model: torch.nn.Module, comp: str, name: str) -> dict[str, list[int]]:
    """Canonical layer name → [in, out] for every layer of `model` that holds adapter `name`."""
    return {canonical_layer_name(comp, ln): list(layer_sizes(layer.base))
            for ln, layer in ether_layers(model) if name in layer.ether_adapters}


def resolve_layers(adapter: "AdapterFile", comp: str, model: torch.nn.Module) -> dict[str, str]:
    """Installed module name → the name the file stores it under, for one component (either spelling)."""
    return {installed_layer_name(model, comp, stored): stored for stored in adapter.components[comp]["layers"]}


def save_adapter(
    path: str | Path,
    components: dict[str, torch.nn.Module],
    name: str,
    info: dict | None = None,
    with_weight_hash: bool = True,
    control: tuple[str, dict, torch.nn.Module] | None = None,
) -> Path:
    """Write adapter `name` from each component model (e.g. {"unet": unet}) to one file, atomically.

    `info` adds free-form metadata (instance prompt, trigger, base model, training settings);
    `control` = (kind, encoder config, encoder) stores a control encoder under `extra.control_encoder.`.
    """
    tensors: dict[str, torch.Tensor] = {}
    comp_meta: dict[str, dict] = {}
    for comp, model in components.items():
        adapters = adapter_modules(model, name)
        if not adapters:
            continue
        config = next(iter(adapters.values())).config
        layers = _layer_table(model, comp, name)
        comp_meta[comp] = {
            "config": config.to_dict(),
            "layers": layers,
            "fingerprint": layer_fingerprint(layers),
            "weight_hash": weight_hash(model, list(adapters)) if with_weight_hash else None,
        }
        for layer_name, adapter in adapters.items():
            for vec_name, p in adapter.vectors.items():
                key = f"{comp}.{canonical_layer_name(comp, layer_name)}.{vec_name}"
                tensors[key] = p.detach().to("cpu", torch.float32).contiguous()
    if not comp_meta and control is None:
        raise AdapterFileError(f"no adapter named {name!r} in the given models; nothing to save")
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "name": name, "components": comp_meta,
            **(info or {})}
    if control is not None:
        kind, config, encoder = control
        meta["control"] = {"kind": kind, "encoder": config}
        for key, value in encoder.state_dict().items():
            tensors[f"{EXTRA_PREFIX}{CONTROL_MODULE}.{key}"] = value.detach().to("cpu", torch.float32).contiguous()
    data = save(tensors, metadata={"format": "pt", METADATA_KEY: json.dumps(meta)})
    return atomic_write_bytes(path, data)


def _expected_keys(comp: str, meta: dict) -> set[str]:
    config = AdapterConfig(**meta["config"])
    vecs = [f"u_{s}" for s in config.side_list] + ([f"v_{s}" for s in config.side_list] if config.spec.has_v else [])
    return {f"{comp}.{layer}.{v}" for layer in meta["layers"] for v in vecs}


def _expected_shape(key: str, comp_meta: dict) -> tuple[int]:
    layer, vec = key.split(".", 1)[1].rsplit(".", 1)
    in_f, out_f = comp_meta["layers"][layer]
    return (in_f if vec.endswith("input") else out_f,)


def read_adapter_file(path: str | Path) -> AdapterFile:
    """Open and validate an adapter file on its own (format, version, tensor set, shapes, finite values)."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"adapter file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw_meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterFileError(f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}") from None
    if METADATA_KEY not in raw_meta:
        raise AdapterFileError(f"{path} is a safetensors file but not an ether-diffusion adapter (no metadata)")
    try:
        meta = json.loads(raw_meta[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise AdapterFileError(f"{path}: adapter metadata is not valid JSON: {exc}") from None
    if meta.get("format") != FORMAT_NAME:
        raise AdapterFileError(f"{path}: unknown format {meta.get('format')!r}, expected {FORMAT_NAME!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise AdapterFileError(f"{path}: format version {meta.get('format_version')!r} is not supported "
                               f"(this ether-diffusion reads version {FORMAT_VERSION}); upgrade ether-diffusion")
    try:
        expected = set().union(*(_expected_keys(c, m) for c, m in meta["components"].items()))
    except (KeyError, TypeError, ValueError, AdapterFileError) as exc:
        raise AdapterFileError(f"{path}: malformed adapter metadata: {exc}") from None
    present = {k for k in tensors if not k.startswith(EXTRA_PREFIX)}
    if present != expected:
        missing, extra = sorted(expected - present), sorted(present - expected)
        raise AdapterFileError(f"{path}: tensors do not match the metadata; missing {missing[:3]}"
                               f"{' …' if len(missing) > 3 else ''} ({len(missing)}), unexpected {extra[:3]} ({len(extra)})")
    for key in sorted(present):
        comp = key.split(".", 1)[0]
        shape = _expected_shape(key, meta["components"][comp])
        if tuple(tensors[key].shape) != shape:
            raise AdapterFileError(f"{path}: tensor {key} has shape {tuple(tensors[key].shape)}, metadata says {shape}")
    for key, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise AdapterFileError(f"{path}: tensor {key} contains NaN or infinite values")
    parsed = AdapterFile(path, meta, tensors)
    if parsed.control is not None:
        if not isinstance(parsed.control, dict) or not isinstance(parsed.control.get("encoder"), dict):
            raise AdapterFileError(f"{path}: malformed control metadata (needs 'kind' and 'encoder')")
        if not parsed.extra_tensors(CONTROL_MODULE):
            raise AdapterFileError(f"{path}: metadata describes a control encoder but the file holds no "
                                   f"{EXTRA_PREFIX}{CONTROL_MODULE}.* tensors")
    elif not meta["components"]:
        raise AdapterFileError(f"{path}: the adapter holds neither ETHER vectors nor a control encoder")
    return parsed


def control_encoder_from(adapter: AdapterFile) -> torch.nn.Module:
    """The file's control encoder, built from its metadata with the stored weights (strict)."""
    try:
        encoder = build_encoder(adapter.control["encoder"])
        encoder.load_state_dict(adapter.extra_tensors(CONTROL_MODULE))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise AdapterFileError(f"{adapter.path}: the control encoder does not match its metadata: "
                               f"{str(exc).splitlines()[0]}") from None
    return encoder


def check_base(adapter: AdapterFile, components: dict[str, torch.nn.Module]) -> list[str]:
    """Refuse a base model that lacks a component, a layer, or has other shapes; return warnings (weight hash)."""
    warnings = []
    if adapter.control is not None:
        unet = components.get("unet")
        if unet is None or not hasattr(unet, "conv_in"):
            raise AdapterFileError(f"{adapter.path} is a control adapter but the base model has no UNet with conv_in")
        want, have = adapter.control["encoder"].get("conditioning_embedding_channels"), unet.config.block_out_channels[0]
        if want != have:
            raise AdapterFileError(f"{adapter.path} was made for another base model: its control encoder gives "
                                   f"{want} channels, this UNet's conv_in gives {have}")
    for comp, meta in adapter.components.items():
        if comp not in components or components[comp] is None:
            raise AdapterFileError(f"{adapter.path}: the adapter has a {comp!r} part but the base model has no {comp}")
        model = components[comp]
        problems = []
        for layer, (in_f, out_f) in meta["layers"].items():
            try:
                module = model.get_submodule(installed_layer_name(model, comp, layer))
            except AttributeError:
                problems.append(f"{layer} (missing)")
                continue
            base = module.base if isinstance(module, EtherLayer) else module
            if not is_adaptable(base):
                problems.append(f"{layer} (a {type(base).__name__})")
            elif layer_sizes(base) != (in_f, out_f):
                problems.append(f"{layer} (base {layer_sizes(base)[0]}→{layer_sizes(base)[1]}, adapter {in_f}→{out_f})")
        if problems:
            raise AdapterFileError(
                f"{adapter.path} was made for another base model: {len(problems)} {comp} layer(s) do not fit, "
                f"e.g. {'; '.join(problems[:3])}")
        if meta.get("weight_hash") and weight_hash(model, list(resolve_layers(adapter, comp, model))) != meta["weight_hash"]:
            warnings.append(f"{comp}: base weights differ from those the adapter was trained on (same architecture)")
    return warnings


def load_adapter(
    path: str | Path, components: dict[str, torch.nn.Module], name: str | None = None
) -> tuple[str, AdapterFile]:
    """Validate a file against the models and add it as adapter `name` (default: the name stored in the file).

    Returns the adapter name used and the parsed file. On any error, the models are left unchanged.
    """
    adapter = read_adapter_file(path)
    for message in check_base(adapter, components):
        warnings.warn(message, stacklevel=2)
    name = name or adapter.metadata.get("name") or Path(path).stem
    taken = any(name in layer.ether_adapters for model in components.values() if model is not None
                for _, layer in ether_layers(model))
    if taken or ("unet" in components and name in control_encoders(components["unet"])):
        raise AdapterFileError(f"an adapter named {name!r} is already loaded; pass another name")
    encoder = control_encoder_from(adapter) if adapter.control is not None else None
    for comp in adapter.components:
        add_adapter(components[comp], name, adapter.config(comp),
                    layer_names=list(resolve_layers(adapter, comp, components[comp])))
    copy_vectors(adapter, components, name)
    if encoder is not None:
        attach_control(components["unet"], name, encoder, adapter.control.get("kind", "other"))
    return name, adapter


@torch.no_grad()
def copy_vectors(adapter: AdapterFile, components: dict[str, torch.nn.Module], name: str) -> None:
    """Overwrite the vectors of already-present adapter `name` with the file's values (used by resume)."""
    for comp in adapter.components:
        stored = resolve_layers(adapter, comp, components[comp])
        for layer_name, module in adapter_modules(components[comp], name).items():
            for vec_name, p in module.vectors.items():
                p.copy_(adapter.tensors[f"{comp}.{stored[layer_name]}.{vec_name}"])


def describe(adapter: AdapterFile) -> str:
    """Human-readable summary for `ether-diffusion info`."""
    meta = adapter.metadata
    lines = [f"file: {adapter.path}", f"format: {meta['format']} v{meta['format_version']}",
             f"name: {meta.get('name')}", f"parameters: {adapter.num_parameters:,}"]
    for comp, cm in adapter.components.items():
        cfg = cm["config"]
        lines.append(f"{comp}: method={cfg['method']} n_blocks={cfg['n_blocks']} sides={cfg['sides']} "
                     f"targets={cfg['targets']} layers={len(cm['layers'])} fingerprint={cm['fingerprint']}")
    if adapter.control is not None:
        n_enc = sum(t.numel() for t in adapter.extra_tensors(CONTROL_MODULE).values())
        lines.append(f"control: needs a {adapter.control.get('kind')} control image; encoder {n_enc:,} parameters")
    for key in sorted(k for k in meta if k not in ("format", "format_version", "name", "components", "control")):
        value = meta[key]
        lines.append(f"{key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    return "\n".join(lines)

