"""The model side of the app: one base pipeline, a library of adapter files, serialised generation.

Everything here goes through the library API (load_ether_weights, set_ether_adapters, generate), so the app adds
no second implementation of loading, strength or sampling. Switching adapters or strengths only changes the
active set in place: the base model is loaded once.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from . import bases
from .adapter_file import check_base, read_adapter_file
from .atomic import atomic_write
from .control import needed_control
from .errors import EtherError
from .ether import SWEEP_STRENGTHS
from .pipelines import (
    adapter_file_info,
    delete_ether_adapters,
    disable_ether,
    enable_ether,
    generate,
    get_list_ether_adapters,
    load_ether_weights,
    pipeline_components,
    schedulers_for,
    set_ether_adapters,
    set_scheduler,
)

LIMITS = {"steps": (1, 100), "guidance": (0.0, 30.0), "strength": (-2.0, 3.0), "num_images": (1, 8)}


def clamp(name: str, value: float) -> float:
    lo, hi = LIMITS[name]
    return min(max(value, lo), hi)


@dataclass(frozen=True)
class Request:
    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 20
    guidance: float = 7.5
    num_images: int = 1
    scheduler: str = "DPM++ 2M"
    size: int | None = None
    mode: str = "single"  # single | compare | sweep
    control_image: Image.Image | None = field(default=None, compare=False, repr=False)  # for control adapters


class Studio:
    """Serves images from one base pipeline with any combination of adapter files at any strengths."""

    def __init__(self, pipe, adapters_dir: str | Path, uploads_dir: str | Path | None = None):
        self.pipe = pipe
        self.adapters_dir = Path(adapters_dir)
        self.uploads_dir = Path(uploads_dir) if uploads_dir else self.adapters_dir / "uploads"
        self.lock = threading.RLock()  # one request at a time: the active set is shared state
        # file → (internal adapter name, file version, listed name); the listed name is what messages show
        self._loaded: dict[Path, tuple[str, tuple[int, int], str]] = {}
        self._counter = 0
        self.native_size = bases.default_resolution(pipe)
        self.size_multiple = bases.size_multiple(pipe)
        self.schedulers = schedulers_for(pipe)  # only the solvers that fit the base

    # -- adapter library --------------------------------------------------------------------------------------

    def list_adapters(self) -> list[str]:
        """Adapter files under the adapters folder (uploads included), as names relative to it.

        Skipped: hidden paths (in-progress `.checkpoint-N.tmp/` folders, temporary files) and links that lead
        outside the folder (a bad link never stops the app; it is just not offered).
        """
        roots = [self.adapters_dir] + ([self.uploads_dir] if not self._inside(self.uploads_dir) else [])
        found = []
        for root in roots:
            if not root.is_dir():
                continue
            for path in sorted(root.rglob("*.safetensors")):
                relative = path.relative_to(root)
                if any(part.startswith(".") for part in relative.parts) or ".tmp" in path.name:
                    continue
                name = self._name(path)
                if name is not None:
                    found.append(name)
        return found

    def _inside(self, path: Path, root: Path | None = None) -> bool:
        try:
            path.resolve().relative_to((root or self.adapters_dir).resolve())
            return True
        except (ValueError, OSError, RuntimeError):  # outside, or a broken / looping link
            return False

    def _name(self, path: Path) -> str | None:
        """The listed name of a file, or None when it (or the link it is) resolves outside both folders."""
        if self._inside(path):
            return str(path.resolve().relative_to(self.adapters_dir.resolve()))
        if self._inside(path, self.uploads_dir):
            return "uploads/" + str(path.resolve().relative_to(self.uploads_dir.resolve()))
        return None

    def resolve(self, name: str) -> Path:
        """A listed name → its path; anything else (absolute paths, '..') is refused."""
        if name not in self.list_adapters():
            raise EtherError(f"no adapter named {name!r} in {self.adapters_dir}")
        if name.startswith("uploads/") and not self._inside(self.uploads_dir):
            return self.uploads_dir / name[len("uploads/"):]
        return self.adapters_dir / name

    def add_upload(self, path: str | Path) -> str:
        """Validate an uploaded file against the base, then keep a copy in the uploads folder, written atomically
        under a name that starts with its content hash: two uploads called `ether_adapter.safetensors` never
        overwrite each other, and the same file uploaded twice is kept once."""
        path = Path(path)
        parsed = read_adapter_file(path)
        check_base(parsed, pipeline_components(self.pipe))
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in path.stem).lstrip(".") or "adapter"
        target = self.uploads_dir / f"{digest}-{stem}.safetensors"
        if not target.exists():
            atomic_write(target, lambda tmp: shutil.copyfile(path, tmp))
        return self._name(target)

    def ensure_loaded(self, name: str) -> str:
        """The pipeline's adapter name for a listed file, loading (and validating) it on first use and again
        whenever the file changed since (a retrained adapter written to the same place)."""
        path = self.resolve(name).resolve()
        stat = path.stat()
        version = (stat.st_mtime_ns, stat.st_size)
        with self.lock:  # check and load under one lock: two requests never load the same file twice
            cached = self._loaded.get(path)
            if cached is not None and cached[1] == version:
                return cached[0]
            if cached is not None:
                delete_ether_adapters(self.pipe, cached[0])
            internal = f"a{self._counter}"
            self._counter += 1
            load_ether_weights(self.pipe, path, adapter_name=internal)
            self._loaded[path] = (internal, version, name)
            return internal

    def public_message(self, message: str) -> str:
        """An error message with internal adapter names ('a3') replaced by the file names the user picked."""
        for internal, _, name in self._loaded.values():
            message = re.sub(rf"(?<![\w/]){re.escape(internal)}(?![\w.])", name, message)
        return message

    def describe(self, name: str) -> dict:
        parsed = adapter_file_info(self.pipe, self.ensure_loaded(name))
        meta = parsed.metadata
        denoiser = next((meta["components"][c] for c in bases.DENOISER_NAMES if c in meta["components"]), {})
        config = denoiser.get("config", {})
        return {"trigger": meta.get("instance_prompt") or "", "method": config.get("method"),
                "n_blocks": config.get("n_blocks"), "parameters": parsed.num_parameters,
                "base_model": meta.get("base_model"), "components": sorted(meta["components"]),
                "control": (parsed.control or {}).get("kind")}

    def sweep_strengths(self, adapter_name: str) -> tuple[float, ...]:
        """Strengths a sweep shows for a loaded adapter: ETHER's skip the singular s = 0.5 (see `ether`)."""
        configs = adapter_file_info(self.pipe, adapter_name).metadata["components"].values()
        methods = {c["config"]["method"] for c in configs}
        return SWEEP_STRENGTHS["ether" if methods == {"ether"} else "etherplus"]

    # -- generation -------------------------------------------------------------------------------------------

    def _activate(self, adapters: list[tuple[str, float]]) -> list[str]:
        names = [self.ensure_loaded(n) for n, _ in adapters]
        all_loaded = sorted({n for v in get_list_ether_adapters(self.pipe).values() for n in v})
        strengths = dict.fromkeys(all_loaded, 0.0)
        strengths.update({a: clamp("strength", s) for a, (_, s) in zip(names, adapters)})
        if all_loaded:
            set_ether_adapters(self.pipe, list(strengths), list(strengths.values()))
        return names

    def _draw(self, req: Request, seed: int) -> list[Image.Image]:
        size = req.size or self.native_size
        if size % self.size_multiple:
            raise EtherError(f"size must be a multiple of {self.size_multiple}, got {size}")
        hint = req.control_image if needed_control(bases.denoiser(self.pipe)) else None  # the base side of compare has none
        return generate(self.pipe, req.prompt, negative_prompt=req.negative_prompt or None, seed=seed,
                        steps=int(clamp("steps", req.steps)), guidance=clamp("guidance", req.guidance),
                        num_images=int(clamp("num_images", req.num_images)), height=size, width=size,
                        control_image=hint)

    def run(self, req: Request, adapters: list[tuple[str, float]]) -> list[tuple[Image.Image, str]]:
        """Images with captions for a request; the whole call holds the model lock (one request at a time).
        Errors name adapters by the file names the user picked."""
        try:
            return self._run(req, adapters)
        except EtherError as exc:
            raise EtherError(self.public_message(str(exc))) from None

    def _run(self, req: Request, adapters: list[tuple[str, float]]) -> list[tuple[Image.Image, str]]:
        if not req.prompt.strip():
            raise EtherError("the prompt is empty")
        with self.lock:
            set_scheduler(self.pipe, req.scheduler)  # first: an unknown name changes nothing
            names = self._activate(adapters) if adapters else []
            if not names:
                disable_ether(self.pipe)
                try:
                    return [(im, f"base, seed {req.seed}") for im in self._draw(req, req.seed)]
                finally:
                    enable_ether(self.pipe)
            label = " + ".join(f"{n}@{s:g}" for n, s in adapters)
            if req.mode == "compare":
                adapted = self._draw(req, req.seed)
                disable_ether(self.pipe)
                try:
                    base = self._draw(req, req.seed)
                finally:
                    enable_ether(self.pipe)
                return [x for pair in zip(base, adapted) for x in ((pair[0], "base"), (pair[1], label))]
            if req.mode == "sweep":
                out = []
                first = names[0]
                for s in self.sweep_strengths(first):
                    strengths = {a: clamp("strength", st) for a, (_, st) in zip(names, adapters)}
                    strengths[first] = s
                    set_ether_adapters(self.pipe, list(strengths), list(strengths.values()))
                    out.append((self._draw(Request(**{**req.__dict__, "num_images": 1}), req.seed)[0],
                                f"{adapters[0][0]}@{s:g}"))
                return out
            return [(im, label) for im in self._draw(req, req.seed)]
