"""Subjects by name: the four named ones and `random-N`, a seeded draw nobody picked, from any family.

Above the world (which renders) and the checker (which reads): a random draw is kept only when the checker can
judge that exact instance as surely as the named subjects.
"""

from __future__ import annotations

import functools
import random

from ..errors import EtherError
from .checker import SUBJECT_MATCH, instance_similarity
from .world import (
    OBJECT_COLOURS,
    PATTERN_WORDS,
    SHAPES,
    SIZES,
    SUBJECTS,
    Scene,
    Subject,
    colour_pair,
    pattern_family,
    random_pattern,
    random_placement,
    render,
)

RANDOM_PREFIX = "random-"
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
UNITS = {"stripes": "bands", "split": "halves", "checker": "checks per side", "rings": "rings"}


@functools.lru_cache(maxsize=None)  # a draw checks separability (~0.3 s); scoring asks for it per picture
def random_subject(seed: int) -> Subject:
    """A subject nobody picked: a seeded draw of shape, colour pair, pattern kind and exact geometry, from any
    family (its combination may be one the base saw in other geometries, as a user's dog is of a breed Stable
    Diffusion knows). The same seed always gives the same subject, named `random-SEED`."""
    rng = random.Random(f"subject-{seed}")
    while True:  # a geometry the checker cannot judge surely is drawn again
        shape = rng.choice(SHAPES)
        first, second = rng.sample(list(OBJECT_COLOURS), 2)
        kind = rng.choice(list(PATTERN_WORDS))
        pattern = random_pattern(rng, kind)
        colours = colour_pair(first, second)
        lead = colours[1] if pattern.swap else colours[0]
        description = (f"a {shape} in {COUNT_WORDS[pattern.count]} {colours[0]} and {colours[1]} {UNITS[kind]} "
                       f"at {pattern.angle}°, {lead} leading")
        subject = Subject(f"{RANDOM_PREFIX}{seed}", shape, colours, pattern, description)
        if is_separable(subject):
            return subject


def get_subject(name: str) -> Subject:
    """A named subject, or `random-SEED` for `random_subject(SEED)`; KeyError names the choices otherwise."""
    if name in SUBJECTS:
        return SUBJECTS[name]
    seed = name[len(RANDOM_PREFIX):]
    if name.startswith(RANDOM_PREFIX) and seed.isdigit():
        return random_subject(int(seed))
    raise KeyError(f"unknown subject {name!r}; choose one of: {', '.join(SUBJECTS)}, or random-SEED "
                   "(e.g. random-7)")


def resolve_subject(choice: str, seed: int) -> Subject:
    """A user's `--subject`: a named subject, `random-N`, or `random` (the subject drawn from `seed`); an
    EtherError naming the choices otherwise."""
    try:
        return get_subject(f"{RANDOM_PREFIX}{seed}" if choice == "random" else choice)
    except KeyError as exc:
        raise EtherError(exc.args[0]) from None


def is_separable(subject: Subject, placements: int = 4) -> bool:
    """Whether the checker can judge this exact instance as surely as the named subjects: its own renders (both
    sizes, several places) score at least `SUBJECT_MATCH + 0.05`, and every other member of its family (same
    shape, colours and pattern word, other geometry) at most `SUBJECT_MATCH - 0.1`. Deterministic (fixed places)."""
    rng = random.Random(0)
    family = [p for p in pattern_family(subject.pattern.kind) if p != subject.pattern]
    for size in SIZES:
        for _ in range(placements):
            place = random_placement(rng, size)
            own = render(Scene(subject.shape, subject.colours, "white", size, *place, subject.pattern))
            if instance_similarity(own, subject.shape, subject.colours, subject.pattern) < SUBJECT_MATCH + 0.05:
                return False
        place = random_placement(rng, size)
        for pattern in family:
            other = render(Scene(subject.shape, subject.colours, "white", size, *place, pattern))
            if instance_similarity(other, subject.shape, subject.colours, subject.pattern) > SUBJECT_MATCH - 0.1:
                return False
    return True
