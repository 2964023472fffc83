"""Reads a toy-world picture and says what it shows: the toy world's stand-in for DINO / CLIP scores.

It needs no learned weights: background = median of the border, object = pixels far from it, colour = nearest
palette entry of the object's interior, shape = best IoU among ideal shapes fitted to the object's bounding box,
size = bounding-box extent. Subject fidelity compares the palette-quantised object against the subject's
reference pattern, so a plain red circle scores about 0.5 against a red/yellow striped one, a blue circle 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .world import (
    BACKGROUNDS,
    IMAGE_SIZE,
    OBJECT_COLOURS,
    SHAPES,
    SIZE_THRESHOLD,
    SUBJECTS,
    Scene,
    erode,
    object_colour_field,
    shape_mask,
)

OBJECT_DISTANCE = 60.0  # RGB distance from the background that counts as "object"
MIN_OBJECT_PIXELS = 12
SUBJECT_MATCH = 0.75  # subject similarity at or above this counts as "the subject is there"


@dataclass(frozen=True)
class Reading:
    """What the checker sees. `shape` / `colour` / `size` are None when no object is found."""

    background: str
    colour: str | None
    shape: str | None
    size: str | None
    shape_iou: float
    mask: np.ndarray

    def matches(self, scene: Scene) -> dict[str, bool]:
        return {
            "background": self.background == scene.background,
            "colour": self.colour == scene.colour,
            "shape": self.shape == scene.shape,
            "size": self.size == scene.size,
        }


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    dists = [float(np.linalg.norm(rgb - np.array(palette[n], np.float32))) for n in names]
    return names[int(np.argmin(dists))]


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
        if image.size != (IMAGE_SIZE, IMAGE_SIZE):
            image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
        image = np.asarray(image)
    return image.astype(np.float32)


def _bbox(mask: np.ndarray) -> tuple[float, float, float]:
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    return (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) / 2


def read(image: Image.Image | np.ndarray) -> Reading:
    """Background, object colour, shape and size of a 64×64 toy-world picture."""
    rgb = _as_array(image)
    border = np.concatenate([rgb[:2].reshape(-1, 3), rgb[-2:].reshape(-1, 3), rgb[:, :2].reshape(-1, 3),
                             rgb[:, -2:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    background = _nearest(bg_rgb, BACKGROUNDS)
    mask = np.linalg.norm(rgb - bg_rgb, axis=-1) > OBJECT_DISTANCE
    if mask.sum() < MIN_OBJECT_PIXELS:
        return Reading(background, None, None, None, 0.0, mask)
    cx, cy, r = _bbox(mask)
    ious = {}
    for shape in SHAPES:
        ideal = shape_mask(shape, cx, cy, r) >= 0.5
        ious[shape] = float((ideal & mask).sum() / max((ideal | mask).sum(), 1))
    shape = max(ious, key=ious.get)
    interior = mask & erode(mask)
    pixels = rgb[interior] if interior.sum() >= MIN_OBJECT_PIXELS // 2 else rgb[mask]
    colour = _nearest(np.median(pixels, axis=0), OBJECT_COLOURS)
    size = "small" if r < SIZE_THRESHOLD else "large"
    return Reading(background, colour, shape, size, ious[shape], mask)


def subject_similarity(image: Image.Image | np.ndarray, subject: str) -> float:
    """Fraction of the object's pixels whose palette colour matches the subject's pattern at that place (0–1).

    The subject's reference is rendered into the object's own bounding box, so position and size do not matter,
    only the look. No object found scores 0.
    """
    spec = SUBJECTS[subject]
    rgb = _as_array(image)
    reading = read(rgb)
    if reading.shape is None:
        return 0.0
    cx, cy, r = _bbox(reading.mask)
    reference = Scene(spec.shape, spec.colours, reading.background, "large", cx, cy, r, spec.pattern, subject)
    ref_mask = shape_mask(spec.shape, cx, cy, r) >= 0.5
    region = ref_mask & erode(reading.mask)  # anti-aliased rims blend two colours: judge the interior
    if region.sum() == 0:
        return 0.0
    names = list(OBJECT_COLOURS)
    palette = np.array([OBJECT_COLOURS[n] for n in names], np.float32)
    got = np.argmin(np.linalg.norm(rgb[region][:, None] - palette[None], axis=-1), axis=1)
    want = np.argmin(np.linalg.norm(object_colour_field(reference)[region][:, None] - palette[None], axis=-1), axis=1)
    agreement = float((got == want).mean())
    coverage = float((ref_mask & reading.mask).sum() / max((ref_mask | reading.mask).sum(), 1))
    return agreement * coverage
