"""Control fidelity on the toy world: how closely generated pictures follow a segmentation / edge map.

    python benchmarks/control_fidelity.py --kind segmentation --out docs/benchmarks/control-fidelity-segmentation.json
    python benchmarks/control_fidelity.py ... --methods encoder,etherplus@1e-2 --out a.json   # NAME@LR: adapter LR
    python benchmarks/control_fidelity.py --merge a.json b.json --out both.json   # runs made in parallel

Trains, on the embedded base model, with the same rendered pairs, seeds and step budget: the control encoder
alone, encoder + ETHER, encoder + ETHER+ (both on attn+ff unless --targets, LR 1e-3 unless NAME@LR), encoder + PEFT LoRA r=4
(LR 6e-4) and encoder + PEFT DeLoRA r=4 (LR 6e-3, lambda 15) on the same layers (trained in the same loop); the encoder's LR is the same for all (`--encoder-lr`,
paper 1e-4). Each is scored on the same held-out scenes and seeds by the toy-world checker: IoU between the
map's object and the object found in the picture, and caption attribute accuracy; every row's per-scene IoU
gain over the encoder-only row comes with a bootstrap 95% interval. The base model without control is scored
too, as the floor.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from peft_methods import add_peft

from ether_diffusion.atomic import atomic_write_text
from ether_diffusion.control import INJECTIONS
from ether_diffusion.pipelines import load_pipeline
from ether_diffusion.toyworld.control_data import write_control_dataset
from ether_diffusion.toyworld.evaluate import control_fidelity
from ether_diffusion.train import ControlConfig, train_control

METHODS = {  # name → (ControlConfig overrides, PEFT method or None)
    "encoder": ({"train_adapters": False}, None),
    "ether": ({"method": "ether", "learning_rate": 1e-3}, None),
    "etherplus": ({"method": "etherplus", "learning_rate": 1e-3}, None),
    "lora": ({"train_adapters": False, "learning_rate": 6e-4}, "lora-r4"),
    "delora": ({"train_adapters": False, "learning_rate": 6e-3}, "delora-r4"),  # PEFT's docs: 10-100x LoRA's LR
}


def parse_method(spec: str) -> tuple[str, float | None]:
    """`etherplus` or `etherplus@1e-2`: a method, optionally with the adapters' learning rate."""
    name, _, lr = spec.partition("@")
    if name not in METHODS:
        raise SystemExit(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return name, float(lr) if lr else None


def run_method(spec: str, data: Path, work: Path, args) -> list[dict]:
    """Train one method, then score it at each control scale (rows `SPEC`, and `SPEC×SCALE` for scales other
    than 1)."""
    name, lr = parse_method(spec)
    overrides, peft_kind = METHODS[name]
    overrides = {**overrides, "n_blocks": args.n_blocks} if name.startswith("ether") else dict(overrides)
    if lr is not None:
        overrides["learning_rate"] = lr
    pipe = load_pipeline(args.base)
    cfg = ControlConfig(data_dir=str(data), output_dir=str(work / spec), base=args.base, control_kind=args.kind,
                        control_injection=args.injection, max_steps=args.steps, train_batch_size=args.batch, cache_latents=True, seed=args.seed,
                        checkpointing_steps=args.steps, encoder_learning_rate=args.encoder_lr, targets=args.targets,
                        **overrides)
    extra = add_peft(pipe.unet, peft_kind, cfg.targets) if peft_kind else None
    t0 = time.time()
    train_control(cfg, pipe=pipe, extra_trainable=extra)
    seconds = time.time() - t0
    summary = json.loads((work / spec / "training_summary.json").read_text())
    trainable = summary["trainable_parameters"]  # the loop counts every group it trained, extra ones included
    pipe.unet.eval()
    rows = []
    for scale in args.control_scales:
        with torch.no_grad():
            scores = control_fidelity(pipe, args.kind, args.eval_n, args.eval_seed, steps=args.eval_steps,
                                      control_scale=scale)
        label = spec if args.injection == "conv_in" else f"{spec}/{args.injection}"
        rows.append({"method": label if scale == 1 else f"{label}×{scale:g}", "control_scale": scale,
                     "injection": args.injection, "targets": args.targets,
                     "learning_rate": None if name == "encoder" else overrides["learning_rate"],
                     "trainable_params": trainable, "encoder_params": summary["encoder_parameters"],
                     "train_seconds": round(seconds, 1), "final_loss": summary["final_loss"], **scores})
    return rows


def paired_gain(row: dict, reference: dict, resamples: int = 10_000) -> dict:
    """Per-scene IoU gain of `row` over `reference` (same scenes, same seeds): mean, bootstrap 95% interval,
    and the share of scenes where it is higher / lower."""
    gain = np.array(row["per_scene_iou"]) - np.array(reference["per_scene_iou"])
    means = gain[np.random.default_rng(0).integers(0, len(gain), (resamples, len(gain)))].mean(1)
    return {"vs": reference["method"], "mean": float(gain.mean()),
            "ci95": [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))],
            "scenes_higher": float((gain > 0).mean()), "scenes_lower": float((gain < 0).mean())}


def report(rows: list[dict], settings: dict, out: Path, notes: list[str] | None = None) -> None:
    """Add each row's paired gain over the encoder-only row of the same injection, print the table, write the
    JSON (with the merged runs' notes on how they were run, if any)."""
    encoders = {r.get("injection", "conv_in"): r for r in rows
                if r["method"].partition("/")[0] == "encoder" and "per_scene_iou" in r}
    for r in rows:
        encoder = encoders.get(r.get("injection", "conv_in"))
        if encoder and r is not encoder and "per_scene_iou" in r:
            r["iou_gain_vs_encoder"] = paired_gain(r, encoder)
    document = {"kind": settings["kind"], "command": "python benchmarks/control_fidelity.py " + shlex.join(sys.argv[1:]),
                "settings": settings, "rows": rows, **({"notes": notes} if notes else {})}
    atomic_write_text(out, json.dumps(document, indent=2))
    print(f"\n{'method':<20}{'trainable':>11}{'IoU':>7}{'IoU>0.5':>9}{'bg':>6}{'colour':>8}{'shape':>7}"
          f"  gain over encoder [95% CI]")
    for r in rows:
        a, g = r["accuracy"], r.get("iou_gain_vs_encoder")
        gain = f"  {g['mean']:+.3f} [{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}]" if g else ""
        print(f"{r['method']:<20}{r['trainable_params']:>11,}{r['mean_iou']:>7.3f}{r['iou_over_0.5']:>9.2f}"
              f"{a['background']:>6.2f}{a['colour']:>8.2f}{a['shape']:>7.2f}{gain}")
    print(f"written {out}")


def merge(files: list[Path]) -> tuple[list[dict], dict, list[str]]:
    """Rows of runs made in parallel with the same data, budget and held-out scenes (checked), the settings with
    the command of every run behind them (a merged file counts as the runs it merged), and their notes."""
    same = ("kind", "rows", "steps", "batch", "encoder_lr", "seed", "eval_n", "eval_seed", "eval_steps", "base")
    runs = [json.loads(f.read_text()) for f in files]
    for f, run in zip(files[1:], runs[1:]):
        differ = [k for k in same if run["settings"].get(k) != runs[0]["settings"].get(k)]
        if differ:
            raise SystemExit(f"{f} was run with other settings ({', '.join(differ)}) than {files[0]}")
    rows = {r["method"]: r for run in runs for r in run["rows"]}  # a later run's row replaces an earlier one
    commands = [c for run in runs for c in run["settings"].get("merged_runs", [run["command"]])]
    notes = [n for run in runs for n in run.get("notes", [run["note"]] if "note" in run else [])]
    return list(rows.values()), {**runs[0]["settings"], "merged_runs": commands}, notes


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", choices=["segmentation", "edges"], default="segmentation")
    ap.add_argument("--methods", default="encoder,ether,etherplus,lora",
                    help="comma-separated; NAME@LR sets the adapters' learning rate, e.g. etherplus@1e-2")
    ap.add_argument("--n-blocks", type=int, default=1, help="ETHER / ETHER+ diagonal blocks")
    ap.add_argument("--targets", default="attn+ff",
                    help="the layers every method adapts: a preset or comma-separated regular expressions, as "
                         "`train control --targets` (default: attn+ff)")
    ap.add_argument("--injection", choices=INJECTIONS, default="conv_in",
                    help="where the encoder's features enter: conv_in (the paper) or multiscale (every down block); "
                         "rows of multiscale runs are named METHOD/multiscale")
    ap.add_argument("--skip-base", action="store_true", help="do not score the base model without control")
    ap.add_argument("--base", default=None)
    ap.add_argument("--rows", type=int, default=2000, help="rendered training pairs")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--encoder-lr", type=float, default=1e-4, help="the control encoder's learning rate (paper: 1e-4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-n", type=int, default=96)
    ap.add_argument("--eval-seed", type=int, default=4321)
    ap.add_argument("--eval-steps", type=int, default=20)
    ap.add_argument("--control-scales", type=lambda v: [float(x) for x in v.split(",")], default=[1.0],
                    help="comma-separated: score each trained method with its control features × each scale")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--merge", type=Path, nargs="+", default=None,
                    help="combine the JSON of runs made in parallel (same settings) into --out; trains nothing")
    args = ap.parse_args(argv)
    if args.merge:
        rows, settings, notes = merge(args.merge)
        report(rows, settings, args.out, notes)
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_control_dataset(data, args.kind, args.rows, seed=args.seed)
        if not args.skip_base:
            base = load_pipeline(args.base)
            rows.append({"method": "base (no control)", "trainable_params": 0, **control_fidelity(
                base, args.kind, args.eval_n, args.eval_seed, steps=args.eval_steps)})
            del base
        for name in args.methods.split(","):
            for row in run_method(name, data, Path(tmp), args):
                rows.append(row)
                print(json.dumps(row), flush=True)
    report(rows, {k: str(v) for k, v in vars(args).items()}, args.out)


if __name__ == "__main__":
    main()
