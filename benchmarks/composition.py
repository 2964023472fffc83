"""A subject adapter and a control adapter together: is the subject drawn where the map says?

    ether-diffusion demo --out subject-run                         # the subject adapter (ringed triangle)
    ether-diffusion demo --task control --out control-run          # the segmentation control adapter
    python benchmarks/composition.py --subject-adapter subject-run/ether_adapter.safetensors \\
        --control-adapter control-run/ether_control.safetensors --out docs/benchmarks/composition.json

Both files load into the embedded base at once. For each of the subject's context prompts (new backgrounds and
sizes) and several placements, the map is the segmentation of the subject at that placement; the same prompt,
map and seed are drawn four ways: base alone, subject adapter alone, control adapter alone, both. Each picture
is scored for the exact subject (subject similarity ≥ the checker's match threshold) and for the map (IoU of the
object found with the map's object), so the table shows what each adapter keeps when the other is added.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from tqdm.auto import tqdm

from ether_diffusion.atomic import atomic_write, atomic_write_text
from ether_diffusion.demo import DemoSettings
from ether_diffusion.pipelines import generate, image_grid, load_ether_weights, load_pipeline, set_ether_adapters
from ether_diffusion.toyworld import checker, world
from ether_diffusion.toyworld.evaluate import control_scores, subject_prompts
from ether_diffusion.toyworld.subjects import get_subject

SETUPS = {"base": (0.0, 0.0), "subject only": (1.0, 0.0), "control only": (0.0, 1.0), "both": (1.0, 1.0)}


def scenes_for(subject: str, token: str, placements: int, seed: int) -> list[tuple[str, world.Scene]]:
    """(prompt, scene) pairs: every context prompt of the subject, each at `placements` seeded placements."""
    rng = random.Random(seed)
    out = []
    for prompt in subject_prompts(token, subject):
        for _ in range(placements):
            out.append((prompt.text, world.subject_scene(rng, subject, background=prompt.background,
                                                         size=prompt.size)))
    return out


def score_setup(pipe, pairs: list[tuple[str, world.Scene]], subject: str, with_control: bool,
                args) -> tuple[dict, list]:
    """Draw every (prompt, map) pair once with the active adapters; subject and map scores of the pictures."""
    spec = get_subject(subject)
    images = []
    for i, (prompt, scene) in enumerate(tqdm(pairs, desc="sampling")):
        images += generate(pipe, prompt, seed=args.seed + i, steps=args.sampling_steps, guidance=args.guidance,
                           control_image=world.render_segmentation(scene) if with_control else None)
    similarity = [checker.subject_similarity(image, spec) for image in images]
    scores = control_scores([scene for _, scene in pairs], images)
    return {"subject_match_rate": sum(s >= checker.SUBJECT_MATCH for s in similarity) / len(images),
            "subject_fidelity": sum(similarity) / len(images), **scores}, images


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subject-adapter", type=Path, required=True)
    ap.add_argument("--control-adapter", type=Path, required=True)
    ap.add_argument("--subject", default=DemoSettings.subject, help="the subject the subject adapter learnt "
                                                                    f"(default: the demo's, {DemoSettings.subject})")
    ap.add_argument("--token", default=DemoSettings.token, help="its identifier word")
    ap.add_argument("--base", default=None)
    ap.add_argument("--placements", type=int, default=4, help="placements (maps) per context prompt")
    ap.add_argument("--sampling-steps", type=int, default=40)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--grid", type=Path, default=None, help="picture: one row per map; map, then each setup")
    args = ap.parse_args(argv)

    pipe = load_pipeline(args.base)
    subject_name = load_ether_weights(pipe, args.subject_adapter, "subject")
    control_name = load_ether_weights(pipe, args.control_adapter, "control")
    subject = get_subject(args.subject).name  # an unknown name fails before any picture
    pairs = scenes_for(subject, args.token, args.placements, args.seed)
    rows, columns = [], [[world.render_segmentation(scene) for _, scene in pairs]]
    for setup, (s, c) in SETUPS.items():
        set_ether_adapters(pipe, [subject_name, control_name], [s, c])
        scores, images = score_setup(pipe, pairs, subject, bool(c), args)
        rows.append({"setup": setup, "subject_strength": s, "control_strength": c, **scores})
        columns.append(images)
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "per_scene_iou"}), flush=True)
    if args.grid:
        grid = image_grid([list(r) for r in zip(*columns)])
        atomic_write(args.grid, lambda tmp: grid.save(tmp, format="PNG"))
    atomic_write_text(args.out, json.dumps({
        "command": "python benchmarks/composition.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "subject": subject, "pictures_per_setup": len(pairs), "rows": rows}, indent=2))
    print(f"\n{'setup':<14}{'subject match':>14}{'mean IoU':>10}{'IoU>0.5':>9}{'bg':>6}{'colour':>8}{'shape':>7}")
    for r in rows:
        a = r["accuracy"]
        print(f"{r['setup']:<14}{r['subject_match_rate']:>14.2f}{r['mean_iou']:>10.3f}{r['iou_over_0.5']:>9.2f}"
              f"{a['background']:>6.2f}{a['colour']:>8.2f}{a['shape']:>7.2f}")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
