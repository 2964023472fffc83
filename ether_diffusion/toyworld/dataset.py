"""The toy world's three datasets written to disk, in the forms the ecosystem trains from (`ether-diffusion data
render`): a subject's instance pictures (what the demo trains on), control pairs (picture + segmentation or edge
map + caption) and base-model pictures with their training captions.

Two layouts: `imagefolder` (pictures beside a `metadata.jsonl` of `file_name` / `text` rows, plus
`conditioning_image_file_name` for control pairs; `datasets.load_dataset(DIR)` reads it, so `--dataset-name DIR`
trains from it) or `folder` (pictures with `.txt` caption sidecars for `--instance-dir`; for control pairs the
`metadata.jsonl` of `image` / `conditioning_image` / `text` rows that `--data-dir` reads).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..atomic import atomic_write, atomic_write_text
from . import world
from .subjects import get_subject
from .control_data import RENDERERS, control_scenes, write_control_dataset

KINDS = ("subject", "control", "base")
LAYOUTS = ("imagefolder", "folder")
# the user's "photos": both sizes on white and gray only (black is left for new contexts, as the demo's prompts use)
INSTANCE_CONTEXTS = (("large", "white"), ("small", "white"), ("large", "gray"), ("small", "gray"))


@dataclass
class Row:
    """One picture of a dataset: its file stem, the picture, its caption and (control pairs) its map."""

    name: str
    image: Image.Image
    caption: str
    control: Image.Image | None = None


def subject_rows(subject: str, n: int = 5, seed: int = 0, token: str = "sks") -> list[Row]:
    """A subject at both sizes, at seeded places, on white and gray, each captioned with the token where the colours
    go and the size and background it shows ("a large sks striped circle on a white background")."""
    spec = get_subject(subject)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        size, background = INSTANCE_CONTEXTS[i % len(INSTANCE_CONTEXTS)]
        scene = world.subject_scene(rng, spec, background=background, size=size)
        rows.append(Row(f"{spec.name}-{i}", world.render(scene), world.caption(scene, token=token)))
    return rows


def base_rows(n: int, seed: int = 0) -> list[Row]:
    """Base-world scenes (held-out subject combinations never occur) with the captions base training uses."""
    rng = random.Random(seed)
    scenes = [world.random_world_scene(rng) for _ in range(n)]
    return [Row(f"{i:05d}", world.render(s), world.base_caption_for_training(rng, s)) for i, s in enumerate(scenes)]


def control_rows(kind: str, n: int, seed: int = 0) -> list[Row]:
    """Scenes with their `kind` map (segmentation or edges) and full caption, as `train control` learns from."""
    render_map = RENDERERS[kind]
    return [Row(f"{i:05d}", world.render(s), world.caption(s), render_map(s)) for i, s in
            enumerate(control_scenes(n, seed))]


def _save_png(path: Path, image: Image.Image) -> None:
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def write_imagefolder(rows: list[Row], out: Path) -> Path:
    """Pictures, maps under `conditioning/`, and `metadata.jsonl` in row order; returns the metadata path."""
    lines = []
    for row in rows:
        entry = {"file_name": f"{row.name}.png", "text": row.caption}
        _save_png(out / entry["file_name"], row.image)
        if row.control is not None:
            entry["conditioning_image_file_name"] = f"conditioning/{row.name}.png"
            _save_png(out / entry["conditioning_image_file_name"], row.control)
        lines.append(json.dumps(entry))
    return atomic_write_text(out / "metadata.jsonl", "\n".join(lines) + "\n")


def write_caption_folder(rows: list[Row], out: Path) -> Path:
    """Pictures with `.txt` caption sidecars (the kohya / `--instance-dir` form); returns the folder."""
    for row in rows:
        _save_png(out / f"{row.name}.png", row.image)
        atomic_write_text(out / f"{row.name}.txt", row.caption + "\n")
    return out


def render_dataset(kind: str, out: str | Path, *, n: int | None = None, seed: int = 0, subject: str = "core-triangle",
                   control_kind: str = "segmentation", layout: str = "imagefolder", token: str = "sks") -> Path:
    """Write one toy-world dataset to `out`; returns the file or folder a trainer is pointed at."""
    out = Path(out)
    if layout == "folder" and kind == "control":
        return write_control_dataset(out, control_kind, n or 200, seed)
    rows = {"subject": lambda: subject_rows(subject, n or 5, seed, token),
            "base": lambda: base_rows(n or 200, seed),
            "control": lambda: control_rows(control_kind, n or 200, seed)}[kind]()
    return write_imagefolder(rows, out) if layout == "imagefolder" else write_caption_folder(rows, out)
