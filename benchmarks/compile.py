"""Does `torch.compile(unet)` work with ETHER adapters attached, and what does it gain?

    python benchmarks/compile.py --out docs/benchmarks/compile-cpu.json          # the embedded UNet, 16×16
    python benchmarks/compile.py --device cuda --dtype bf16 --shape sd15 --latent 64

Per method (ETHER n=1 input side, ETHER+ n=1 both sides, on the attention projections): `torch._dynamo.explain`
on one training forward (graphs, graph breaks and their reasons), then the training step (forward + backward +
AdamW) eager and compiled, side by side in one process: compile time (the first steps) and the median step after
warm-up. Inductor needs a C++ compiler on CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from adapters import add_unet_arguments, build_unet, latent_size, sample_inputs, timed, training_step

from ether_diffusion.atomic import atomic_write_text
from ether_diffusion.runtime import DTYPES
from ether_diffusion.train.common import adamw

METHODS = {"ether-n1": ("ether", "input"), "etherplus-n1": ("etherplus", "both")}


def measure(args, method: str) -> dict:
    from ether_diffusion import AdapterConfig, add_adapter

    dtype = DTYPES[args.dtype]
    unet, ctx_len = build_unet(args.shape, args.device, dtype)
    kind, sides = METHODS[method]
    add_adapter(unet, "a", AdapterConfig(method=kind, sides=sides, targets="attn"))
    x, t, ctx = sample_inputs(unet, ctx_len, args.latent, args.device, dtype, args.batch)

    explained = torch._dynamo.explain(unet)(x, t, ctx)
    row = {"method": method, "graphs": explained.graph_count, "graph_breaks": explained.graph_break_count,
           "break_reasons": sorted({str(b.reason) for b in explained.break_reasons})}
    torch._dynamo.reset()

    params = [p for p in unet.parameters() if p.requires_grad]
    opt = adamw(params, lr=1e-4)  # what the trainers use

    row["eager_step_s"] = timed(training_step(unet, (x, t, ctx), opt), args.repeats, 2, args.device)
    compiled_step = training_step(torch.compile(unet), (x, t, ctx), opt)
    start = time.perf_counter()
    compiled_step()
    compiled_step()
    row["compile_s"] = time.perf_counter() - start
    row["compiled_step_s"] = timed(compiled_step, args.repeats, 1, args.device)
    row["compiled_ratio_to_eager"] = row["compiled_step_s"] / row["eager_step_s"]
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="quick", choices=["quick", "sd15"])
    add_unet_arguments(ap)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    args.latent = latent_size(args.shape, args.latent)
    rows = [measure(args, method) for method in args.methods.split(",")]
    print(f"\nshape={args.shape} latent={args.latent} device={args.device} dtype={args.dtype} "
          f"threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"{'method':14s} {'graphs':>6s} {'breaks':>6s} {'eager s':>8s} {'compiled s':>10s} {'ratio':>6s} {'compile s':>9s}")
    for r in rows:
        print(f"{r['method']:14s} {r['graphs']:6d} {r['graph_breaks']:6d} {r['eager_step_s']:8.3f} "
              f"{r['compiled_step_s']:10.3f} {r['compiled_ratio_to_eager']:6.2f} {r['compile_s']:9.1f}")
        for reason in r["break_reasons"]:
            print(f"  break: {reason}")
    if args.out:
        atomic_write_text(args.out, json.dumps(
            {"shape": args.shape, "latent": args.latent, "device": args.device, "dtype": args.dtype,
             "threads": torch.get_num_threads(), "torch": torch.__version__,
             "command": "python benchmarks/compile.py " + " ".join(sys.argv[1:]), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
