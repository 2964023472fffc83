"""Forward + backward time of one ETHER-adapted Linear against the plain Linear (the O(in) claim, in numbers).

    python benchmarks/linear.py [--in-features 1280] [--tokens 4096] [--repeats 30] [--out docs/benchmarks/linear.json]

Variants are timed interleaved (round-robin), so machine noise hits them alike; medians and ratios to the
plain layer are reported. The input requires grad, as inside a network. Baselines: the plain layer training its
weight, the plain frozen layer (the least any adapter method pays) and PEFT's LoRA r=4; the adapted layers train
only their vectors, through the low-rank training path and, for comparison, through the applied transforms.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from ether_diffusion import AdapterConfig, add_adapter
from ether_diffusion.atomic import atomic_write_text

VARIANTS = {
    "plain Linear (weight trained)": None,
    "plain Linear (frozen)": "frozen",
    "ETHER n=1 (input side)": AdapterConfig(method="ether", n_blocks=1, targets="proj"),
    "ETHER n=4 (input side)": AdapterConfig(method="ether", n_blocks=4, targets="proj"),
    "ETHER+ n=1 (both sides)": AdapterConfig(method="etherplus", n_blocks=1, targets="proj"),
    "ETHER+ n=4 (both sides)": AdapterConfig(method="etherplus", n_blocks=4, targets="proj"),
    "ETHER n=1, applied transforms": (AdapterConfig(method="ether", n_blocks=1, targets="proj"), "applied"),
    "ETHER+ n=1, applied transforms": (AdapterConfig(method="etherplus", n_blocks=1, targets="proj"), "applied"),
    "LoRA r=4 (PEFT)": "lora",
}


def build(config: AdapterConfig | tuple | str | None, d: int) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(d, d))
    if config == "frozen":
        model.requires_grad_(False)
    elif config == "lora":
        from peft_methods import add_peft

        add_peft(model, "lora-r4", "proj")
    elif isinstance(config, tuple):  # the applied transforms: the layer's general path, not the low-rank one
        add_adapter(model, "a", config[0])
        model.proj._low_rank_plan = lambda tokens: None
    elif config is not None:
        add_adapter(model, "a", config)
    return model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--in-features", type=int, default=1280)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    d = args.in_features
    models = {name: build(cfg, d) for name, cfg in VARIANTS.items()}
    x = torch.randn(args.tokens, d, requires_grad=True)  # as inside a network: gradients flow to the input
    times: dict[str, list[float]] = {name: [] for name in models}
    for r in range(args.repeats + 3):
        for name, model in models.items():
            t0 = time.perf_counter()
            model(x).square().mean().backward()
            elapsed = time.perf_counter() - t0
            model.zero_grad(set_to_none=True)
            x.grad = None
            if r >= 3:  # warm-up
                times[name].append(elapsed)
    plain = statistics.median(times["plain Linear (weight trained)"])
    rows = [{"variant": name, "median_ms": statistics.median(t) * 1e3, "ratio_to_plain": statistics.median(t) / plain,
             "trainable_params": sum(p.numel() for p in models[name].parameters() if p.requires_grad)}
            for name, t in times.items()]
    print(f"in = out = {d}, {args.tokens} tokens, forward + backward, {args.repeats} interleaved repeats, "
          f"{torch.get_num_threads()} threads")
    print(f"{'variant':32s} {'median ms':>10s} {'× plain':>8s} {'trainable':>10s}")
    for row in rows:
        print(f"{row['variant']:32s} {row['median_ms']:10.2f} {row['ratio_to_plain']:8.3f} {row['trainable_params']:10,d}")
    if args.out:
        atomic_write_text(args.out, json.dumps({"in_features": d, "tokens": args.tokens, "repeats": args.repeats,
                                                "threads": torch.get_num_threads(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
