"""What limits the demo's subject match: the codec, or the sampling settings?

    python benchmarks/demo_limits.py [--base MODEL] [--subject striped-circle]
        [--adapter ether-demo/ether_adapter.safetensors] [--guidance 3,5,7.5,10,15] [--steps 20,50]
        [--out docs/benchmarks/demo-limits.json]

Codec: renders the subject in every (size, background) context, passes each picture through the embedded VAE
(encode to the posterior mean, decode) and scores render and reconstruction with the exact-instance checker, so
a context whose reconstructions do not match cannot be matched by any UNet. Sampling (with `--adapter`, a
trained demo adapter): the demo's scores with that adapter at each guidance scale (at the demo's 20 solver
steps) and at each number of solver steps (at guidance 7.5).
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ether_diffusion import demo
from ether_diffusion.atomic import atomic_write_text
from ether_diffusion.lpips import to_tensor
from ether_diffusion.pipelines import load_ether_weights, load_pipeline
from ether_diffusion.toyworld import checker, world


def codec_round_trip(pipe, subject: str, pictures: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for size in world.SIZES:
        for background in world.BACKGROUNDS:
            rendered, decoded = [], []
            for _ in range(pictures):
                image = world.render(world.subject_scene(rng, subject, background=background, size=size))
                with torch.no_grad():
                    y = pipe.vae.decode(pipe.vae.encode(to_tensor(image)).latent_dist.mean).sample
                y = pipe.image_processor.postprocess(y, output_type="pil")[0]  # as generated pictures are made
                rendered.append(checker.subject_similarity(image, subject))
                decoded.append(checker.subject_similarity(y, subject))
            row = {"size": size, "background": background, "render_fidelity": float(np.mean(rendered)),
                   "reconstruction_fidelity": float(np.mean(decoded)),
                   "reconstructions_matching": sum(v >= checker.SUBJECT_MATCH for v in decoded), "pictures": pictures}
            rows.append(row)
            print(f"codec {size:5s} {background:5s} render {row['render_fidelity']:.2f}  reconstruction "
                  f"{row['reconstruction_fidelity']:.2f}  matching {row['reconstructions_matching']}/{pictures}")
    return rows


def sampling_sweep(pipe, subject: str, guidances: list[float], steps: list[int]) -> list[dict]:
    """The adapted model's scores over guidance scales (at the first step count) and over step counts."""
    base = demo.DemoSettings(subject=subject)
    cases = [(g, steps[0]) for g in guidances] + [(base.guidance, s) for s in steps]
    rows = []
    for guidance, n in dict.fromkeys(cases):
        scores, _ = demo.score(pipe, replace(base, guidance=guidance, sampling_steps=n), adapted=True)
        rows.append({"guidance": guidance, "sampling_steps": n, **scores})
        print(f"sampling guidance {guidance:5.1f} steps {n:3d}: subject fidelity {scores['subject_fidelity']:.3f} "
              f"match {scores['subject_match_rate']:.2f} prompt fidelity {scores['prompt_fidelity']:.2f}")
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=None, help="pipeline folder (default: the embedded model)")
    ap.add_argument("--subject", default=demo.DemoSettings.subject, choices=list(world.SUBJECTS))
    ap.add_argument("--adapter", type=Path, default=None, help="a trained demo adapter for the sampling sweep")
    ap.add_argument("--guidance", default="3,5,7.5,10,15")
    ap.add_argument("--steps", default="20,50", help="solver step counts; guidance is swept at the first")
    ap.add_argument("--pictures", type=int, default=8, help="codec pictures per context")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    pipe = load_pipeline(args.base)
    result = {"base": args.base or "embedded", "subject": args.subject,
              "codec": codec_round_trip(pipe, args.subject, args.pictures, args.seed)}
    if args.adapter:
        load_ether_weights(pipe, args.adapter)
        result["adapter"] = str(args.adapter)
        result["sampling"] = sampling_sweep(pipe, args.subject, [float(g) for g in args.guidance.split(",")],
                                            [int(s) for s in args.steps.split(",")])
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
