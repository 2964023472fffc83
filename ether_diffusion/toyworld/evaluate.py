"""Scores on the toy world, read by the checker: base-model quality and DreamBooth fidelity.

    python -m ether_diffusion.toyworld.evaluate --base PATH --n 200 --out docs/toyworld-base-quality.json
    python -m ether_diffusion.toyworld.evaluate --scheduler "Euler a" --steps 100 --out quality-euler-a.json
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
from .subjects import get_subject


@dataclass(frozen=True)
class SubjectPrompt:
    """A prompt that places a subject (through its identifier token) in a context the checker can verify."""

    text: str
    background: str
    size: str | None


def subject_prompt(token: str, subject: str, background: str, size: str | None = None) -> SubjectPrompt:
    """'a [size] TOKEN pattern shape on a BACKGROUND background': the subject's family words after the token."""
    return SubjectPrompt(world.subject_caption(get_subject(subject), background, size, token), background, size)


def subject_prompts(token: str, subject: str) -> list[SubjectPrompt]:
    """New contexts for a subject: every background without a size word, then every background with one size
    word, large and small alternating (so both sizes meet backgrounds the instance pictures never show)."""
    out = [subject_prompt(token, subject, background) for background in world.BACKGROUNDS]
    sizes = list(world.SIZES)
    out += [subject_prompt(token, subject, background, sizes[i % len(sizes)])
            for i, background in enumerate(world.BACKGROUNDS)]
    out.append(subject_prompt(token, subject, "black", "small"))
    return list(dict.fromkeys(out))


def judge(image, prompt: SubjectPrompt, subject: str) -> dict[str, float]:
    """Where a picture of a subject in a context is right or wrong, each 0/1 except `similarity`:
    `similarity` the exact-instance score (`checker.subject_similarity`; a match is ≥ `checker.SUBJECT_MATCH`);
    `identity` the subject's family (shape, pattern kind) and its colours; `context` the asked background, and the
    asked size when the prompt names one; `prompt` family and context (prompt fidelity, the stand-in for CLIP-T)."""
    spec = get_subject(subject)
    reading = checker.read(image)
    family = reading.shape == spec.shape and reading.pattern == spec.pattern.kind
    context = reading.background == prompt.background and (prompt.size is None or reading.size == prompt.size)
    return {"similarity": checker.subject_similarity(image, spec),
            "identity": float(family and tuple(reading.colours) == tuple(spec.colours)),
            "context": float(context), "prompt": float(family and context)}


def prompt_fidelity(image, prompt: SubjectPrompt, subject: str) -> float:
    """1 when the picture shows the subject's family (shape and pattern kind) on the asked background, at the
    asked size when the prompt names one; else 0. The stand-in for CLIP-T: it ignores who the object is."""
    return judge(image, prompt, subject)["prompt"]


def named_attributes(caption: str) -> set[str]:
    """The attributes a base-world caption names: always shape, pattern and background; colour and size when
    their words are there (a caption without a pattern word names a solid object)."""
    words = set(caption.split())
    named = {"shape", "pattern", "background"}
    if words & set(world.OBJECT_COLOURS):
        named.add("colour")
    if words & set(world.SIZES):
        named.add("size")
    return named


def base_quality(pipe, n: int, seed: int, steps: int = 25, guidance: float = 7.5, batch: int = 8) -> dict:
    """Generate n seeded captions of unseen scenes, drawn like base training's (size and colour words sometimes
    left out), and score with the checker each attribute the caption names."""
    import torch

    rng = random.Random(seed)
    scenes = [world.random_world_scene(rng) for _ in range(n)]
    captions = [world.base_caption_for_training(rng, s) for s in scenes]
    keys = checker.ATTRIBUTES
    hits, named_counts = {k: 0 for k in keys}, {k: 0 for k in keys}
    all_ok = 0
    by_pattern: dict[str, list[bool]] = {}
    for start in tqdm(range(0, n, batch), desc="base quality"):
        chunk = list(zip(scenes[start : start + batch], captions[start : start + batch]))
        gens = [torch.Generator().manual_seed(seed * 7 + start + i) for i in range(len(chunk))]
        images = pipe([c for _, c in chunk], num_inference_steps=steps, guidance_scale=guidance, generator=gens).images
        for (scene, text), image in zip(chunk, images):
            m = checker.read(image).matches(scene)
            named = named_attributes(text)
            for k in named:
                hits[k] += m[k]
                named_counts[k] += 1
            ok = all(m[k] for k in named)
            all_ok += ok
            by_pattern.setdefault(scene.pattern.kind, []).append(ok)
    return {"n": n, "seed": seed, "steps": steps, "guidance": guidance,
            "accuracy": {k: hits[k] / max(named_counts[k], 1) for k in keys},
            "named": named_counts,
            "all_named_correct": all_ok / n,
            "all_named_correct_by_pattern": {k: sum(v) / len(v) for k, v in sorted(by_pattern.items())}}


def control_scores(scenes: list[world.Scene], images: list) -> dict:
    """How well pictures follow the maps of the scenes they were drawn from (one picture per scene, in order).

    Per picture: IoU between the scene's object mask (what the control map shows) and the object the checker
    finds, and whether background, colour and shape match the caption; `caption_misses` names, by picture index,
    the attributes missed, so that two runs on the same scenes and seeds can be compared picture by picture.
    """
    keys = ("background", "colour", "shape")
    ious, hits, misses = [], {k: 0 for k in keys}, {}
    for index, (scene, image) in enumerate(zip(scenes, images, strict=True)):
        reading = checker.read(image)
        truth = world.shape_mask(scene.shape, scene.cx, scene.cy, scene.radius) >= 0.5
        ious.append(float((truth & reading.mask).sum() / max((truth | reading.mask).sum(), 1)))
        matches = reading.matches(scene)
        for k in keys:
            hits[k] += matches[k]
        missed = [k for k in keys if not matches[k]]
        if missed:
            misses[str(index)] = missed
    return {"mean_iou": float(np.mean(ious)), "iou_over_0.5": float(np.mean([v > 0.5 for v in ious])),
            "accuracy": {k: v / len(scenes) for k, v in hits.items()}, "per_scene_iou": [round(v, 4) for v in ious],
            "caption_misses": misses}


def control_fidelity(pipe, kind: str, n: int, seed: int, steps: int = 20, guidance: float = 7.5,
                     batch: int = 8, control_scale: float = 1.0) -> dict:
    """`control_scores` of n held-out scenes, one picture each, drawn with the active control adapters (their
    features multiplied by `control_scale`), or by the base model alone when none is active."""
    from ..control import needed_control
    from ..pipelines import generate
    from .control_data import RENDERERS, control_scenes

    with_control = bool(needed_control(pipe.unet))  # without: the base model's own placement, for reference
    scenes = control_scenes(n, seed)
    images = []
    for start in tqdm(range(0, n, batch), desc=f"{kind} fidelity"):
        chunk = scenes[start : start + batch]
        images += generate(pipe, [world.caption(s) for s in chunk], seed=seed * 7 + start, steps=steps,
                           guidance=guidance,
                           control_image=[RENDERERS[kind](s) for s in chunk] if with_control else None,
                           control_scale=control_scale)
    return {"n": n, "seed": seed, "steps": steps, "guidance": guidance, **control_scores(scenes, images)}


def _round_trip(vae, images: list) -> np.ndarray:
    """Encode (posterior mean) and decode pictures through the VAE; uint8 arrays, as generated pictures are."""
    import torch

    from ..data import image_to_tensor

    x = torch.stack([image_to_tensor(image) for image in images]).to(vae.device, vae.dtype)
    with torch.no_grad():
        y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    return ((y.float().permute(0, 2, 3, 1).cpu().numpy() + 1) * 127.5).round().astype(np.uint8)


def _codec_scores(vae, rng: random.Random, subject: str, background: str, size: str | None, n: int) -> dict:
    spec = get_subject(subject)
    images = [world.render(world.subject_scene(rng, spec, background=background, size=size)) for _ in range(n)]
    rendered = [checker.subject_similarity(image, spec) for image in images]
    scores = [checker.subject_similarity(array, spec) for array in _round_trip(vae, images)]
    return {"rendered": round(float(np.mean(rendered)), 4), "decoded": round(float(np.mean(scores)), 4),
            "decoded_matches": sum(v >= checker.SUBJECT_MATCH for v in scores), "n": n}


def codec_fidelity(vae, n: int = 16, seed: int = 5) -> dict:
    """The codec's ceiling on subject fidelity: each subject rendered n times per size × background, encoded
    (posterior mean) and decoded, then scored for the exact instance as generated pictures are. No generated
    picture can hold more of the subject than its latents can; small objects lose their detail first.

    Returns {subject: {"small-gray": {"rendered": mean score, "decoded": mean score, "decoded_matches": k,
    "n": n}, …}}.
    """
    rng = random.Random(seed)
    return {subject: {f"{size}-{background}": _codec_scores(vae, rng, subject, background, size, n)
                      for size in world.SIZES for background in world.BACKGROUNDS}
            for subject in world.SUBJECTS}


def codec_ceiling(vae, subject: str, prompts: list[SubjectPrompt], n: int = 8, seed: int = 5) -> dict:
    """`codec_fidelity` for one subject (named or `random-SEED`) in each context prompt (a prompt without a size
    word is rendered at random sizes, as the base would draw it): what share of perfect renders still matches after
    the VAE round trip, so that a context no generator could draw is told apart from one the adapter misses.

    Returns {prompt text: {"rendered", "decoded", "decoded_matches", "n"}}.
    """
    rng = random.Random(seed)
    return {p.text: _codec_scores(vae, rng, subject, p.background, p.size, n) for p in prompts}


def checker_validation(n: int = 500, seed: int = 0) -> dict:
    """The checker on clean renders of the base world (should be ~100%) and on uniform noise (~chance)."""
    rng = random.Random(seed)
    scenes = [world.random_world_scene(rng) for _ in range(n)]
    noise_rng = np.random.default_rng(seed)
    keys = checker.ATTRIBUTES
    result = {}
    for label, images in (("clean", (world.render(s) for s in scenes)),
                          ("noise", (noise_rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in scenes))):
        hits = {k: 0 for k in keys}
        for scene, image in zip(scenes, images):
            for k, v in checker.read(image).matches(scene).items():
                hits[k] += v
        result[label] = {k: v / n for k, v in hits.items()}
    k = len(world.OBJECT_COLOURS)
    result["chance"] = {"background": 1 / len(world.BACKGROUNDS),
                        "colour": 1 / (k + k * (k - 1) // 2),  # one colour or one unordered pair
                        "pattern": 1 / len(world.PATTERNS),
                        "shape": 1 / len(world.SHAPES), "size": 1 / len(world.SIZES)}
    return result


def main(argv: list[str] | None = None) -> None:
    from ..pipelines import SCHEDULERS, load_pipeline, set_scheduler

    ap = argparse.ArgumentParser(description="Measure the embedded base model with the toy-world checker.")
    ap.add_argument("--base", default=None, help="pipeline folder (default: the embedded model)")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1234, help="prompt seed; training used seed 0 scenes")
    ap.add_argument("--steps", type=int, default=25, help="sampling steps")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--scheduler", choices=list(SCHEDULERS), default=None, help="solver (default: the base's own)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    pipe = load_pipeline(args.base)
    if args.scheduler:
        set_scheduler(pipe, args.scheduler)
    quality = base_quality(pipe, args.n, args.seed, steps=args.steps, guidance=args.guidance)
    report = {"base_quality": {**quality, "scheduler": type(pipe.scheduler).__name__}, "checker": checker_validation()}
    atomic_write_text(args.out, json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
