"""The toy world: deterministic renders that agree with their captions, control maps, a validated checker."""

import random

import numpy as np

from ether_diffusion.toyworld import checker, world
from ether_diffusion.toyworld.evaluate import checker_validation
from ether_diffusion.toyworld.tokenizer import IDENTIFIER_TOKENS, build_vocab_and_merges


def test_renderer_is_deterministic():
    a = [np.asarray(world.render(world.random_scene(random.Random(7)))) for _ in range(2)]
    assert np.array_equal(a[0], a[1])
    s1, s2 = world.random_scene(random.Random(1)), world.random_scene(random.Random(2))
    assert s1 != s2


def test_caption_matches_image():
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


def test_control_maps_follow_the_object():
    scene = world.Scene("square", ("red",), "white", "large", 32, 32, 16)
    seg = np.asarray(world.render_segmentation(scene))
    assert tuple(seg[32, 32]) == world.SEGMENTATION_COLOURS["square"] and tuple(seg[2, 2]) == (0, 0, 0)
    edges = np.asarray(world.render_edges(scene))[..., 0] > 0
    assert edges[16, 32] and not edges[32, 32] and not edges[2, 2]


def test_subjects_never_appear_in_base_captions_and_tokens_are_unused():
    rng = random.Random(0)
    for _ in range(200):
        caption = world.base_caption_for_training(rng, world.random_scene(rng))
        assert not set(caption.split()) & set(IDENTIFIER_TOKENS)
    vocab, _ = build_vocab_and_merges()
    assert all(f"{t}</w>" in vocab for t in IDENTIFIER_TOKENS)


def test_checker_is_accurate_on_renders_and_chance_on_noise():
    result = checker_validation(n=300)
    assert min(result["clean"].values()) >= 0.98
    for key, acc in result["noise"].items():
        assert acc <= result["chance"][key] + 0.2, (key, acc)


def test_subject_similarity_separates_subject_from_plain_objects():
    rng = random.Random(5)
    for name, spec in world.SUBJECTS.items():
        own = [checker.subject_similarity(world.render(world.subject_scene(rng, name, size="large")), name)
               for _ in range(10)]
        plain = [checker.subject_similarity(world.render(world.Scene(spec.shape, (c,), "white", "large", 32, 32, 17)),
                                            name) for c in world.OBJECT_COLOURS]
        assert np.mean(own) >= 0.8 and max(plain) < 0.7, (name, np.mean(own), max(plain))
