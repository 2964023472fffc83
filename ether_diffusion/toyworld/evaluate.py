"""Scores on the toy world, read by the checker: base-model quality and DreamBooth fidelity.

    python -m ether_diffusion.toyworld.evaluate --base PATH --n 120 --out docs/toyworld-base-quality.json
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..atomic import atomic_write_text
from . import checker, world


@dataclass(frozen=True)
class SubjectPrompt:
    """A prompt that places a subject (through its identifier token) in a context the checker can verify."""

    text: str
    background: str
    size: str | None


def subject_prompts(token: str, subject: str) -> list[SubjectPrompt]:
    """New contexts for a subject: every background, with and without a size word."""
    shape = world.SUBJECTS[subject].shape
    out = []
    for background in world.BACKGROUNDS:
        out.append(SubjectPrompt(f"a {token} {shape} on a {background} background", background, None))
    out.append(SubjectPrompt(f"a large {token} {shape} on a gray background", "gray", "large"))
    out.append(SubjectPrompt(f"a small {token} {shape} on a black background", "black", "small"))
    return out


def prompt_fidelity(image, prompt: SubjectPrompt, shape: str) -> float:
    """1 when the picture shows the class shape on the asked background (and size, when asked), else 0."""
    reading = checker.read(image)
    ok = reading.background == prompt.background and reading.shape == shape
    if prompt.size is not None:
        ok = ok and reading.size == prompt.size
    return float(ok)


def base_quality(pipe, n: int, seed: int, steps: int = 25, guidance: float = 7.5, batch: int = 8) -> dict:
    """Generate n seeded random captions (not used in training) and score each attribute with the checker."""
    import torch

    rng = random.Random(seed)
    scenes = [world.random_scene(rng) for _ in range(n)]
    hits = {k: 0 for k in ("background", "colour", "shape", "size")}
    all_ok = 0
    for start in tqdm(range(0, n, batch), desc="base quality"):
        chunk = scenes[start : start + batch]
        prompts = [world.caption(s) for s in chunk]
        gens = [torch.Generator().manual_seed(seed * 7 + start + i) for i in range(len(chunk))]
        images = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gens).images
        for scene, image in zip(chunk, images):
            m = checker.read(image).matches(scene)
            for k in hits:
                hits[k] += m[k]
            all_ok += m["background"] and m["colour"] and m["shape"]
    return {"n": n, "seed": seed, "steps": steps, "guidance": guidance,
            "accuracy": {k: v / n for k, v in hits.items()}, "shape_colour_background_all_correct": all_ok / n}


def control_fidelity(pipe, kind: str, n: int, seed: int, steps: int = 20, guidance: float = 7.5,
                     batch: int = 8) -> dict:
    """How well generated pictures follow control maps of held-out scenes (with the active control adapters).

    Per picture: IoU between the scene's object mask (what the control map shows) and the object the checker
    finds, and whether background, colour and shape match the caption.
    """
    from ..control import needed_control
    from ..pipelines import generate
    from .control_data import RENDERERS, control_scenes

    with_control = bool(needed_control(pipe.unet))  # without: the base model's own placement, for reference
    scenes = control_scenes(n, seed)
    ious, hits = [], {k: 0 for k in ("background", "colour", "shape")}
    for start in tqdm(range(0, n, batch), desc=f"{kind} fidelity"):
        chunk = scenes[start : start + batch]
        images = generate(pipe, [world.caption(s) for s in chunk], seed=seed * 7 + start, steps=steps,
                          guidance=guidance,
                          control_image=[RENDERERS[kind](s) for s in chunk] if with_control else None)
        for scene, image in zip(chunk, images):
            reading = checker.read(image)
            truth = world.shape_mask(scene.shape, scene.cx, scene.cy, scene.radius) >= 0.5
            ious.append(float((truth & reading.mask).sum() / max((truth | reading.mask).sum(), 1)))
            for k, v in reading.matches(scene).items():
                if k in hits:
                    hits[k] += v
    return {"n": n, "seed": seed, "steps": steps, "guidance": guidance, "mean_iou": float(np.mean(ious)),
            "iou_over_0.5": float(np.mean([v > 0.5 for v in ious])),
            "accuracy": {k: v / n for k, v in hits.items()}, "per_scene_iou": [round(v, 4) for v in ious]}


def checker_validation(n: int = 500, seed: int = 0) -> dict:
    """The checker on clean renders (should be ~100%) and on uniform noise (should be ~chance)."""
    rng = random.Random(seed)
    scenes = [world.random_scene(rng) for _ in range(n)]
    noise_rng = np.random.default_rng(seed)
    result = {}
    for label, images in (("clean", (world.render(s) for s in scenes)),
                          ("noise", (noise_rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in scenes))):
        hits = {k: 0 for k in ("background", "colour", "shape", "size")}
        for scene, image in zip(scenes, images):
            for k, v in checker.read(image).matches(scene).items():
                hits[k] += v
        result[label] = {k: v / n for k, v in hits.items()}
    result["chance"] = {"background": 1 / len(world.BACKGROUNDS), "colour": 1 / len(world.OBJECT_COLOURS),
                        "shape": 1 / len(world.SHAPES), "size": 1 / len(world.SIZES)}
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Measure the embedded base model with the toy-world checker.")
    ap.add_argument("--base", default=None, help="pipeline folder (default: the embedded model)")
    ap.add_argument("--n", type=int, default=120)
    ap.add_argument("--seed", type=int, default=1234, help="prompt seed; training used seed 0 scenes")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    from ..pipelines import load_pipeline

    pipe = load_pipeline(args.base)
    report = {"base_quality": base_quality(pipe, args.n, args.seed), "checker": checker_validation()}
    atomic_write_text(args.out, json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
