"""Reads a toy-world picture and says what it shows: the toy world's stand-in for DINO / CLIP scores.

It needs no learned weights: background = median of the border, object = pixels far from it, shape = best IoU
among ideal shapes fitted to the object's bounding box, size = bounding-box extent, colours = the one or two
palette colours that cover the object's interior, pattern = the kind whose best-fitting geometry agrees most with
where the second colour lies. Subject fidelity compares the palette-quantised object with the subject's exact
instance rendered into the object's own (fitted) bounding box, colour by colour, so it ignores place and size but
not pattern geometry: a red/yellow striped circle with other bands or another angle scores clearly lower than
the subject, and a plain object in one of its colours at most one half.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .world import (
    BACKGROUNDS,
    IMAGE_SIZE,
    OBJECT_COLOURS,
    PATTERN_WORDS,
    SHAPES,
    SIZE_THRESHOLD,
    Subject,
    as_subject,
    Pattern,
    Scene,
    colour_pair,
    erode,
    object_colour_field,
    pattern_family,
    pattern_secondary,
    shape_mask,
)

OBJECT_DISTANCE = 60.0  # RGB distance from the background that counts as "object"
MIN_OBJECT_PIXELS = 12
SECOND_COLOUR_SHARE = 0.15  # a second palette colour covering less of the interior than this is noise
ATTRIBUTES = ("background", "colour", "pattern", "shape", "size")  # what a reading is scored on
SUBJECT_MATCH = 0.7  # subject similarity at or above this counts as "the subject is there"
PALETTE_NAMES = list(OBJECT_COLOURS)
PALETTE = np.array([OBJECT_COLOURS[n] for n in PALETTE_NAMES], np.float32)


@dataclass(frozen=True)
class Reading:
    """What the checker sees. `shape`, `colours`, `pattern` and `size` are None when no object is found."""

    background: str
    colours: tuple[str, ...] | None
    pattern: str | None
    shape: str | None
    size: str | None
    shape_iou: float
    mask: np.ndarray

    @property
    def colour(self) -> str | None:
        return self.colours[0] if self.colours else None

    def matches(self, scene: Scene) -> dict[str, bool]:
        return {
            "background": self.background == scene.background,
            "colour": self.colours is not None and set(self.colours) == set(scene.colours),
            "pattern": self.pattern == scene.pattern.kind,
            "shape": self.shape == scene.shape,
            "size": self.size == scene.size,
        }


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    dists = [float(np.linalg.norm(rgb - np.array(palette[n], np.float32))) for n in names]
    return names[int(np.argmin(dists))]


def _palette_labels(pixels: np.ndarray) -> np.ndarray:
    """Index of the nearest object colour for each RGB row."""
    return np.argmin(np.linalg.norm(pixels[:, None] - PALETTE[None], axis=-1), axis=1)


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


def _shape_iou(shape: str, box: tuple[float, float, float], mask: np.ndarray) -> float:
    """IoU of the object mask with the ideal `shape` drawn in `box`."""
    ideal = shape_mask(shape, *box) >= 0.5
    return float((ideal & mask).sum() / max((ideal | mask).sum(), 1))


def _fit_box(mask: np.ndarray, shape: str) -> tuple[tuple[float, float, float], float]:
    """The box (cx, cy, r) whose ideal `shape` best overlaps the object, and that IoU. The pixel bounding box
    misses anti-aliased tips (a small diamond's by up to a pixel), so half-pixel shifts and growths are tried."""
    cx, cy, r = _bbox(mask)
    best, best_iou = (cx, cy, r), -1.0
    for dr in (0.0, 0.5, 1.0):
        for dx in (-0.5, 0.0, 0.5):
            for dy in (-0.5, 0.0, 0.5):
                box = (cx + dx, cy + dy, r + dr)
                iou = _shape_iou(shape, box, mask)
                if iou > best_iou:
                    best, best_iou = box, iou
    return best, best_iou


def _read_pattern(rgb: np.ndarray, interior: np.ndarray, shape: str, colours: tuple[str, str],
                  box: tuple[float, float, float]) -> str:
    """The pattern kind whose best member (over its nuisance geometry) agrees most with the second colour's layout."""
    labels = _palette_labels(rgb[interior])
    first, second = (PALETTE_NAMES.index(c) for c in colours)
    keep = (labels == first) | (labels == second)
    observed = labels[keep] == second
    best_kind, best = "solid", -1.0
    for kind in PATTERN_WORDS:
        for pattern in pattern_family(kind):
            scene = Scene(shape, colours, "white", "large", *box, pattern)
            predicted = pattern_secondary(scene)[interior][keep] >= 0.5
            agreement = float((predicted == observed).mean())
            if agreement > best:
                best_kind, best = kind, agreement
    return best_kind


def _segment(rgb: np.ndarray) -> tuple[str, np.ndarray]:
    """The background's name (median of the border) and the object mask (pixels far from it)."""
    border = np.concatenate([rgb[:2].reshape(-1, 3), rgb[-2:].reshape(-1, 3), rgb[:, :2].reshape(-1, 3),
                             rgb[:, -2:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    return _nearest(bg_rgb, BACKGROUNDS), np.linalg.norm(rgb - bg_rgb, axis=-1) > OBJECT_DISTANCE


def read(image: Image.Image | np.ndarray) -> Reading:
    """Background, object colours, pattern kind, shape and size of a 64×64 toy-world picture."""
    rgb = _as_array(image)
    background, mask = _segment(rgb)
    if mask.sum() < MIN_OBJECT_PIXELS:
        return Reading(background, None, None, None, None, 0.0, mask)
    box = _bbox(mask)
    ious = {shape: _shape_iou(shape, box, mask) for shape in SHAPES}
    shape = max(ious, key=ious.get)
    interior = mask & erode(mask)
    if interior.sum() < MIN_OBJECT_PIXELS // 2:
        interior = mask
    counts = np.bincount(_palette_labels(rgb[interior]), minlength=len(PALETTE_NAMES))
    top = [int(i) for i in np.argsort(-counts, kind="stable")[:2]]
    if counts[top[1]] < SECOND_COLOUR_SHARE * interior.sum():
        colours, pattern = (PALETTE_NAMES[top[0]],), "solid"
    else:
        colours = colour_pair(PALETTE_NAMES[top[0]], PALETTE_NAMES[top[1]])
        pattern = _read_pattern(rgb, interior, shape, colours, box)
    size = "small" if box[2] < SIZE_THRESHOLD else "large"
    return Reading(background, colours, pattern, shape, size, ious[shape], mask)


def instance_similarity(image: Image.Image | np.ndarray, shape: str, colours: tuple[str, ...],
                        pattern: Pattern) -> float:
    """How much of the object shows one exact look at that place (0–1): for each of the look's colours, the share
    of its pixels that have that palette colour, averaged over the colours, times the IoU of the object with the
    look's shape.

    The reference is rendered into the object's own (fitted) bounding box, so position and size do not matter,
    only the look. No object found scores 0.
    """
    rgb = _as_array(image)
    _, mask = _segment(rgb)  # only the object's outline is needed, not a full reading
    if mask.sum() < MIN_OBJECT_PIXELS:
        return 0.0
    box, coverage = _fit_box(mask, shape)
    reference = Scene(shape, colours, "white", "large", *box, pattern)  # the background plays no part here
    region = (shape_mask(shape, *box) >= 0.5) & erode(mask)  # rims blend two colours: judge the interior
    if region.sum() == 0:
        return 0.0
    got = _palette_labels(rgb[region])
    want = _palette_labels(object_colour_field(reference)[region])
    # balanced over the look's colours: a plain object in one of them cannot score by covering most of the area
    own = [PALETTE_NAMES.index(c) for c in colours if (want == PALETTE_NAMES.index(c)).any()]
    if not own:
        return 0.0
    agreement = float(np.mean([(got[want == c] == c).mean() for c in own]))  # blended rim colours ignored
    return agreement * coverage


def subject_similarity(image: Image.Image | np.ndarray, subject: Subject | str) -> float:
    """How exactly the picture shows a subject (a Subject, or a named subject's name): `instance_similarity`
    with its look."""
    spec = as_subject(subject)
    return instance_similarity(image, spec.shape, spec.colours, spec.pattern)
