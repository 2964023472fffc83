"""The toy world: deterministic renders that agree with their captions, pattern families with held-out subjects,
control maps, and a checker that scores the exact subject instance."""

import random
from dataclasses import replace

import numpy as np
import pytest

from ether_diffusion.toyworld import checker, world
from ether_diffusion.toyworld.evaluate import checker_validation, control_scores, named_attributes, subject_prompts
from ether_diffusion.toyworld.subjects import get_subject, random_subject
from ether_diffusion.toyworld.tokenizer import IDENTIFIER_TOKENS, build_vocab_and_merges


def test_renderer_is_deterministic():
    a = [np.asarray(world.render(world.random_world_scene(random.Random(7)))) for _ in range(2)]
    assert np.array_equal(a[0], a[1])
    s1, s2 = world.random_world_scene(random.Random(1)), world.random_world_scene(random.Random(2))
    assert s1 != s2


def test_solid_caption_matches_image():
    rng = random.Random(3)
    for _ in range(50):
        scene = world.random_scene(rng)
        words = world.caption(scene).split()
        image = np.asarray(world.render(scene)).astype(int)
        assert words[1] == scene.size and words[2] == scene.colour and words[3] == scene.shape
        assert words[-2] == scene.background
        centre = image[int(scene.cy), int(scene.cx)]
        assert np.abs(centre - world.OBJECT_COLOURS[scene.colour]).max() <= 2
        assert np.abs(image[0, 0] - world.BACKGROUNDS[scene.background]).max() <= 2


def test_patterned_caption_names_both_colours_and_the_pattern_and_the_picture_shows_them():
    rng = random.Random(4)
    for _ in range(60):
        scene = world.random_patterned_scene(rng)
        c1, c2 = scene.colours
        assert world.caption(scene) == (f"a {scene.size} {c1} and {c2} {world.PATTERN_WORDS[scene.pattern.kind]} "
                                        f"{scene.shape} on a {scene.background} background")
        image = np.asarray(world.render(scene)).reshape(-1, 3).astype(int)
        for colour in scene.colours:  # both colours cover a real part of the object
            assert (np.abs(image - world.OBJECT_COLOURS[colour]).max(axis=1) <= 2).sum() >= 20, (scene, colour)


def test_a_pattern_word_covers_a_family_of_looks():
    """Nuisance geometry varies within a caption: the same caption renders to clearly different pictures."""
    rng = random.Random(5)
    for kind in world.PATTERN_WORDS:
        family = world.pattern_family(kind)
        assert len(family) >= 4
        seen = {world.random_pattern(rng, kind) for _ in range(200)}
        assert seen == set(family)  # every member occurs in base training
        base = world.Scene("square", ("red", "blue"), "white", "large", 32, 32, 17, family[0])
        pictures = {np.asarray(world.render(replace(base, pattern=p))).tobytes() for p in family}
        assert len(pictures) == len(family)
        assert len({world.caption(replace(base, pattern=p)) for p in family}) == 1


def test_held_out_combinations_never_appear_in_base_training():
    rng = random.Random(0)
    held_out_captions = {" ".join([*s.colours[:1], "and", *s.colours[1:], s.class_word]) for s in world.SUBJECTS.values()}
    kinds = set()
    for _ in range(3000):
        scene = world.random_world_scene(rng)
        kinds.add(scene.pattern.kind)
        assert not world.is_held_out(scene.shape, scene.colours, scene.pattern.kind), scene
        text = world.base_caption_for_training(rng, scene)
        assert not set(text.split()) & set(IDENTIFIER_TOKENS)
        assert not any(h in text for h in held_out_captions), text
    assert kinds == set(world.PATTERNS)
    for spec in world.SUBJECTS.values():  # ... while their shape, colours and pattern kind each occur
        assert world.is_held_out(spec.shape, spec.colours[::-1], spec.pattern.kind)
    vocab, _ = build_vocab_and_merges()
    assert all(f"{t}</w>" in vocab for t in IDENTIFIER_TOKENS)
    assert all(f"{w}</w>" in vocab for w in world.PATTERN_WORDS.values())


def test_pattern_weights_show_a_kind_more_often_and_still_hold_out_the_subjects():
    rng = random.Random(1)
    scenes = [world.random_world_scene(rng, {"checker": 3.0}) for _ in range(4000)]
    patterned = [s for s in scenes if s.pattern.kind != "solid"]
    checker_share = sum(s.pattern.kind == "checker" for s in patterned) / len(patterned)
    assert 0.45 < checker_share < 0.55  # 3 / (3 + 1 + 1 + 1)
    assert 0.6 < len(patterned) / len(scenes) < 0.7  # the solid / patterned split is untouched
    assert not any(world.is_held_out(s.shape, s.colours, s.pattern.kind) for s in scenes)
    rng = random.Random(1)
    default = [world.random_world_scene(rng) for _ in range(4000)]
    shares = [sum(s.pattern.kind == k for s in default) / len(default) for k in world.PATTERNS[1:]]
    assert max(shares) - min(shares) < 0.04


def test_checker_is_accurate_on_renders_and_chance_on_noise():
    result = checker_validation(n=300)
    assert min(result["clean"].values()) >= 0.98
    for key, acc in result["noise"].items():
        assert acc <= result["chance"][key] + 0.2, (key, acc)


RANDOM_NAMES = [f"random-{seed}" for seed in range(12)]


@pytest.mark.parametrize("name", [*world.SUBJECTS, *RANDOM_NAMES])
def test_subject_similarity_scores_the_exact_instance_not_its_family(name):
    """The subject matches at every size and place; every other member of its family (same shape, colours and
    pattern word, other geometry) and every plain object scores clearly below the match threshold. Random subjects
    (seeded draws nobody picked) are held to the same standard as the named ones."""
    spec = get_subject(name)
    rng = random.Random(6)
    own = [checker.subject_similarity(world.render(world.subject_scene(rng, spec, size=size)), spec)
           for size in ("large", "small") for _ in range(8)]
    assert min(own) >= checker.SUBJECT_MATCH, (name, min(own))
    family = []
    for pattern in world.pattern_family(spec.pattern.kind):
        if pattern == spec.pattern:
            continue
        for size in ("large", "small"):
            scene = replace(world.subject_scene(rng, spec, size=size), pattern=pattern)
            family.append(checker.subject_similarity(world.render(scene), spec))
    assert len(family) >= 6 and max(family) <= checker.SUBJECT_MATCH - 0.1, (name, max(family))
    plain = [checker.subject_similarity(world.render(world.Scene(spec.shape, (c,), "white", "large", 32, 32, 17)), spec)
             for c in world.OBJECT_COLOURS]
    assert max(plain) <= checker.SUBJECT_MATCH - 0.1, (name, max(plain))


def test_subject_similarity_does_not_depend_on_place_or_size():
    rng = random.Random(8)
    for name in world.SUBJECTS:
        scores = [checker.subject_similarity(world.render(world.subject_scene(rng, name, size=size)), name)
                  for size in ("large", "small") for _ in range(6)]
        assert min(scores) >= checker.SUBJECT_MATCH and max(scores) - min(scores) <= 0.3, (name, scores)


def test_context_prompts_cover_backgrounds_sizes_and_a_combination_never_shown():
    prompts = subject_prompts("sks", "striped-circle")
    assert len(prompts) >= 6
    assert {p.background for p in prompts} == set(world.BACKGROUNDS)
    assert {p.size for p in prompts} >= set(world.SIZES)
    assert all("sks striped circle" in p.text for p in prompts)
    assert any(p.background == "black" for p in prompts)  # the demo's instance pictures show white and gray only


def test_named_attributes_follow_the_caption_words():
    assert named_attributes("a large red and blue striped circle on a white background") == {
        "shape", "pattern", "background", "colour", "size"}
    assert named_attributes("a striped circle on a white background") == {"shape", "pattern", "background"}


def test_control_maps_follow_the_object():
    scene = world.Scene("square", ("red",), "white", "large", 32, 32, 16)
    seg = np.asarray(world.render_segmentation(scene))
    assert tuple(seg[32, 32]) == world.SEGMENTATION_COLOURS["square"] and tuple(seg[2, 2]) == (0, 0, 0)
    edges = np.asarray(world.render_edges(scene))[..., 0] > 0
    assert edges[16, 32] and not edges[32, 32] and not edges[2, 2]


def test_random_subjects_are_seeded_valid_draws_from_every_family():
    draws = [get_subject(name) for name in RANDOM_NAMES]
    assert [s.name for s in draws] == RANDOM_NAMES
    assert random_subject(3) == get_subject("random-3")  # the same seed, the same subject
    for s in draws:
        assert s.shape in world.SHAPES and s.pattern in world.pattern_family(s.pattern.kind)
        assert len(set(s.colours)) == 2 and s.colours == world.colour_pair(*s.colours)
        assert world.subject_caption(s, "white", token="sks").startswith("a sks ")
    assert len({s.shape for s in draws}) >= 3 and len({s.pattern.kind for s in draws}) >= 3
    with pytest.raises(KeyError, match="random-SEED"):
        get_subject("random-x")


def test_control_scores_name_each_pictures_missed_caption_attributes():
    """Renders of the scenes themselves score IoU ~1 and miss nothing; a picture of the same object in other colours
    is a colour miss at its index, with its IoU intact."""
    rng = random.Random(3)
    scenes = [world.random_scene(rng) for _ in range(3)]
    recoloured = replace(scenes[1], colours=tuple(c for c in world.OBJECT_COLOURS if c not in scenes[1].colours)[
        :len(scenes[1].colours)])
    scores = control_scores(scenes, [world.render(s) for s in (scenes[0], recoloured, scenes[2])])
    assert scores["caption_misses"] == {"1": ["colour"]}
    assert scores["accuracy"]["colour"] == pytest.approx(2 / 3) and scores["accuracy"]["shape"] == 1.0
    assert min(scores["per_scene_iou"]) > 0.9
