"""ETHER, ETHER+ and PEFT LoRA r=16 training steps on a FLUX.1-shaped transformer at the real width (3072, 24 heads
of 128, text width 4096; random init, as few blocks as the machine allows), on the `attn` layers of diffusers'
FLUX script.

    python benchmarks/dit_blocks.py --out docs/benchmarks/flux-blocks-cpu.json           # 1 double + 1 single block
    python benchmarks/dit_blocks.py --double 2 --single 4 --image-tokens 1024 --device cuda --dtype bf16 --out …

Step times are interleaved in one process (every method on its own copy of the model, the frozen weights shared;
each round times one step of each, the order rotating), reported as each method's median and the median of its
per-round ratio to LoRA's. Peak memory comes from one process per method (peak RSS on CPU, peak allocated on
CUDA, above the loaded model and inputs). Targets: ETHER+ step ≤ 1.0× LoRA's, peak memory ≤ LoRA's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

import torch
from adapters import peak_rss_mb, rss_mb, timed
from interleaved import interleaved_rounds, quartiles, share_into
from peft_methods import add_peft

from ether_diffusion import AdapterConfig, add_adapter
from ether_diffusion.atomic import atomic_write_text
from ether_diffusion.runtime import DTYPES
from ether_diffusion.train.common import adamw

METHODS = ("backward-floor", "ether-n1", "etherplus-n1", "lora-r16")
TARGETS = {"etherplus-n1 step / lora-r16": ("etherplus-n1", "step_time_ratio_to_lora", 1.0),
           "etherplus-n1 peak memory / lora-r16": ("etherplus-n1", "peak_memory_ratio_to_lora", 1.0)}


def build(args):
    """A FLUX.1-dev-shaped transformer with `args.double` / `args.single` blocks, frozen, and fixed inputs."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=args.double, num_single_layers=args.single,
                                   attention_head_dim=128, num_attention_heads=args.heads, joint_attention_dim=4096,
                                   pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=[16, 56, 56])
    model = (model.to(args.device) if dtype == torch.float32 else model.to(args.device, dtype)).requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    side = int(args.image_tokens**0.5)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    floats = dict(hidden_states=torch.randn(1, side * side, 64, generator=g),
                  encoder_hidden_states=torch.randn(1, args.text_tokens, 4096, generator=g),
                  pooled_projections=torch.randn(1, 768, generator=g), timestep=torch.tensor([0.5]),
                  guidance=torch.tensor([3.5]))
    inputs = {k: v.to(args.device, dtype) for k, v in floats.items()}
    inputs["txt_ids"] = torch.zeros(args.text_tokens, 3, device=args.device)
    inputs["img_ids"] = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float().to(args.device)
    return model, inputs


def attach(model, method: str) -> list[torch.nn.Parameter]:
    """The method's trainable parameters on the `attn` preset's layers (everything else frozen)."""
    if method == "backward-floor":  # one bias at the input: the whole backward pass, (almost) no parameter work
        model.x_embedder.bias.requires_grad_(True)
        return [model.x_embedder.bias]
    if method.startswith("ether"):
        kind, n = method.split("-n")
        add_adapter(model, "a", AdapterConfig(method=kind, n_blocks=int(n), targets="attn"))
        return [p for p in model.parameters() if p.requires_grad]
    return add_peft(model, method, "attn")


def step_fn(model, inputs: dict, params: list[torch.nn.Parameter]):
    opt = adamw(params, lr=1e-4)

    def step():
        model(**inputs, return_dict=False)[0].float().square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def memory_worker(args) -> dict:
    """One method alone in this process: parameters, adapter size, peak memory of training steps."""
    model, inputs = build(args)
    before = torch.cuda.memory_allocated() if args.device == "cuda" else rss_mb()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    params = attach(model, args.worker)
    step = step_fn(model, inputs, params)
    timed(step, 2, 1, args.device)
    peak = ((torch.cuda.max_memory_allocated() - before) / 2**20 if args.device == "cuda"
            else peak_rss_mb() - before)
    return {"method": args.worker, "trainable_params": sum(p.numel() for p in params),
            "adapter_mb_fp32": sum(p.numel() for p in params) * 4 / 2**20, "peak_memory_mb": peak}


def sibling(model, args):
    """The same model again, its frozen tensors shared (and the floor's bias copied, since it trains in place)."""
    with torch.device("meta"):
        twin, _ = build(argparse.Namespace(**{**vars(args), "device": "meta"}))
    return share_into(twin, model, "x_embedder.bias")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--double", type=int, default=1, help="double-stream blocks (FLUX.1-dev: 19)")
    ap.add_argument("--single", type=int, default=1, help="single-stream blocks (FLUX.1-dev: 38)")
    ap.add_argument("--heads", type=int, default=24, help="attention heads of 128 (FLUX.1: 24, width 3072)")
    ap.add_argument("--image-tokens", type=int, default=256, help="packed latent patches (1024 px: 4096)")
    ap.add_argument("--text-tokens", type=int, default=64, help="T5 tokens (FLUX.1-dev trains with 512)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(memory_worker(args)))
        return
    methods = args.methods.split(",")
    flags = ["--double", str(args.double), "--single", str(args.single), "--heads", str(args.heads),
             "--image-tokens", str(args.image_tokens),
             "--text-tokens", str(args.text_tokens), "--device", args.device, "--dtype", args.dtype]
    memory = {}
    for method in methods:
        done = subprocess.run([sys.executable, __file__, "--worker", method, *flags], capture_output=True, text=True,
                              check=True)
        memory[method] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{method}: {memory[method]}", flush=True)

    first, inputs = build(args)
    models = [first] + [sibling(first, args) for _ in methods[1:]]
    steps = {m: step_fn(model, inputs, attach(model, m)) for model, m in zip(models, methods)}
    rounds = interleaved_rounds(steps, args.rounds, 1, args.device)
    rows = []
    for method in methods:
        row = {**memory[method], "step_time_s": statistics.median(rd[method] for rd in rounds)}
        for peer, key in (("lora-r16", "lora"), ("backward-floor", "floor")):
            if peer in methods:
                row[f"step_time_ratio_to_{key}_quartiles"] = quartiles([rd[method] / rd[peer] for rd in rounds])
                row[f"step_time_ratio_to_{key}"] = row[f"step_time_ratio_to_{key}_quartiles"][1]
        if "lora-r16" in memory:
            row["peak_memory_ratio_to_lora"] = row["peak_memory_mb"] / max(memory["lora-r16"]["peak_memory_mb"], 1e-9)
        rows.append(row)
    by = {r["method"]: r for r in rows}
    targets = {label: {"value": by.get(m, {}).get(key), "bound": bound,
                       "met": by.get(m, {}).get(key) is not None and by[m][key] <= bound}
               for label, (m, key, bound) in TARGETS.items()}
    report = {"command": "python benchmarks/dit_blocks.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "settings": vars(args), "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "torch_threads": torch.get_num_threads(), "rows": rows, "targets": targets}
    print(f"\n{'method':<16}{'params':>12}{'step s':>9}{'× LoRA':>8}{'× floor':>9}{'peak MB':>10}{'× LoRA':>8}")
    for r in rows:
        print(f"{r['method']:<16}{r['trainable_params']:>12,}{r['step_time_s']:>9.3f}"
              f"{r.get('step_time_ratio_to_lora', float('nan')):>8.3f}{r.get('step_time_ratio_to_floor', float('nan')):>9.3f}"
              f"{r['peak_memory_mb']:>10.0f}{r.get('peak_memory_ratio_to_lora', float('nan')):>8.3f}")
    for label, t in targets.items():
        print(f"target {label} ≤ {t['bound']}: {t['value']} ({'met' if t['met'] else 'NOT met'})")
    if args.out:
        atomic_write_text(args.out, json.dumps(report, indent=2))
        print(f"written {args.out}")


if __name__ == "__main__":
    main()
