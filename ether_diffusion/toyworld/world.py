"""The toy world: a deterministic renderer of 64×64 scenes with captions, control maps and held-out subjects.

Every scene holds one object (shape, colour or pattern, size, position) on a flat background. The same scene
renders to an RGB image, a segmentation map and an edge map, so the world serves text-to-image training,
controllable generation and personalisation alike. Patterns ("subjects") never appear in base-model captions:
they play the part of the user's dog in DreamBooth.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 4

OBJECT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES: dict[str, tuple[float, float]] = {"small": (8.0, 11.0), "large": (15.0, 19.0)}
SIZE_THRESHOLD = 13.0  # half-extents below this read as "small"; between the two ranges above
MARGIN = 2.0

SEGMENTATION_COLOURS: dict[str, tuple[int, int, int]] = {
    "background": (0, 0, 0),
    "circle": (230, 25, 75),
    "square": (60, 180, 75),
    "triangle": (0, 130, 200),
    "diamond": (255, 225, 25),
}

PATTERNS = ("solid", "stripes", "split", "checker", "core")


@dataclass(frozen=True)
class Subject:
    """A held-out look (pattern + colours) on a fixed shape, with the class word used in prompts."""

    name: str
    shape: str
    pattern: str
    colours: tuple[str, str]
    description: str

    @property
    def class_word(self) -> str:
        return self.shape


SUBJECTS: dict[str, Subject] = {
    s.name: s
    for s in (
        Subject("striped-circle", "circle", "stripes", ("red", "yellow"), "a circle with red and yellow stripes"),
        Subject("twotone-square", "square", "split", ("blue", "orange"), "a square, blue left half, orange right"),
        Subject("checker-diamond", "diamond", "checker", ("green", "purple"), "a green and purple checkered diamond"),
        Subject("core-triangle", "triangle", "core", ("orange", "blue"), "an orange triangle with a blue core"),
    )
}


@dataclass(frozen=True)
class Scene:
    """One object on a background. `colours` holds one colour for solid objects, two for patterns."""

    shape: str
    colours: tuple[str, ...]
    background: str
    size: str
    cx: float
    cy: float
    radius: float
    pattern: str = "solid"
    subject: str | None = field(default=None)

    @property
    def colour(self) -> str:
        return self.colours[0]


def random_placement(rng: random.Random, size: str) -> tuple[float, float, float]:
    """Radius and centre for a size class, keeping the whole object inside the frame."""
    lo, hi = SIZES[size]
    radius = rng.uniform(lo, hi)
    cx = rng.uniform(radius + MARGIN, IMAGE_SIZE - radius - MARGIN)
    cy = rng.uniform(radius + MARGIN, IMAGE_SIZE - radius - MARGIN)
    return cx, cy, radius


def random_scene(rng: random.Random, background: str | None = None) -> Scene:
    """A plain base-world scene: solid colour, any shape, size, background, position."""
    size = rng.choice(list(SIZES))
    cx, cy, radius = random_placement(rng, size)
    return Scene(
        shape=rng.choice(SHAPES),
        colours=(rng.choice(list(OBJECT_COLOURS)),),
        background=background or rng.choice(list(BACKGROUNDS)),
        size=size,
        cx=cx,
        cy=cy,
        radius=radius,
    )


def random_patterned_scene(rng: random.Random) -> Scene:
    """A scene with a random two-colour pattern: codec (VAE) training data only, never captioned."""
    base = random_scene(rng)
    pattern = rng.choice(PATTERNS[1:])
    colours = tuple(rng.sample(list(OBJECT_COLOURS), 2))
    return replace(base, colours=colours, pattern=pattern)


def subject_scene(rng: random.Random, subject: str, background: str | None = None, size: str | None = None) -> Scene:
    """A scene showing a held-out subject at a random placement."""
    spec = SUBJECTS[subject]
    size = size or rng.choice(list(SIZES))
    cx, cy, radius = random_placement(rng, size)
    return Scene(
        shape=spec.shape,
        colours=spec.colours,
        background=background or rng.choice(list(BACKGROUNDS)),
        size=size,
        cx=cx,
        cy=cy,
        radius=radius,
        pattern=spec.pattern,
        subject=subject,
    )


def caption(scene: Scene, with_size: bool = True, token: str | None = None) -> str:
    """The grammar: 'a [size] (colour | token) shape on a background background'."""
    words = ["a"]
    if with_size:
        words.append(scene.size)
    words.append(token if token else scene.colour)
    words += [scene.shape, "on", "a", scene.background, "background"]
    return " ".join(words)


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Polygon vertices of a shape whose bounding box is the square of half-side r; None for the circle."""
    if shape == "circle":
        return None
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int = IMAGE_SIZE, ss: int = SUPERSAMPLE) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a shape on a size×size canvas."""
    canvas = Image.new("L", (size * ss, size * ss), 0)
    draw = ImageDraw.Draw(canvas)
    poly = shape_polygon(shape, cx * ss, cy * ss, r * ss)
    if poly is None:
        draw.ellipse([(cx - r) * ss, (cy - r) * ss, (cx + r) * ss, (cy + r) * ss], fill=255)
    else:
        draw.polygon(poly, fill=255)
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def pattern_secondary(scene: Scene, size: int = IMAGE_SIZE, ss: int = SUPERSAMPLE) -> np.ndarray:
    """Weight in [0, 1] of the second colour at each pixel, laid out relative to the object's bounding box."""
    if scene.pattern == "solid":
        return np.zeros((size, size), np.float32)
    if scene.pattern == "core":
        return shape_mask(scene.shape, scene.cx, scene.cy, scene.radius * 0.5, size, ss)
    n = size * ss
    coords = (np.arange(n, dtype=np.float32) + 0.5) / ss
    xs = (coords[None, :] - (scene.cx - scene.radius)) / (2 * scene.radius)  # 0..1 across the bbox
    ys = (coords[:, None] - (scene.cy - scene.radius)) / (2 * scene.radius)
    if scene.pattern == "stripes":
        hi = (np.floor(ys * 4) % 2 == 1) & np.ones_like(xs, dtype=bool)
    elif scene.pattern == "split":
        hi = (xs >= 0.5) & np.ones_like(ys, dtype=bool)
    elif scene.pattern == "checker":
        hi = (np.floor(xs * 2) + np.floor(ys * 2)) % 2 == 1
    else:
        raise ValueError(f"unknown pattern {scene.pattern!r}; known: {', '.join(PATTERNS)}")
    hi_img = Image.fromarray((hi * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BOX)
    return np.asarray(hi_img, dtype=np.float32) / 255.0


def object_colour_field(scene: Scene) -> np.ndarray:
    """Per-pixel RGB (float, 0–255) of the object's surface before masking."""
    c1 = np.array(OBJECT_COLOURS[scene.colours[0]], np.float32)
    if scene.pattern == "solid":
        return np.broadcast_to(c1, (IMAGE_SIZE, IMAGE_SIZE, 3))
    c2 = np.array(OBJECT_COLOURS[scene.colours[1]], np.float32)
    w = pattern_secondary(scene)[..., None]
    return c1 * (1 - w) + c2 * w


def render(scene: Scene) -> Image.Image:
    """The RGB picture of a scene."""
    alpha = shape_mask(scene.shape, scene.cx, scene.cy, scene.radius)[..., None]
    bg = np.array(BACKGROUNDS[scene.background], np.float32)
    rgb = bg * (1 - alpha) + object_colour_field(scene) * alpha
    return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")


def render_segmentation(scene: Scene) -> Image.Image:
    """Semantic map: background and object in their class colours (hard edges, like ADE20K label maps)."""
    inside = shape_mask(scene.shape, scene.cx, scene.cy, scene.radius) >= 0.5
    out = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    out[:] = SEGMENTATION_COLOURS["background"]
    out[inside] = SEGMENTATION_COLOURS[scene.shape]
    return Image.fromarray(out, "RGB")


def erode(mask: np.ndarray, border: str = "constant") -> np.ndarray:
    """4-neighbour binary erosion; `border` is np.pad's mode for pixels outside the frame."""
    padded = np.pad(mask, 1, mode=border)
    out = mask.copy()
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        out &= padded[dy : dy + mask.shape[0], dx : dx + mask.shape[1]]
    return out


def render_edges(scene: Scene) -> Image.Image:
    """Edge map: white one-pixel outline of the object on black, like a Canny map."""
    inside = shape_mask(scene.shape, scene.cx, scene.cy, scene.radius) >= 0.5
    edges = inside & ~erode(inside, border="edge")
    return Image.fromarray((edges * 255).astype(np.uint8), "L").convert("RGB")


def base_caption_for_training(rng: random.Random, scene: Scene) -> str:
    """Caption variety for base training: the size word is sometimes left out."""
    return caption(scene, with_size=rng.random() < 0.7)
