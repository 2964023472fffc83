"""Learning-rate robustness on the toy world (the paper's claim: ETHER / ETHER+ stay good across learning
rates where LoRA and OFT fail to learn or collapse).

    python benchmarks/lr_robustness.py --out docs/benchmarks/lr-robustness.json --plot docs/benchmarks/lr-robustness.png

DreamBooth on one held-out subject with prior preservation, through the project's own training loop (PEFT LoRA
r=4 and OFT are injected on the same attention layers and trained as extra parameters), at each method's
recommended learning rate (the paper's: ETHER/ETHER+ 6e-3, LoRA 6e-4, OFT 6e-5) times 0.1, 1, 10 and 100, with
the same step budget, data and seeds. Scores from the toy-world checker over the demo's context prompts:
subject fidelity (does it look like the subject) and prompt fidelity (is it where/how the prompt asks).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from peft_methods import add_peft

from ether_diffusion.atomic import atomic_write_text
from ether_diffusion.demo import DemoSettings, dreambooth_config, render_instances, score
from ether_diffusion.pipelines import load_pipeline
from ether_diffusion.toyworld import world
from ether_diffusion.train import train_dreambooth

RECOMMENDED = {"ether": 6e-3, "etherplus": 6e-3, "lora-r4": 6e-4, "oft": 6e-5}
MULTIPLIERS = (0.1, 1.0, 10.0, 100.0)


def run(method: str, lr: float, folders: dict, settings: DemoSettings, args) -> dict:
    pipe = load_pipeline(args.base)
    peft = method not in ("ether", "etherplus")
    extra = add_peft(pipe.unet, method, "attn") if peft else None
    cfg = dreambooth_config(settings, folders["instance"], folders["runs"] / f"{method}-{lr:g}", folders["class"],
                            method="etherplus" if peft else method, train_adapters=not peft, max_steps=args.steps,
                            learning_rate=lr, num_class_images=args.class_images)
    t0 = time.time()
    train_dreambooth(cfg, pipe=pipe, extra_trainable=extra)
    seconds = time.time() - t0
    scores, _ = score(pipe, settings, adapted=True)
    return {"method": method, "learning_rate": lr, "multiplier": lr / RECOMMENDED[method],
            "train_seconds": round(seconds, 1), **scores}


def plot(rows: list[dict], base: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "subject_fidelity", "subject fidelity"), (axes[1], "prompt_fidelity", "prompt fidelity")):
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = [(r["multiplier"], r[key]) for r in rows if r["method"] == method]
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
    ap.add_argument("--methods", default=",".join(RECOMMENDED))
    ap.add_argument("--multipliers", default=",".join(f"{m:g}" for m in MULTIPLIERS))
    ap.add_argument("--base", default=None)
    ap.add_argument("--subject", default="striped-circle", choices=list(world.SUBJECTS))
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--class-images", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=2, help="images per prompt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args(argv)

    settings = DemoSettings(base=args.base, subject=args.subject, seeds=args.seeds, sampling_steps=20)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folders = {"instance": Path(tmp) / "instance", "class": Path(tmp) / "class", "runs": Path(tmp) / "runs"}
        render_instances(settings, folders["instance"])
        base, _ = score(load_pipeline(args.base), settings, adapted=False)
        for method in args.methods.split(","):
            for mult in (float(m) for m in args.multipliers.split(",")):
                rows.append(run(method, RECOMMENDED[method] * mult, folders, settings, args))
                print(json.dumps(rows[-1]), flush=True)
    report = {"command": "python benchmarks/lr_robustness.py " + " ".join(sys.argv[1:]), "subject": args.subject,
              "settings": {k: str(v) for k, v in vars(args).items()}, "base": base, "rows": rows}
    atomic_write_text(args.out, json.dumps(report, indent=2))
    if args.plot:
        plot(rows, base, args.plot)
    print(f"\nbase model: subject fidelity {base['subject_fidelity']:.3f}, prompt fidelity {base['prompt_fidelity']:.2f}")
    print(f"{'method':<11}{'LR':>9}{'× rec.':>8}{'subject':>9}{'prompt':>8}")
    for r in rows:
        print(f"{r['method']:<11}{r['learning_rate']:>9.0e}{r['multiplier']:>8g}{r['subject_fidelity']:>9.3f}"
              f"{r['prompt_fidelity']:>8.2f}")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
