"""Load a base pipeline (embedded default, local folder, hub id), attach adapter files, generate images.

The pipeline-level verbs are named after diffusers' LoRA verbs (`load_lora_weights` → `load_ether_weights`,
`set_adapters` → `set_ether_adapters`, `fuse_lora` → `fuse_ether`, …) and take the pipeline as first argument.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from . import bases, control, inject
from .adapter_file import AdapterFile, load_adapter, save_adapter
from .errors import EtherError
from .toyworld.base_model import EMBEDDED_MODEL_DIR

EMBEDDED_NAME = "embedded"
SCHEDULERS = {  # the names A1111 / ComfyUI users know → diffusers' classes
    "DPM++ 2M": "DPMSolverMultistepScheduler",
    "DDIM": "DDIMScheduler",
    "Euler": "EulerDiscreteScheduler",
    "Euler a": "EulerAncestralDiscreteScheduler",
    "PNDM": "PNDMScheduler",
    "FlowMatch Euler": "FlowMatchEulerDiscreteScheduler",  # the solver FLUX.1 and SD3 ship with
}
FLOW_MATCHING_SCHEDULERS = ("FlowMatch Euler",)


def describe_base(base: str | None) -> str:
    """The base as recorded in adapter metadata: 'embedded' or the path / hub id given."""
    return EMBEDDED_NAME if base in (None, "", EMBEDDED_NAME) else str(base)


def _load_from(source: str, dtype: torch.dtype, offline_only: bool):
    """The pipeline, after its model_index.json (a small file, read first) names a supported family."""
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "1":  # diffusers' own loading bar ignores the hub's switch
        diffusers_logging.disable_progress_bar()
    index = DiffusionPipeline.load_config(source, local_files_only=offline_only)
    bases.check_model_index(index)
    extra = {"safety_checker": None} if "safety_checker" in index else {}
    return DiffusionPipeline.from_pretrained(source, torch_dtype=dtype, local_files_only=offline_only, **extra)


def _pipeline_folder(base: str | None) -> Path | None:
    """The local folder a base loads from: the embedded model, a folder, or a hub id's cached snapshot."""
    base = describe_base(base)
    if base == EMBEDDED_NAME:
        return EMBEDDED_MODEL_DIR
    if Path(base).is_dir():
        return Path(base)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(base, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or not a hub id): the precision is unknown
        return None


def stored_dtype(base: str | None) -> torch.dtype:
    """The precision the base's denoiser weights are stored in (what `save_pretrained` of an unconverted model
    writes back): the first floating tensor in the `unet/` or `transformer/` safetensors header; fp32 if unknown."""
    import struct

    names = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
    folder = _pipeline_folder(base)
    files = sorted(f for sub in ("unet", "transformer") for f in (folder / sub).glob("*.safetensors")) if folder else []
    for file in files:
        with open(file, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        for entry in header.values():
            if isinstance(entry, dict) and entry.get("dtype") in names:
                return names[entry["dtype"]]
    return torch.float32


def load_pipeline(base: str | None = None, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A diffusers pipeline from the embedded default (None / 'embedded'), a local folder or a hub id.

    Errors are one sentence (`EtherError`): missing folder, folder that is not a pipeline, unreachable hub.
    """
    base = describe_base(base)
    if base == EMBEDDED_NAME:
        if not (EMBEDDED_MODEL_DIR / "model_index.json").is_file():
            raise EtherError(f"the embedded base model is missing from {EMBEDDED_MODEL_DIR}; reinstall ether-diffusion")
        pipe = _load_from(str(EMBEDDED_MODEL_DIR), dtype, offline_only=True)
    elif Path(base).exists():
        index = Path(base) / "model_index.json"
        if not index.is_file():
            raise EtherError(f"{base} is not a diffusers pipeline folder (no model_index.json)")
        try:
            json.loads(index.read_text())
        except json.JSONDecodeError:
            raise EtherError(f"{index} is not valid JSON") from None
        try:
            pipe = _load_from(base, dtype, offline_only=True)
        except EtherError:
            raise
        except (OSError, ValueError, EnvironmentError) as exc:
            raise EtherError(f"could not load the pipeline in {base}: {str(exc).splitlines()[0]}") from None
    else:
        if base.count("/") != 1 or base.startswith((".", "/")):
            raise EtherError(f"base model {base!r} is neither an existing folder nor a hub id like 'org/name'")
        try:
            pipe = _load_from(base, dtype, offline_only=os.environ.get("HF_HUB_OFFLINE") == "1")
        except EtherError:
            raise
        except Exception as exc:  # noqa: BLE001 - hub errors come in many types; all mean "not available"
            raise EtherError(f"could not get {base!r} from the Hugging Face hub (offline, unknown id or no access): "
                             f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def pipeline_components(pipe) -> dict[str, nn.Module]:
    """The adaptable models of a pipeline by component name: the denoiser (unet or transformer), then its CLIP
    text encoders (text_encoder[, text_encoder_2]; never a T5)."""
    family = bases.family(pipe)
    return {name: getattr(pipe, name) for name in (family.denoiser, *family.text_encoders)
            if getattr(pipe, name, None) is not None}


def _registry(pipe) -> dict[str, AdapterFile]:
    if not hasattr(pipe, "_ether_files"):
        pipe._ether_files = {}
    return pipe._ether_files


def load_ether_weights(pipe, path: str | Path, adapter_name: str | None = None) -> str:
    """Validate an adapter file against this pipeline and load it (active at strength 1, after those loaded)."""
    name, parsed = load_adapter(path, pipeline_components(pipe), adapter_name)
    _registry(pipe)[name] = parsed
    current = inject.active_adapters(bases.denoiser(pipe))
    set_ether_adapters(pipe, [*current, name], [*current.values(), 1.0])
    return name


def adapter_file_info(pipe, adapter_name: str) -> AdapterFile:
    """The parsed file (metadata included) an adapter was loaded from."""
    try:
        return _registry(pipe)[adapter_name]
    except KeyError:
        raise EtherError(f"no adapter named {adapter_name!r} was loaded from a file") from None


def get_list_ether_adapters(pipe) -> dict[str, list[str]]:
    """Component name → adapter names, like diffusers' `get_list_adapters` (control encoders count as unet)."""
    out = {c: inject.list_adapters(m) for c, m in pipeline_components(pipe).items() if inject.list_adapters(m)}
    encoders = [n for n in control.control_encoders(bases.denoiser(pipe)) if n not in out.get("unet", [])]
    if encoders:
        out["unet"] = [*out.get("unet", []), *encoders]
    return out


def set_ether_adapters(pipe, adapter_names: list[str] | str, adapter_weights: list[float] | float | None = None) -> None:
    """Activate exactly these adapters, in this order, with these strengths (1 = trained, 0 = off)."""
    strengths = inject.strengths_for(adapter_names, adapter_weights)
    known = {n for names in get_list_ether_adapters(pipe).values() for n in names}
    missing = [n for n in strengths if n not in known]
    if missing:
        raise EtherError(f"unknown adapter(s) {missing}; loaded: {sorted(known) or 'none'}")
    for model in pipeline_components(pipe).values():
        inject.set_adapters(model, list(strengths), list(strengths.values()), strict=False)
    control.set_control_strengths(bases.denoiser(pipe), strengths)


def enable_ether(pipe) -> None:
    for model in pipeline_components(pipe).values():
        inject.enable_adapters(model)
    control.enable_control(bases.denoiser(pipe))


def disable_ether(pipe) -> None:
    for model in pipeline_components(pipe).values():
        inject.disable_adapters(model)
    control.enable_control(bases.denoiser(pipe), False)


def fuse_ether(pipe) -> None:
    """Fold the active adapters into the weights: same images, base-model speed. `unfuse_ether` restores."""
    for model in pipeline_components(pipe).values():
        inject.merge_adapters(model)


def unfuse_ether(pipe) -> None:
    for model in pipeline_components(pipe).values():
        inject.unmerge_adapters(model)


def delete_ether_adapters(pipe, adapter_names: list[str] | str) -> None:
    for name in [adapter_names] if isinstance(adapter_names, str) else adapter_names:
        for model in pipeline_components(pipe).values():
            if name in inject.list_adapters(model):
                inject.delete_adapter(model, name)
        control.detach_control(bases.denoiser(pipe), name)
        _registry(pipe).pop(name, None)


def unload_ether_weights(pipe) -> None:
    """Remove every adapter: the pipeline is the plain base again, original weights restored."""
    for model in pipeline_components(pipe).values():
        inject.unload_adapters(model)
    control.detach_control(bases.denoiser(pipe))
    _registry(pipe).clear()


def save_ether_weights(pipe, path: str | Path, adapter_name: str, info: dict | None = None) -> Path:
    return save_adapter(path, pipeline_components(pipe), adapter_name, info=info)


def parse_adapter_arg(arg: str, default_strength: float = 1.0) -> tuple[str, float]:
    """'FILE[:STRENGTH]' → (file, strength); a colon not followed by a number belongs to the path."""
    head, sep, tail = arg.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return arg, default_strength


def schedulers_for(pipe) -> list[str]:
    """The solvers that fit the base: flow-matching ones for FLUX / SD3, the DDPM-family ones for UNet bases."""
    flow = bases.family(pipe).flow_matching
    return [n for n in SCHEDULERS if (n in FLOW_MATCHING_SCHEDULERS) == flow]


def set_scheduler(pipe, name: str) -> None:
    """Sample with another solver (a key of SCHEDULERS), built from the pipeline's own noise schedule (betas,
    prediction type, timestep spacing, flow shift), so only the solver changes, never what the model was trained
    for. A solver of the other kind (DDPM-family on a flow-matching base or back) is refused."""
    if name not in SCHEDULERS:
        raise EtherError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    fitting = schedulers_for(pipe)
    if name not in fitting:
        raise EtherError(f"scheduler {name!r} does not fit this {bases.family(pipe).name.upper()} base; "
                         f"choose one of: {', '.join(fitting)}")
    import diffusers

    pipe.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(pipe.scheduler.config)


def generate(
    pipe,
    prompt: str | list[str],
    *,
    negative_prompt: str | None = None,
    seed: int = 0,
    steps: int = 25,
    guidance: float = 7.5,
    num_images: int = 1,
    height: int | None = None,
    width: int | None = None,
    control_image: Image.Image | list[Image.Image] | None = None,
    control_scale: float = 1.0,
) -> list[Image.Image]:
    """Images for a prompt with the adapters currently active, reproducible from `seed`.

    An active control adapter needs `control_image` (resized to the output size); without an active control
    adapter a control image is an error rather than silently ignored.
    """
    if steps < 1 or steps > 1000:
        raise EtherError(f"steps must be between 1 and 1000, got {steps}")
    needed = control.needed_control(bases.denoiser(pipe))
    if needed and control_image is None:
        raise EtherError("active control adapter(s) need a control image: "
                         + ", ".join(f"{n} ({kind})" for n, kind in needed.items()))
    if control_image is not None and not needed:
        raise EtherError("a control image was given but no control adapter is active")
    native = bases.default_resolution(pipe)
    height, width = height or native, width or native
    image = control.prepare_control_image(control_image, width, height) if control_image is not None else None
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with control.control_image(bases.denoiser(pipe), image, control_scale):
        return pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=guidance,
                    num_images_per_prompt=num_images, height=height, width=width, generator=generator).images


def image_grid(rows: list[list[Image.Image]]) -> Image.Image:
    """Paste rows of equally sized images into one picture."""
    w, h = rows[0][0].size
    grid = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)), "white")
    for y, row in enumerate(rows):
        for x, im in enumerate(row):
            grid.paste(im, (x * w, y * h))
    return grid
