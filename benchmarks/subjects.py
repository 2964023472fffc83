"""Subject quality on every subject, not one: the paper's DreamBooth recipe as the demo runs it (ETHER+ on the
UNet's and the text encoder's attention, prior preservation at weight 1, 1,400 steps, the demo's pictures,
captions and contexts; the demo's own faster recipe is `--steps 600 --learning-rate 0.02 --prior-loss-weight 0.1`)
over the four named subjects and over
random subjects nobody picked, with ETHER, PEFT LoRA r=4, DoRA r=4 and DeLoRA r=4 side by side under the same
budget, data and seeds (each at its documented learning rate; PEFT peers on the same UNet and text-encoder layers).

    python benchmarks/subjects.py --out docs/benchmarks/subjects.json --grids docs/benchmarks/subjects

Each subject runs in its own process (`--jobs` at a time, one thread each); a subject whose part file exists in
`OUT.parts/` is not run again, so a killed run resumes where it stopped. Per subject and method it reports where
each miss lies, from the toy-world checker over the demo's context prompts × seeds:

- identity: the subject's family (shape, pattern word) and its colours are right;
- instance (match rate): the exact geometry is right (subject similarity ≥ 0.7);
- context: the background, and the size where the prompt names one, are right;
- prompt fidelity (family and context) and class drift (class-prompt pictures that are the subject itself);

and, per context, the codec's ceiling: the share of perfect renders that still match after the VAE round trip,
so that what no generator could draw is told apart from what the adapter fails to learn. One grid picture per
subject: rows are the contexts then the class prompt; columns the base model's seeds, then each method's.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from peft_methods import ETHER_METHODS, RECOMMENDED_LR, add_peft

from ether_diffusion.atomic import atomic_write, atomic_write_text
from ether_diffusion.demo import DemoSettings, dreambooth_config, render_instances, score
from ether_diffusion.pipelines import image_grid, load_pipeline
from ether_diffusion.toyworld import world
from ether_diffusion.toyworld.evaluate import codec_ceiling, subject_prompts
from ether_diffusion.toyworld.subjects import RANDOM_PREFIX, get_subject
from ether_diffusion.train import DreamBoothConfig, train_dreambooth

RANDOM_SEEDS = (11, 22, 33, 44, 55, 66, 77, 88)  # fixed here, never chosen by result
RANDOM_SUBJECTS = tuple(f"{RANDOM_PREFIX}{seed}" for seed in RANDOM_SEEDS)
METHODS = ("etherplus", "ether", "lora-r4", "dora-r4", "delora-r4")
KEYS = ("subject_fidelity", "subject_match_rate", "identity_rate", "context_rate", "prompt_fidelity", "class_drift")


def train_and_score(method: str, lr: float, settings: DemoSettings, folders: dict, run_name: str,
                    **overrides) -> tuple[dict, list]:
    """Train one method with the demo's recipe (`settings`, plus DreamBoothConfig `overrides`) on the rendered
    pictures, PEFT peers on the same UNet (and, when the recipe adapts it, text-encoder) layers; score it as the
    demo does. Returns the row and the pictures."""
    pipe = load_pipeline(settings.base)
    peft = method not in ETHER_METHODS
    extra = None
    if peft:
        extra = add_peft(pipe.unet, method, "attn")
        if settings.train_text_encoder:
            extra += add_peft(pipe.text_encoder, method, "text")
    cfg = dreambooth_config(settings, folders["instance"], folders["runs"] / run_name, folders["class"],
                            method="etherplus" if peft else method, train_adapters=not peft, learning_rate=lr,
                            **overrides)
    t0 = time.time()
    train_dreambooth(cfg, pipe=pipe, extra_trainable=extra)
    seconds = time.time() - t0
    trainable = sum(p.numel() for m in (pipe.unet, pipe.text_encoder) for p in m.parameters() if p.requires_grad)
    scores, rows = score(pipe, settings, adapted=True)
    return {"method": method, "learning_rate": lr, "trainable_parameters": trainable,
            "train_seconds": round(seconds, 1), **scores}, rows


def run_subject(subject: str, args) -> dict:
    """Every method on one subject, in this process; writes the subject's grid and returns its part."""
    settings = DemoSettings(base=args.base, subject=subject, max_steps=args.steps, seed=args.seed,
                            sampling_steps=args.sampling_steps, seeds=args.seeds,
                            instance_images=args.instance_images, prior_loss_weight=args.prior_loss_weight)
    spec = get_subject(subject)
    with tempfile.TemporaryDirectory() as tmp:
        folders = {"instance": Path(tmp) / "instance", "class": Path(tmp) / "class", "runs": Path(tmp) / "runs"}
        render_instances(settings, folders["instance"])
        if args.caption_style == "prompt":  # classic DreamBooth: every picture trained on the instance prompt alone
            for caption in folders["instance"].glob("*.txt"):
                caption.unlink()
        pipe = load_pipeline(args.base)
        ceiling = codec_ceiling(pipe.vae, subject, subject_prompts(settings.token, subject), n=args.codec_n)
        base, grid_rows = score(pipe, settings, adapted=False)
        del pipe
        rows = []
        for method in args.methods.split(","):
            row, images = train_and_score(method, args.learning_rate or RECOMMENDED_LR[method], settings, folders,
                                          method, **json.loads(args.recipe))
            rows.append(row)
            grid_rows = [a + b for a, b in zip(grid_rows, images)]
            print(json.dumps({"subject": subject, **row}), flush=True)
    if args.grids:
        grid = image_grid(grid_rows)
        atomic_write(args.grids / f"{subject}.png", lambda t: grid.save(t, format="PNG"))
    return {"subject": subject, "description": spec.description, "class_word": spec.class_word,
            "codec_ceiling": ceiling, "base": base, "rows": rows}


def summarise(parts: list[dict], group: list[str]) -> dict:
    """Mean and worst over a group of subjects, per method."""
    out = {}
    methods = dict.fromkeys(r["method"] for p in parts for r in p["rows"])
    for method in methods:
        rows = [r for p in parts if p["subject"] in group for r in p["rows"] if r["method"] == method]
        if not rows:
            continue
        out[method] = {"subjects": len(rows), **{f"mean_{k}": round(sum(r[k] for r in rows) / len(rows), 4)
                                                 for k in KEYS},
                       "worst_subject_match_rate": min(r["subject_match_rate"] for r in rows)}
    return out


def table(parts: list[dict]) -> str:
    lines = [f"{'subject':<16}{'method':<11}{'params':>9}{'fidel.':>8}{'identity':>9}{'match':>7}{'context':>8}"
             f"{'prompt':>8}{'drift':>7}{'codec':>7}"]
    for p in parts:
        codec = [v["decoded_matches"] / v["n"] for v in p["codec_ceiling"].values()]
        for r in [{"method": "base", "trainable_parameters": 0, **p["base"]}, *p["rows"]]:
            lines.append(f"{p['subject']:<16}{r['method']:<11}{r['trainable_parameters']:>9,}"
                         f"{r['subject_fidelity']:>8.3f}{r['identity_rate']:>9.2f}{r['subject_match_rate']:>7.2f}"
                         f"{r['context_rate']:>8.2f}{r['prompt_fidelity']:>8.2f}{r['class_drift']:>7.2f}"
                         f"{sum(codec) / len(codec):>7.2f}")
    return "\n".join(lines)


def child_command(subject: str, part: Path, argv: list[str]) -> list[str]:
    return [sys.executable, __file__, *argv, "--only", subject, "--part", str(part)]


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", default="named,random",
                    help="comma-separated names or random-N; 'named' = the four named subjects, 'random' = the "
                         f"script's {len(RANDOM_SUBJECTS)} seeded ones (default: named,random)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--base", default=None)
    # the paper's recipe is `train dreambooth`'s defaults; the learning rates are RECOMMENDED_LR
    ap.add_argument("--steps", type=int, default=DreamBoothConfig.max_steps)
    ap.add_argument("--prior-loss-weight", type=float, default=DreamBoothConfig.prior_loss_weight,
                    help="weight of the class pictures' loss (default: the paper's 1)")
    ap.add_argument("--learning-rate", type=float, default=None,
                    help="one rate for every method (default: each method's documented rate)")
    ap.add_argument("--recipe", default="{}",
                    help="JSON of DreamBoothConfig overrides applied to every run, e.g. '{\"n_blocks\": 4}'")
    ap.add_argument("--instance-images", type=int, default=DemoSettings.instance_images,
                    help="rendered pictures of the subject (the user's photos)")
    ap.add_argument("--caption-style", choices=["sidecar", "prompt"], default="sidecar",
                    help="sidecar: each picture's caption names its size and background (the demo); prompt: the "
                         "instance prompt alone for every picture (classic DreamBooth)")
    ap.add_argument("--seeds", type=int, default=DemoSettings.seeds, help="images per prompt")
    ap.add_argument("--sampling-steps", type=int, default=DemoSettings.sampling_steps)
    ap.add_argument("--codec-n", type=int, default=8, help="perfect renders per context for the codec ceiling")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=1, help="subjects run at once, one process and thread each")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--grids", type=Path, default=None, help="folder for one grid picture per subject")
    ap.add_argument("--only", help=argparse.SUPPRESS)
    ap.add_argument("--part", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.only:  # a child: one subject, one thread
        import torch

        torch.set_num_threads(1)
        atomic_write_text(args.part, json.dumps(run_subject(args.only, args), indent=2))
        return
    groups = {"named": list(world.SUBJECTS), "random": list(RANDOM_SUBJECTS)}
    subjects = [s for item in args.subjects.split(",") for s in groups.get(item, [item])]
    for subject in subjects:
        get_subject(subject)  # an unknown name fails before any run
    parts_dir = args.out.with_suffix(".parts")
    parts_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run_child(subject: str) -> None:
        part = parts_dir / f"{subject}.json"
        if not part.exists():
            subprocess.run(child_command(subject, part, argv), check=True, env=env)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(run_child, subjects))
    parts = [json.loads((parts_dir / f"{s}.json").read_text()) for s in subjects]
    report = {"command": "python benchmarks/subjects.py " + shlex.join(argv),
              "settings": {k: str(v) for k, v in vars(args).items() if k not in ("only", "part")},
              "summary": {name: summarise(parts, group) for name, group in groups.items()},
              "subjects": parts}
    atomic_write_text(args.out, json.dumps(report, indent=2))
    print(table(parts))
    for name, summary in report["summary"].items():
        for method, s in summary.items():
            print(f"{name:<7}{method:<11} mean match {s['mean_subject_match_rate']:.2f} (worst "
                  f"{s['worst_subject_match_rate']:.2f}), identity {s['mean_identity_rate']:.2f}, prompt "
                  f"{s['mean_prompt_fidelity']:.2f}, drift {s['mean_class_drift']:.2f} over {s['subjects']} subjects")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
