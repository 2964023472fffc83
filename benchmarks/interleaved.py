"""Training step times of several methods, interleaved step by step in one process: the low-noise comparison.

    python benchmarks/interleaved.py --rounds 12 --out docs/benchmarks/sd15-cpu-interleaved.json   # SD-1.5, 32×32
    python benchmarks/interleaved.py --quick --rounds 40                                           # embedded UNet

`adapters.py` runs each method in its own process (so each peak memory is its own), minutes apart; on a shared
CPU the machine's speed drifts by 10% or more between those runs, more than the few percent that separate the
methods at the SD-1.5 shape. Here every method gets its own copy of the same UNet (the frozen weights shared, so
memory stays one model's), and each round times one training step of every method back to back, the order
rotating from round to round; each step's time is set against the others of its round. Figures: each method's
median step time, and the median (with the quartiles) over rounds of its step time over the floor's and over
LoRA's in the same round. No memory figures: the methods share one process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
from adapters import add_unet_arguments, attach, build_unet, latent_size, sample_inputs, timed, training_step

from ether_diffusion.atomic import atomic_write_text
from ether_diffusion.runtime import DTYPES
from ether_diffusion.train.common import adamw


def share_into(twin: torch.nn.Module, model: torch.nn.Module, own: str) -> torch.nn.Module:
    """`twin` (the same config, built on the meta device) holding `model`'s tensors (frozen, so sharing is safe);
    `own`, the one parameter a method trains in place (the floor's bias), gets its own copy."""
    state = {k: (v.detach().clone() if k == own else v.detach()) for k, v in model.state_dict().items()}
    twin.load_state_dict(state, assign=True)
    return twin.requires_grad_(False)


def sibling(model: torch.nn.Module, shape: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """A second UNet of the same config sharing the first one's tensors, `conv_in`'s bias copied."""
    with torch.device("meta"):
        twin, _ = build_unet(shape, "meta", dtype)
    return share_into(twin, model, "conv_in.bias").to(device)


def interleaved_rounds(steps: dict, rounds: int, warmup: int, device: str) -> list[dict[str, float]]:
    """`warmup` untimed steps of each method, then `rounds` rounds each timing one step of every method back to
    back, the order rotating from round to round: {method: seconds} per round."""
    methods = list(steps)
    for _ in range(warmup):
        for method in methods:
            steps[method]()
    times = []
    for r in range(rounds):
        order = methods[r % len(methods):] + methods[:r % len(methods)]
        times.append({method: timed(steps[method], 1, 0, device) for method in order})
        print(f"round {r + 1}/{rounds}: " + " ".join(f"{m} {times[-1][m]:.3f}" for m in methods), flush=True)
    return times


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return q[0], statistics.median(values), q[2]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the embedded UNet at 16×16 latents")
    add_unet_arguments(ap)
    ap.add_argument("--methods", default="backward-floor,ether-n1,etherplus-n1,lora-r4,dora-r4,delora-r4")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps of each method first")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    shape = "quick" if args.quick else "sd15"
    latent = latent_size(shape, args.latent)
    dtype = DTYPES[args.dtype]
    methods = args.methods.split(",")

    first, ctx_len = build_unet(shape, args.device, dtype)
    inputs = sample_inputs(first, ctx_len, latent, args.device, dtype)
    # every sibling is made from the plain UNet before any method attaches to it, whatever the order
    unets = [first] + [sibling(first, shape, args.device, dtype) for _ in methods[1:]]
    steps = {}
    for unet, method in zip(unets, methods):
        attach(unet, method)
        steps[method] = training_step(unet, inputs, adamw([p for p in unet.parameters() if p.requires_grad], lr=1e-4))

    rounds = interleaved_rounds(steps, args.rounds, args.warmup, args.device)

    rows = []
    for method in methods:
        row = {"method": method, "step_time_s": statistics.median(rd[method] for rd in rounds),
               "step_time_s_rounds": [rd[method] for rd in rounds]}
        for peer, key in (("backward-floor", "floor"), ("lora-r4", "lora")):
            if peer in methods:
                q1, med, q3 = quartiles([rd[method] / rd[peer] for rd in rounds])
                row[f"step_time_ratio_to_{key}"], row[f"step_time_ratio_to_{key}_quartiles"] = med, [q1, q3]
        rows.append(row)
    print(f"\nshape={shape} latent={latent} device={args.device} dtype={args.dtype} "
          f"threads={torch.get_num_threads()} rounds={args.rounds} (interleaved)")
    print(f"{'method':14s} {'step s':>8s} {'× floor [quartiles]':>24s} {'× LoRA [quartiles]':>24s}")
    for row in rows:
        cells = []
        for key in ("floor", "lora"):
            if f"step_time_ratio_to_{key}" in row:
                q1, q3 = row[f"step_time_ratio_to_{key}_quartiles"]
                cells.append(f"{row[f'step_time_ratio_to_{key}']:.3f} [{q1:.3f} {q3:.3f}]")
            else:
                cells.append("–")
        print(f"{row['method']:14s} {row['step_time_s']:8.3f} {cells[0]:>24s} {cells[1]:>24s}")
    if args.out:
        report = {"shape": shape, "latent": latent, "device": args.device, "dtype": args.dtype,
                  "threads": torch.get_num_threads(), "rounds": args.rounds, "warmup": args.warmup,
                  "command": "python benchmarks/interleaved.py " + " ".join(sys.argv[1:]), "rows": rows}
        atomic_write_text(args.out, json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
