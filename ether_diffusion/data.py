"""Instance / class image folders: reading, validation, caption sidecars and the training transform."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import EtherError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


@dataclass
class Example:
    """One training picture (already RGB) with its caption."""

    path: Path
    image: Image.Image
    caption: str


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB whatever the mode: EXIF orientation applied, alpha composited on white, 16-bit and CMYK converted."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: scale to 8 bits, not clip
        arr = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if arr.max() > 255 else 255.0
        image = Image.fromarray(np.clip(arr / peak * 255.0, 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


UNREADABLE = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def open_rgb(path: Path) -> Image.Image:
    """The picture as RGB; raises one of UNREADABLE when it cannot be read (or is a decompression bomb)."""
    with Image.open(path) as im:
        im.load()
        return to_rgb(im)


def read_image(path: Path) -> Image.Image | None:
    """The picture as RGB, or None (with a warning naming the file) when it cannot be read."""
    try:
        return open_rgb(path)
    except UNREADABLE as exc:
        warnings.warn(f"skipping {path}: not a readable image ({exc})", stacklevel=2)
        return None


def load_folder(folder: str | Path, default_caption: str, what: str = "instance") -> list[Example]:
    """Every readable image in a folder (sorted), with `name.txt` sidecar captions where present.

    Unreadable and non-image files are skipped with a warning each; no usable image is an error.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise EtherError(f"{what} folder not found: {folder}")
    examples = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in (".txt", ".json") or path.name.startswith(".") or path.is_dir():  # captions, manifests
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            warnings.warn(f"skipping {path}: not an image file (expected {', '.join(sorted(IMAGE_SUFFIXES))})",
                          stacklevel=2)
            continue
        image = read_image(path)
        if image is None:
            continue
        sidecar = path.with_suffix(".txt")
        caption = sidecar.read_text().strip() if sidecar.is_file() else default_caption
        examples.append(Example(path, image, caption or default_caption))
    if not examples:
        raise EtherError(f"no usable images in {what} folder {folder} (jpg, png or webp)")
    return examples


def check_resolution(resolution: int, multiple: int = 8) -> None:
    if resolution <= 0 or resolution % multiple:
        raise EtherError(f"resolution must be a positive multiple of {multiple}, got {resolution}")


def prepare(image: Image.Image, resolution: int, *, center_crop: bool, flip: bool,
            generator: torch.Generator, resample: Image.Resampling = Image.Resampling.BICUBIC) -> torch.Tensor:
    """Resize the short side to `resolution`, crop a square (centre or random), optionally flip: (3, R, R) in [-1, 1]."""
    w, h = image.size
    scale = resolution / min(w, h)
    image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), resample)
    w, h = image.size
    if center_crop:
        left, top = (w - resolution) // 2, (h - resolution) // 2
    else:
        left = int(torch.randint(0, w - resolution + 1, (1,), generator=generator))
        top = int(torch.randint(0, h - resolution + 1, (1,), generator=generator))
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip and bool(torch.rand(1, generator=generator) < 0.5):
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image_to_tensor(image)


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB picture as a 3×H×W float tensor in [-1, 1], the range the VAE encodes and decodes."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@dataclass
class ControlExample:
    """One control training row: target picture, control picture (same size) and caption."""

    image: Image.Image
    control: Image.Image
    caption: str


CONTROL_COLUMNS = ("image", "conditioning_image", "text")


def _control_row(folder: Path, line: str) -> tuple[ControlExample | None, str | None]:
    """One metadata.jsonl line → (example, None) or (None, what is wrong with it)."""
    import json

    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON ({exc.msg})"
    except RecursionError:
        return None, "JSON nested too deeply"
    if not isinstance(row, dict) or any(not isinstance(row.get(k), str) for k in CONTROL_COLUMNS):
        return None, f"needs string fields {', '.join(CONTROL_COLUMNS)}"
    pictures = []
    for key in CONTROL_COLUMNS[:2]:
        path = folder / row[key]
        if not path.is_file():
            return None, f"{key} file not found: {row[key]}"
        try:
            pictures.append(open_rgb(path))
        except UNREADABLE:
            return None, f"{key} is not a readable image (or too large): {row[key]}"
    if pictures[0].size != pictures[1].size:
        return None, f"image is {pictures[0].size[0]}×{pictures[0].size[1]} but conditioning_image is " \
                     f"{pictures[1].size[0]}×{pictures[1].size[1]}"
    return ControlExample(pictures[0], pictures[1], row["text"]), None


def load_control_folder(folder: str | Path) -> list[ControlExample]:
    """Rows of `folder/metadata.jsonl` ({"image", "conditioning_image", "text"}, paths relative to the folder;
    diffusers' ControlNet convention). Every row is checked first; bad rows are reported by line number."""
    folder = Path(folder)
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        raise EtherError(f"no metadata.jsonl in {folder} (one JSON object per line: "
                         f'{{"image": …, "conditioning_image": …, "text": …}})')
    examples, problems = [], []
    for number, raw in enumerate(meta.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            problems.append(f"row {number}: not UTF-8 text")
            continue
        if not line.strip():
            continue
        example, problem = _control_row(folder, line)
        if problem:
            problems.append(f"row {number}: {problem}")
        else:
            examples.append(example)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; … ({len(problems)} bad rows in all)" if len(problems) > 5 else "")
        raise EtherError(f"{meta} has bad rows, fix them before training: {shown}")
    if not examples:
        raise EtherError(f"{meta} has no rows")
    return examples


def _cell_image(value, column: str, row: int) -> Image.Image:
    """A dataset cell as an RGB picture; EtherError naming the row and column when it is none."""
    if isinstance(value, Image.Image):
        return to_rgb(value)
    if value is None:
        raise EtherError(f"row {row}: column {column!r} is empty")
    raise EtherError(f"row {row}: column {column!r} is not an image (a {type(value).__name__}); give an image "
                     "column (datasets' Image feature, or *_file_name in an imagefolder's metadata.jsonl)")


def _cell_text(value, column: str, row: int) -> str:
    if not isinstance(value, str):
        raise EtherError(f"row {row}: column {column!r} is not text (a {type(value).__name__})")
    return value


def _check_imagefolder_files(folder: Path) -> None:
    """A local imagefolder's metadata.jsonl rows name files that exist: the missing one is named by its row before
    `datasets` fails on it with a stack of its own."""
    import json

    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        return
    for number, line in enumerate(meta.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        try:
            entry = json.loads(line) if line.strip() else {}
        except json.JSONDecodeError as exc:
            raise EtherError(f"{meta} row {number}: not valid JSON ({exc.msg})") from None
        for key, value in (entry.items() if isinstance(entry, dict) else ()):
            if key.endswith("file_name") and isinstance(value, str) and not (folder / value).is_file():
                raise EtherError(f"{meta} row {number}: {key} file not found: {value}")


def load_dataset_table(name: str, columns: list[str]):
    """The `train` split of a dataset `datasets.load_dataset` reads (a hub id, or a local folder such as an
    imagefolder with metadata.jsonl), after checking it has `columns`; one-line EtherErrors otherwise."""
    try:
        import datasets
    except ImportError:
        raise EtherError("--dataset-name needs the datasets library: pip install 'ether-diffusion[datasets]'") from None
    if Path(name).is_dir():
        _check_imagefolder_files(Path(name))
    try:
        table = datasets.load_dataset(name, split="train")
    except Exception as exc:  # an unreachable hub, a folder datasets cannot read, a bad file: one sentence
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise EtherError(f"cannot load dataset {name!r}: {detail}") from None
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise EtherError(f"dataset {name!r} has no column {missing[0]!r} (its columns: "
                         f"{', '.join(table.column_names)})")
    return table


def load_dataset_examples(name: str, image_column: str, caption_column: str | None,
                          default_caption: str) -> list[Example]:
    """Training pictures from a dataset (diffusers' `--dataset_name` / `--image_column` / `--caption_column`): each
    row's caption from `caption_column`, or `default_caption` (the instance prompt) when it is None."""
    table = load_dataset_table(name, [image_column, *([caption_column] if caption_column else [])])
    examples = []
    for number, row in enumerate(table, start=1):
        image = _cell_image(row[image_column], image_column, number)
        caption = _cell_text(row[caption_column], caption_column, number) if caption_column else default_caption
        examples.append(Example(Path(f"{name}#{number}"), image, caption.strip() or default_caption))
    if not examples:
        raise EtherError(f"dataset {name!r} has no rows")
    return examples


def load_control_dataset(name: str, image_column: str, conditioning_image_column: str,
                         caption_column: str) -> list[ControlExample]:
    """Control rows from a dataset (diffusers' ControlNet script's `--conditioning_image_column` and friends)."""
    table = load_dataset_table(name, [image_column, conditioning_image_column, caption_column])
    examples = []
    for number, row in enumerate(table, start=1):
        image = _cell_image(row[image_column], image_column, number)
        control = _cell_image(row[conditioning_image_column], conditioning_image_column, number)
        if image.size != control.size:
            raise EtherError(f"row {number}: {image_column} is {image.size[0]}×{image.size[1]} but "
                             f"{conditioning_image_column} is {control.size[0]}×{control.size[1]}")
        examples.append(ControlExample(image, control, _cell_text(row[caption_column], caption_column, number)))
    if not examples:
        raise EtherError(f"dataset {name!r} has no rows")
    return examples
