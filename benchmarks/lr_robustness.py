"""Subject quality side by side, and learning-rate robustness (the paper's claims: ETHER+ is at least as faithful
as LoRA with at most half its parameters; ETHER / ETHER+ stay good across learning rates where LoRA and OFT
fail to learn or collapse), on the toy world.

    python benchmarks/lr_robustness.py --subjects all --multipliers 1 --out docs/benchmarks/subject-quality.json
    python benchmarks/lr_robustness.py --out docs/benchmarks/lr-robustness.json --plot docs/benchmarks/lr-robustness.png

DreamBooth on held-out subjects with prior preservation, through the project's own training loop (PEFT LoRA
r=4 and OFT are injected on the same UNet attention layers and trained as extra parameters; the text encoder
is left alone for every method), at each method's recommended learning rate (the paper's: ETHER/ETHER+ 6e-3,
LoRA 6e-4, OFT 6e-5) times the multipliers (default 0.1, 1, 10 and 100), with the same step budget, data and
seeds. Scores from the toy-world checker over the demo's context prompts: subject fidelity and match rate (does
it look like the exact subject), prompt fidelity (is it where/how the prompt asks), and class drift (how often
the class prompt draws the subject itself).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from peft_methods import RECOMMENDED_LR
from subjects import train_and_score

from ether_diffusion.atomic import atomic_write_text
from ether_diffusion.demo import DemoSettings, render_instances, score
from ether_diffusion.pipelines import load_pipeline
from ether_diffusion.toyworld import world
from ether_diffusion.train import DreamBoothConfig

METHODS = ("ether", "etherplus", "lora-r4", "oft")
MULTIPLIERS = (0.1, 1.0, 10.0, 100.0)


def run(method: str, lr: float, folders: dict, settings: DemoSettings) -> dict:
    row, _ = train_and_score(method, lr, settings, folders, f"{method}-{lr:g}")
    return {"subject": settings.subject, **row, "multiplier": lr / RECOMMENDED_LR[method]}


def plot(rows: list[dict], base: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "subject_fidelity", "subject fidelity"), (axes[1], "prompt_fidelity", "prompt fidelity")):
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = sorted((r["multiplier"], r[key]) for r in rows if r["method"] == method)
            ax.plot(*zip(*pts), marker="o", label=method)
        ax.axhline(base[key], color="gray", linestyle="--", label="base model")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate / recommended")
        ax.set_title(title)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"comma-separated, any of {', '.join(RECOMMENDED_LR)} (default: {','.join(METHODS)})")
    ap.add_argument("--multipliers", default=",".join(f"{m:g}" for m in MULTIPLIERS))
    ap.add_argument("--base", default=None)
    ap.add_argument("--subjects", default=DemoSettings.subject,
                    help=f"comma-separated, or all: {', '.join(world.SUBJECTS)} (default: the demo's subject)")
    ap.add_argument("--steps", type=int, default=DreamBoothConfig.max_steps)
    ap.add_argument("--class-images", type=int, default=DemoSettings.class_images)
    ap.add_argument("--seeds", type=int, default=DemoSettings.seeds, help="images per prompt")
    ap.add_argument("--sampling-steps", type=int, default=DemoSettings.sampling_steps,
                    help="solver steps for the class pictures and the evaluation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args(argv)

    subjects = list(world.SUBJECTS) if args.subjects == "all" else args.subjects.split(",")
    rows, bases = [], {}
    for subject in subjects:
        settings = DemoSettings(base=args.base, subject=subject, seeds=args.seeds, train_text_encoder=False,
                                seed=args.seed, sampling_steps=args.sampling_steps, max_steps=args.steps,
                                class_images=args.class_images, prior_loss_weight=DreamBoothConfig.prior_loss_weight)
        with tempfile.TemporaryDirectory() as tmp:
            folders = {"instance": Path(tmp) / "instance", "class": Path(tmp) / "class", "runs": Path(tmp) / "runs"}
            render_instances(settings, folders["instance"])
            bases[subject], _ = score(load_pipeline(args.base), settings, adapted=False)
            for method in args.methods.split(","):
                for mult in (float(m) for m in args.multipliers.split(",")):
                    rows.append(run(method, RECOMMENDED_LR[method] * mult, folders, settings))
                    print(json.dumps(rows[-1]), flush=True)
    report = {"command": "python benchmarks/lr_robustness.py " + " ".join(sys.argv[1:]),
              "settings": {k: str(v) for k, v in vars(args).items()}, "base": bases, "rows": rows}
    atomic_write_text(args.out, json.dumps(report, indent=2))
    if args.plot:
        plot([r for r in rows if r["subject"] == subjects[0]], bases[subjects[0]], args.plot)
    print(f"\n{'subject':<16}{'method':<11}{'LR':>9}{'× rec.':>8}{'params':>10}{'fidelity':>9}{'match':>7}{'prompt':>8}"
          f"{'drift':>7}")
    for subject, base in bases.items():
        print(f"{subject:<16}{'base':<11}{'':>9}{'':>8}{0:>10,}{base['subject_fidelity']:>9.3f}"
              f"{base['subject_match_rate']:>7.2f}{base['prompt_fidelity']:>8.2f}{base['class_drift']:>7.2f}")
    for r in rows:
        print(f"{r['subject']:<16}{r['method']:<11}{r['learning_rate']:>9.0e}{r['multiplier']:>8g}"
              f"{r['trainable_parameters']:>10,}{r['subject_fidelity']:>9.3f}{r['subject_match_rate']:>7.2f}"
              f"{r['prompt_fidelity']:>8.2f}{r['class_drift']:>7.2f}")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
