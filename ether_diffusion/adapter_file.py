"""Adapter files: one `.safetensors` file with the vectors and JSON metadata that says what they are.

The format is specified in docs/adapter-format.md. Reading checks, in this order and before any tensor is read:
the file's size (capped), the metadata (schema, types, ranges, block counts), and the tensor table from the
header (names, shapes, dtypes); then it reads the tensors and checks their checksum and values. Loading into a
model checks the base, attaches every component, and on any error detaches what it attached: a failed load
leaves every model exactly as it was. Every problem is an `AdapterFileError` whose message names it.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from .atomic import atomic_write_bytes
from .bases import COMPONENT_NAMES
from .control import attach_control, build_encoder, control_encoders, down_block_factors
from .errors import AdapterFileError, EtherError
from .inject import add_adapter, adapter_modules, delete_adapter, ether_layers
from .layers import AdapterConfig, EtherLayer, check_blocks, is_adaptable, layer_sizes
from .naming import canonical_layer_name, installed_layer_name

FORMAT_NAME = "ether-diffusion-adapter"
FORMAT_VERSION = 1
METADATA_KEY = "ether_diffusion"
VECTOR_NAMES = ("u_input", "v_input", "u_output", "v_output")
EXTRA_PREFIX = "extra."  # non-ETHER tensors (e.g. a control encoder) live under "extra.<module>.<param>"
CONTROL_MODULE = "control_encoder"
CHECKSUM_KEY = "ether_diffusion_sha256"  # over the metadata JSON and every tensor: any changed byte is caught
MAX_SIZE_ENV = "ETHER_DIFFUSION_MAX_ADAPTER_MB"
DEFAULT_MAX_MB = 1024.0
MAX_WIDTH = 1 << 20  # no diffusion model has a layer this wide; larger numbers are corruption


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
    meta_json = json.dumps(meta)
    data = save(tensors, metadata={"format": "pt", METADATA_KEY: meta_json,
                                   CHECKSUM_KEY: content_checksum(meta_json, tensors)})
    return atomic_write_bytes(path, data)


def content_checksum(meta_json: str, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the metadata JSON and every tensor's name and bytes, in name order."""
    h = hashlib.sha256(meta_json.encode())
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def max_adapter_bytes() -> int:
    """The largest adapter file read: `ETHER_DIFFUSION_MAX_ADAPTER_MB` megabytes (default 1024)."""
    raw = os.environ.get(MAX_SIZE_ENV, "")
    try:
        megabytes = float(raw) if raw else DEFAULT_MAX_MB
    except ValueError:
        raise AdapterFileError(f"{MAX_SIZE_ENV}={raw!r} is not a number of megabytes") from None
    return int(megabytes * 2**20)


def _is_int(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _check_component(comp: str, meta) -> AdapterConfig:
    """Schema of one `components` entry; returns its adapter config. Raises ValueError naming the problem."""
    if comp not in COMPONENT_NAMES:
        raise ValueError(f"unknown component {comp!r} (known: {', '.join(COMPONENT_NAMES)})")
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict) or not isinstance(meta.get("layers"), dict):
        raise ValueError(f"component {comp!r} needs a 'config' object and a 'layers' object")
    config = meta["config"]
    if set(config) != {"method", "n_blocks", "sides", "targets"} or not _is_int(config["n_blocks"], 1, MAX_WIDTH) \
            or not all(isinstance(config[k], str) for k in ("method", "sides", "targets")):
        raise ValueError(f"component {comp!r}: config must be {{method, n_blocks (int ≥ 1), sides, targets}}, "
                         f"got {json.dumps(config)[:200]}")
    try:
        parsed = AdapterConfig(**config)
    except (AdapterFileError, ValueError) as exc:
        raise ValueError(f"component {comp!r}: {exc}") from None
    if not meta["layers"]:
        raise ValueError(f"component {comp!r} lists no layers")
    for layer, sizes in meta["layers"].items():
        if not (isinstance(sizes, list) and len(sizes) == 2 and all(_is_int(v, 1, MAX_WIDTH) for v in sizes)):
            raise ValueError(f"{comp} layer {layer!r}: sizes must be [in, out] positive integers, got "
                             f"{json.dumps(sizes)[:80]}")
        try:
            check_blocks(parsed, sizes[0], sizes[1], f"{comp}.{layer}")
        except EtherError as exc:
            raise ValueError(str(exc)) from None
    for key in ("fingerprint", "weight_hash"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise ValueError(f"component {comp!r}: {key} must be a string")
    return parsed


def _check_control(control) -> None:
    if not isinstance(control, dict) or not isinstance(control.get("kind"), str) \
            or not isinstance(control.get("encoder"), dict):
        raise ValueError("malformed control metadata (needs 'kind' and 'encoder')")
    enc = control["encoder"]
    blocks = enc.get("block_out_channels")
    if not (_is_int(enc.get("conditioning_embedding_channels"), 1, 8192)
            and _is_int(enc.get("conditioning_channels", 3), 1, 16)
            and isinstance(blocks, list) and 1 <= len(blocks) <= 8 and all(_is_int(b, 1, 4096) for b in blocks)):
        raise ValueError(f"malformed control encoder config {json.dumps(enc)[:200]}")
    if enc.get("injection", "conv_in") == "multiscale":
        levels, factors = enc.get("level_channels"), enc.get("level_factors")
        if not (isinstance(levels, list) and isinstance(factors, list) and 1 <= len(levels) == len(factors) <= 8
                and all(_is_int(c, 1, 8192) for c in levels) and all(_is_int(f, 1, 256) for f in factors)):
            raise ValueError(f"malformed multiscale control encoder config {json.dumps(enc)[:200]}")
    elif enc.get("injection", "conv_in") != "conv_in":
        raise ValueError(f"unknown control injection {enc.get('injection')!r}")


def parse_metadata(raw: str) -> dict:
    """The `ether_diffusion` JSON, schema-checked (types, ranges, block counts). Raises ValueError."""
    try:
        meta = json.loads(raw)
    except RecursionError:
        raise ValueError("adapter metadata is nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"adapter metadata is not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"adapter metadata must be a JSON object, not {type(meta).__name__}")
    if meta.get("format") != FORMAT_NAME:
        raise ValueError(f"unknown format {meta.get('format')!r}, expected {FORMAT_NAME!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"format version {meta.get('format_version')!r} is not supported (this ether-diffusion "
                         f"reads version {FORMAT_VERSION}); upgrade ether-diffusion")
    if not isinstance(meta.get("components"), dict):
        raise ValueError("adapter metadata needs a 'components' object")
    if meta.get("name") is not None and not isinstance(meta["name"], str):
        raise ValueError("adapter metadata 'name' must be a string")
    for comp, comp_meta in meta["components"].items():
        _check_component(comp, comp_meta)
    if meta.get("control") is not None:
        _check_control(meta["control"])
    elif not meta["components"]:
        raise ValueError("the adapter holds neither ETHER vectors nor a control encoder")
    return meta


def _expected_tensors(meta: dict) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape that the metadata implies for the ETHER vectors."""
    out = {}
    for comp, comp_meta in meta["components"].items():
        config = AdapterConfig(**comp_meta["config"])
        vectors = [f"u_{s}" for s in config.side_list] + ([f"v_{s}" for s in config.side_list] if config.spec.has_v else [])
        for layer, (in_f, out_f) in comp_meta["layers"].items():
            for vec in vectors:
                out[f"{comp}.{layer}.{vec}"] = (in_f if vec.endswith("input") else out_f,)
    return out


def _expected_encoder_tensors(control: dict) -> dict[str, tuple[int, ...]]:
    """The control encoder's parameter shapes, from a model built on the meta device (no memory)."""
    with torch.device("meta"):
        encoder = build_encoder(control["encoder"])
    return {f"{EXTRA_PREFIX}{CONTROL_MODULE}.{k}": tuple(v.shape) for k, v in encoder.state_dict().items()}


def read_adapter_file(path: str | Path) -> AdapterFile:
    """Open and validate an adapter file on its own: size, metadata, tensor table, checksum, values."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"adapter file not found: {path}")
    size, cap = path.stat().st_size, max_adapter_bytes()
    if size > cap:
        raise AdapterFileError(f"{path} is {size / 2**20:.1f} MB, above the {cap / 2**20:.0f} MB limit for adapter "
                               f"files (set {MAX_SIZE_ENV} to raise it)")
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw_meta = fh.metadata() or {}
            if METADATA_KEY not in raw_meta:
                raise AdapterFileError(f"{path} is a safetensors file but not an ether-diffusion adapter (no metadata)")
            try:
                meta = parse_metadata(raw_meta[METADATA_KEY])
                expected = _expected_tensors(meta)
                if meta.get("control") is not None:
                    expected.update(_expected_encoder_tensors(meta["control"]))
            except (ValueError, TypeError, KeyError, RuntimeError) as exc:
                raise AdapterFileError(f"{path}: {exc}") from None
            slices = {k: fh.get_slice(k) for k in fh.keys()}
            table = {k: (tuple(s.get_shape()), s.get_dtype()) for k, s in slices.items()}
            _check_table(path, table, expected)
            tensors = {k: fh.get_tensor(k) for k in table}
    except AdapterFileError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError, OverflowError) as exc:
        raise AdapterFileError(f"{path} is not a readable safetensors file (truncated or corrupt?): "
                               f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if CHECKSUM_KEY in raw_meta and content_checksum(raw_meta[METADATA_KEY], tensors) != raw_meta[CHECKSUM_KEY]:
        raise AdapterFileError(f"{path}: checksum mismatch: the file was changed or damaged after it was written")
    for key, value in tensors.items():
        if not torch.isfinite(value).all():
            raise AdapterFileError(f"{path}: tensor {key} contains NaN or infinite values")
    return AdapterFile(path, meta, tensors)


def _check_table(path: Path, table: dict[str, tuple[tuple[int, ...], str]], expected: dict[str, tuple[int, ...]]) -> None:
    """Tensor names, shapes and dtypes from the header against what the metadata implies."""
    if set(table) != set(expected):
        missing, extra = sorted(set(expected) - set(table)), sorted(set(table) - set(expected))
        raise AdapterFileError(f"{path}: tensors do not match the metadata; missing {missing[:3]}"
                               f"{' …' if len(missing) > 3 else ''} ({len(missing)}), unexpected {extra[:3]} ({len(extra)})")
    for key, (shape, dtype) in sorted(table.items()):
        if shape != expected[key]:
            raise AdapterFileError(f"{path}: tensor {key} has shape {shape}, metadata says {expected[key]}")
        if dtype != "F32":
            raise AdapterFileError(f"{path}: tensor {key} is {dtype}; adapter tensors are float32 (F32)")


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
        encoder = adapter.control["encoder"]
        if encoder.get("injection") == "multiscale":
            want = list(zip(encoder["level_channels"], encoder["level_factors"]))
            have = list(zip(unet.config.block_out_channels, down_block_factors(unet)))
            if want != have:
                raise AdapterFileError(f"{adapter.path} was made for another base model: its multiscale control "
                                       f"encoder feeds down blocks of (width, scale) {want}, this UNet has {have}")
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
    grad_flags = {comp: [p.requires_grad for p in components[comp].parameters()] for comp in adapter.components}
    attached: list[str] = []
    try:
        for comp in adapter.components:
            add_adapter(components[comp], name, adapter.config(comp),
                        layer_names=list(resolve_layers(adapter, comp, components[comp])))
            attached.append(comp)
        copy_vectors(adapter, components, name)
        if encoder is not None:
            attach_control(components["unet"], name, encoder, adapter.control.get("kind", "other"))
    except BaseException:  # leave every model exactly as it was: wrappers, adapters and gradient flags
        for comp in attached:
            delete_adapter(components[comp], name)
        for comp, flags in grad_flags.items():
            for p, flag in zip(components[comp].parameters(), flags):
                p.requires_grad_(flag)
        raise
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

