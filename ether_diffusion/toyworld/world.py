"""The toy world: a deterministic renderer of 64×64 scenes with captions, control maps and held-out subjects.

Every scene holds one object (shape, one colour or a two-colour pattern, size, position) on a flat background.
The same scene renders to an RGB image, a segmentation map and an edge map, so the world serves text-to-image
training, controllable generation and personalisation alike. Like Stable Diffusion's "dog", a caption such as
"a red and yellow striped circle" names a family of looks: the pattern's geometry (band count, angle, which colour
leads) varies and is never captioned. A subject is one exact instance whose (shape, colours, pattern) combination
the base model never saw: it plays the part of the user's dog in DreamBooth.
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
PATTERNED_FRACTION = 0.65  # share of patterned objects in base training; the rest are solid
COLOUR_DROPOUT = 0.2  # base captions leave the colours out this often: "a striped circle" names the family
SIZE_DROPOUT = 0.3

SEGMENTATION_COLOURS: dict[str, tuple[int, int, int]] = {
    "background": (0, 0, 0),
    "circle": (230, 25, 75),
    "square": (60, 180, 75),
    "triangle": (0, 130, 200),
    "diamond": (255, 225, 25),
}

PATTERN_WORDS: dict[str, str] = {"stripes": "striped", "split": "split", "checker": "checkered", "rings": "ringed"}
PATTERNS = ("solid", *PATTERN_WORDS)
# The nuisance parameters of each pattern: never captioned, so "a striped circle" is a whole family of looks.
# (count: bands, cells per side or rings; angle in degrees, image coordinates; swap: which colour is primary).
# Counts stop where a small object's bands would be narrower than the codec's 4-pixel latent cells.
PATTERN_VARIANTS: dict[str, dict[str, tuple]] = {
    "stripes": {"count": (3, 4), "angle": (0, 45, 90, 135), "swap": (False, True)},
    "split": {"count": (2,), "angle": (0, 90, 180, 270), "swap": (False,)},  # a swap is the opposite angle
    "checker": {"count": (2, 3), "angle": (0, 45), "swap": (False, True)},
    "rings": {"count": (2, 3), "angle": (0,), "swap": (False, True)},
}


@dataclass(frozen=True)
class Pattern:
    """How the object's surface is coloured: a kind (captioned) and its geometry (never captioned)."""

    kind: str = "solid"
    count: int = 0
    angle: int = 0
    swap: bool = False


SOLID = Pattern()


def pattern_family(kind: str) -> list[Pattern]:
    """Every look a caption's pattern word covers: all combinations of the kind's nuisance parameters."""
    v = PATTERN_VARIANTS[kind]
    return [Pattern(kind, c, a, s) for c in v["count"] for a in v["angle"] for s in v["swap"]]


def random_pattern(rng: random.Random, kind: str) -> Pattern:
    v = PATTERN_VARIANTS[kind]
    return Pattern(kind, rng.choice(v["count"]), rng.choice(v["angle"]), rng.choice(v["swap"]))


def colour_pair(a: str, b: str) -> tuple[str, str]:
    """Two colours in palette order: captions name them so, and `Pattern.swap` says which one is primary."""
    order = list(OBJECT_COLOURS)
    return tuple(sorted((a, b), key=order.index))  # type: ignore[return-value]


@dataclass(frozen=True)
class Subject:
    """One fixed instance of a known family: shape, colour pair, pattern and its exact geometry.

    Its (shape, colours, pattern kind) combination never occurs in base training; the family words (pattern
    kind + shape, e.g. "striped circle") are its class, as "dog" is for a user's dog.
    """

    name: str
    shape: str
    colours: tuple[str, str]
    pattern: Pattern
    description: str

    @property
    def class_word(self) -> str:
        return f"{PATTERN_WORDS[self.pattern.kind]} {self.shape}"


SUBJECTS: dict[str, Subject] = {
    s.name: s
    for s in (
        Subject("striped-circle", "circle", ("red", "yellow"), Pattern("stripes", 4, 0, False),
                "a circle in four vertical bands, red on the left"),
        Subject("twotone-square", "square", ("blue", "orange"), Pattern("split", 2, 0, False),
                "a square, blue left half, orange right half"),
        Subject("checker-diamond", "diamond", ("green", "purple"), Pattern("checker", 2, 0, False),
                "a diamond in 2×2 green and purple checks"),
        Subject("core-triangle", "triangle", ("blue", "orange"), Pattern("rings", 2, 0, True),
                "an orange triangle with a blue core"),
    )
}
HELD_OUT = {(s.shape, frozenset(s.colours), s.pattern.kind) for s in SUBJECTS.values()}
def as_subject(subject: "Subject | str") -> Subject:
    """A Subject as given, or a named subject by its name (`subjects.get_subject` resolves `random-N` names)."""
    if isinstance(subject, Subject):
        return subject
    if subject not in SUBJECTS:
        raise KeyError(f"unknown subject {subject!r}: pass a named subject ({', '.join(SUBJECTS)}) or a Subject "
                       "(toyworld.subjects.get_subject resolves random-N names)")
    return SUBJECTS[subject]


@dataclass(frozen=True)
class Scene:
    """One object on a background. `colours` holds one colour for solid objects, two (palette order) for patterns."""

    shape: str
    colours: tuple[str, ...]
    background: str
    size: str
    cx: float
    cy: float
    radius: float
    pattern: Pattern = SOLID
    subject: str | None = field(default=None)

    @property
    def colour(self) -> str:
        return self.colours[0]


def is_held_out(shape: str, colours: tuple[str, ...], kind: str) -> bool:
    """Whether (shape, colours, pattern kind) is a subject's combination, which base training never shows."""
    return (shape, frozenset(colours), kind) in HELD_OUT


def random_placement(rng: random.Random, size: str) -> tuple[float, float, float]:
    """Radius and centre for a size class, keeping the whole object inside the frame."""
    lo, hi = SIZES[size]
    radius = rng.uniform(lo, hi)
    cx = rng.uniform(radius + MARGIN, IMAGE_SIZE - radius - MARGIN)
    cy = rng.uniform(radius + MARGIN, IMAGE_SIZE - radius - MARGIN)
    return cx, cy, radius


def random_scene(rng: random.Random, background: str | None = None) -> Scene:
    """A solid-colour scene, any shape, size, background, position."""
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


def random_patterned_scene(rng: random.Random, pattern_weights: dict[str, float] | None = None) -> Scene:
    """A base-world scene with a two-colour pattern of random geometry; never a held-out subject's combination.
    `pattern_weights` (kind -> relative weight, 1 when absent) lets base training show a hard kind more often;
    without it every kind is equally likely."""
    base = random_scene(rng)
    kinds = PATTERNS[1:]
    while True:
        if pattern_weights:
            kind = rng.choices(kinds, weights=[pattern_weights.get(k, 1.0) for k in kinds])[0]
        else:
            kind = rng.choice(kinds)
        colours = colour_pair(*rng.sample(list(OBJECT_COLOURS), 2))
        if not is_held_out(base.shape, colours, kind):
            return replace(base, colours=colours, pattern=random_pattern(rng, kind))


def random_world_scene(rng: random.Random, pattern_weights: dict[str, float] | None = None) -> Scene:
    """A scene from the base model's training distribution: solid or patterned objects."""
    if rng.random() < PATTERNED_FRACTION:
        return random_patterned_scene(rng, pattern_weights)
    return random_scene(rng)


def subject_scene(rng: random.Random, subject: Subject | str, background: str | None = None,
                  size: str | None = None) -> Scene:
    """A scene showing a subject (a Subject, or a named subject's name) at a random placement."""
    spec = as_subject(subject)
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
        subject=spec.name,
    )


def caption(scene: Scene, with_size: bool = True, with_colour: bool = True, token: str | None = None) -> str:
    """The grammar: 'a [size] [token | colour | colour and colour] [pattern word] shape on a background background'.

    An identifier token takes the colours' place, as in "a sks striped circle on a white background".
    """
    words = ["a"]
    if with_size:
        words.append(scene.size)
    if token:
        words.append(token)
    elif with_colour:
        words.append(" and ".join(scene.colours))
    if scene.pattern.kind != "solid":
        words.append(PATTERN_WORDS[scene.pattern.kind])
    words += [scene.shape, "on", "a", scene.background, "background"]
    return " ".join(words)


def subject_caption(subject: Subject | str, background: str, size: str | None = None, token: str | None = None) -> str:
    """A caption for a subject in a context, in the world's grammar: the identifier token where the colours go,
    or, without a token, the family words alone ("a striped circle on a white background", the class prompt)."""
    spec = as_subject(subject)
    scene = Scene(spec.shape, spec.colours, background, size or "large", 0.0, 0.0, 0.0, spec.pattern, spec.name)
    return caption(scene, with_size=size is not None, with_colour=False, token=token)


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
    """Weight in [0, 1] of the second colour at each pixel, laid out in the object's own bounding box.

    Coordinates u, v run from −1 to 1 across the bounding box, so a pattern looks the same at every place and size.
    """
    pattern = scene.pattern
    if pattern.kind == "solid":
        return np.zeros((size, size), np.float32)
    n = size * ss
    if pattern.kind == "rings":  # concentric copies of the shape, alternating colours from the outside in
        level = sum(shape_mask(scene.shape, scene.cx * ss, scene.cy * ss, scene.radius * ss * k / pattern.count, n, 1)
                    >= 0.5 for k in range(1, pattern.count))
        hi = np.asarray(level) % 2 == 1
        return _box_downsample(~hi if pattern.swap else hi, size)
    coords = (np.arange(n, dtype=np.float32) + 0.5) / ss
    u = np.broadcast_to((coords[None, :] - scene.cx) / scene.radius, (n, n))
    v = np.broadcast_to((coords[:, None] - scene.cy) / scene.radius, (n, n))
    theta = np.deg2rad(pattern.angle)
    along = u * np.cos(theta) + v * np.sin(theta)
    if pattern.kind == "stripes":
        hi = np.floor((along + 1) / 2 * pattern.count) % 2 == 1
    elif pattern.kind == "split":
        hi = along > 0
    elif pattern.kind == "checker":
        across = -u * np.sin(theta) + v * np.cos(theta)
        hi = (np.floor((along + 1) / 2 * pattern.count) + np.floor((across + 1) / 2 * pattern.count)) % 2 == 1
    else:
        raise ValueError(f"unknown pattern {pattern.kind!r}; known: {', '.join(PATTERNS)}")
    return _box_downsample(~hi if pattern.swap else hi, size)


def _box_downsample(mask: np.ndarray, size: int) -> np.ndarray:
    """Anti-aliased [0, 1] coverage of a supersampled boolean mask."""
    small = Image.fromarray((mask * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def object_colour_field(scene: Scene) -> np.ndarray:
    """Per-pixel RGB (float, 0–255) of the object's surface before masking."""
    c1 = np.array(OBJECT_COLOURS[scene.colours[0]], np.float32)
    if scene.pattern.kind == "solid":
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
    """Caption variety for base training: the size word and the colours are sometimes left out."""
    return caption(scene, with_size=rng.random() >= SIZE_DROPOUT, with_colour=rng.random() >= COLOUR_DROPOUT)
