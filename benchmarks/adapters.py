"""ETHER / ETHER+ against PEFT LoRA, DoRA, DeLoRA, OFT, HRA and full attention fine-tuning, side by side on one UNet.

    python benchmarks/adapters.py --quick                     # toy-world UNet, 16×16 latents (minutes on a CPU)
    python benchmarks/adapters.py --out docs/benchmarks/sd15-cpu.json          # real SD-1.5 UNet config, 32×32
    python benchmarks/adapters.py --device cuda --dtype bf16 --latent 64 --out docs/benchmarks/sd15-gpu.json

Every method runs in its own subprocess (so peak memory is its own) on the same config, seed and batch. Per
method: trainable parameters, adapter file size, training step time (forward + backward + AdamW, median after
warm-up), peak training memory over the model's resident size, inference time unmerged and merged, each inference
time as a ratio to the same process's plain UNet (adapters switched off, timed right before, equally warm). The
`backward-floor` row trains only `conv_in`'s bias: the frozen UNet's forward and full backward pass, the cost
no adapter can go below. ETHER rows also time multi-adapter serving: 8 different adapters routed per sample in
one batch of 8 vs one adapter on the same batch vs 8 sequential passes.
PEFT (`pip install peft`) is needed for the LoRA / DoRA / DeLoRA / OFT / HRA rows only.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft_methods import add_peft

from ether_diffusion.atomic import atomic_write_text
from ether_diffusion.runtime import DTYPES
from ether_diffusion.train.common import adamw

METHODS = ["backward-floor", "ether-n1", "ether-n4", "etherplus-n1", "etherplus-n4", "lora-r4", "dora-r4",
           "delora-r4", "oft", "hra-r1", "full-attn"]
UNFUSED = "-unfused"  # suffix (not a default row): train through the applied transforms instead of the low-rank update
TARGETS = {  # label: (method, figure, bound, the shape it applies to or None for every shape)
    "ETHER step ≤ 1.05× LoRA r=4": ("ether-n1", "step_time_ratio_to_lora", 1.05, None),
    "ETHER+ step ≤ 1.15× LoRA r=4": ("etherplus-n1", "step_time_ratio_to_lora", 1.15, None),
    "ETHER step ≤ 1.05× the backward floor": ("ether-n1", "step_time_ratio_to_floor", 1.05, "sd15"),
    "ETHER+ step ≤ 1.10× the backward floor": ("etherplus-n1", "step_time_ratio_to_floor", 1.10, "sd15"),
    "ETHER+ step ≤ 1.0× LoRA r=4": ("etherplus-n1", "step_time_ratio_to_lora", 1.0, "sd15"),
    "ETHER step ≤ 1.1× LoRA r=4 (toy shape)": ("ether-n1", "step_time_ratio_to_lora", 1.1, "quick"),
    "ETHER+ step ≤ 1.3× LoRA r=4 (toy shape)": ("etherplus-n1", "step_time_ratio_to_lora", 1.3, "quick"),
    "ETHER step ≤ 0.5× HRA": ("ether-n1", "step_time_ratio_to_hra", 0.5, None),
    "ETHER step ≤ 0.5× OFT": ("ether-n1", "step_time_ratio_to_oft", 0.5, None),
    "ETHER+ step ≤ 0.5× HRA": ("etherplus-n1", "step_time_ratio_to_hra", 0.5, None),
    "ETHER+ step ≤ 0.5× OFT": ("etherplus-n1", "step_time_ratio_to_oft", 0.5, None),
    "ETHER peak memory ≤ LoRA's": ("ether-n1", "peak_memory_ratio_to_lora", 1.0, None),
    "ETHER+ peak memory ≤ LoRA's": ("etherplus-n1", "peak_memory_ratio_to_lora", 1.0, None),
    "ETHER merged inference within 2% of base": ("ether-n1", "merged_inference_ratio_to_base", 1.02, None),
    "ETHER+ merged inference within 2% of base": ("etherplus-n1", "merged_inference_ratio_to_base", 1.02, None),
    "8 routed adapters ≤ 1.2× one adapter's batch": ("etherplus-n1", "routed8_ratio_to_single", 1.2, None),
}


def build_unet(shape: str, device: str, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    if shape == "quick":
        from ether_diffusion.toyworld.base_model import unet_config

        unet, ctx_len = UNet2DConditionModel(**unet_config()), 32
    else:
        unet, ctx_len = UNet2DConditionModel(cross_attention_dim=768), 77  # SD-1.5 (diffusers' default is 1280)
    return unet.to(device, dtype).requires_grad_(False), ctx_len


def add_unet_arguments(ap: argparse.ArgumentParser) -> None:
    """--device, --dtype and --latent, as every UNet benchmark takes them; `latent_size` fills the default."""
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--latent", type=int, default=None, help="latent size (default 16 quick, 32 sd15)")


def latent_size(shape: str, latent: int | None) -> int:
    """The asked latent size, else each shape's own: 16 for the embedded UNet, 32 (256 px) for SD-1.5."""
    return latent or (16 if shape == "quick" else 32)


def sample_inputs(unet, ctx_len: int, latent: int, device: str, dtype: torch.dtype, batch: int = 1) -> tuple:
    """Seeded latents, timestep 500 and text context: the same inputs for every method and benchmark."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, latent, latent, generator=g).to(device, dtype)
    t = torch.full((batch,), 500, device=device)
    ctx = torch.randn(batch, ctx_len, unet.config.cross_attention_dim, generator=g).to(device, dtype)
    return x, t, ctx


def training_step(model, inputs: tuple, opt: torch.optim.Optimizer):
    """One timed training step: the output's mean square as the loss, backward, the optimiser's step."""
    def step():
        model(*inputs).sample.float().square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, repeats: int, warmup: int, device: str) -> float:
    times = []
    for i in range(warmup + repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def attach(unet, method: str) -> None:
    """Put the method's trainable parameters on the attention projections; everything else stays frozen."""
    from ether_diffusion import AdapterConfig, add_adapter

    if method.startswith("ether"):
        kind, n = method.removesuffix(UNFUSED).split("-n")
        add_adapter(unet, "a", AdapterConfig(method=kind, n_blocks=int(n), targets="attn"))
        if method.endswith(UNFUSED):  # the applied transforms, for comparison with the low-rank training path
            from ether_diffusion.layers import EtherLayer

            for layer in unet.modules():
                if isinstance(layer, EtherLayer):
                    layer._low_rank_plan = lambda tokens: None
        return
    if method == "backward-floor":  # one bias at the bottom: the full backward pass, (almost) no parameter work
        unet.conv_in.bias.requires_grad_(True)
        return
    if method == "full-attn":
        for name, module in unet.named_modules():
            if name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or name.endswith("to_out.0"):
                module.requires_grad_(True)
        return
    add_peft(unet, method, "attn")


def adapter_bytes(unet, method: str) -> int:
    from safetensors.torch import save

    if method.startswith("ether"):
        from ether_diffusion.adapter_file import save_adapter

        with tempfile.TemporaryDirectory() as tmp:
            return save_adapter(Path(tmp) / "a.safetensors", {"unet": unet}, "a", with_weight_hash=False).stat().st_size
    tensors = {n: p.detach().cpu().contiguous() for n, p in unet.named_parameters() if p.requires_grad}
    return len(save(tensors))


def enable(unet, method: str, on: bool) -> None:
    """Switch the method's adapters off (the frozen base forward) or back on."""
    if method.startswith("ether"):
        from ether_diffusion import enable_adapters

        enable_adapters(unet, on)
    elif method not in ("full-attn", "backward-floor"):
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in unet.modules():
            if isinstance(module, BaseTunerLayer):
                module.enable_adapters(on)


def merge(unet, method: str) -> None:
    if method.startswith("ether"):
        from ether_diffusion import merge_adapters

        merge_adapters(unet)
    elif method != "full-attn":
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in unet.modules():
            if isinstance(module, BaseTunerLayer):
                module.merge()


def worker(args) -> dict:
    device, dtype = args.device, DTYPES[args.dtype]
    unet, ctx_len = build_unet(args.shape, device, dtype)
    x, t, ctx = sample_inputs(unet, ctx_len, args.latent, device, dtype)
    forward = lambda: unet(x, t, ctx).sample  # noqa: E731
    attach(unet, args.method)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = adamw(params, lr=1e-4)  # what the trainers use
    step = training_step(unet, (x, t, ctx), opt)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = rss_mb()
    step_time = timed(step, args.repeats, 2, device)
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20 if device == "cuda" else peak_rss_mb() - before
    row = {"method": args.method, "trainable_params": sum(p.numel() for p in params),
           "adapter_file_bytes": adapter_bytes(unet, args.method), "step_time_s": step_time,
           "peak_memory_mb": peak}
    if args.training_only:
        return row
    with torch.no_grad():  # base, unmerged, merged back to back, all after the same warm-up
        enable(unet, args.method, False)
        row["base_inference_s"] = base_inference = timed(forward, args.repeats, 1, device)
        enable(unet, args.method, True)
        row["unmerged_inference_s"] = timed(forward, args.repeats, 1, device)
        merge(unet, args.method)
        row["merged_inference_s"] = timed(forward, args.repeats, 1, device)
    row["unmerged_inference_ratio_to_base"] = row["unmerged_inference_s"] / base_inference
    row["merged_inference_ratio_to_base"] = row["merged_inference_s"] / base_inference
    if args.method in args.routing.split(","):
        row.update(routing(unet, args, x, t, ctx))
    return row


def routing(unet, args, x, t, ctx) -> dict:
    """k = 8 adapters: one routed batch of 8 vs one adapter on the batch of 8 vs 8 sequential single passes."""
    from ether_diffusion import AdapterConfig, add_adapter, route_adapters, set_adapters, unmerge_adapters

    unmerge_adapters(unet)
    kind, n = args.method.split("-n")
    names = [f"s{i}" for i in range(8)]
    for name in names:
        add_adapter(unet, name, AdapterConfig(method=kind, n_blocks=int(n), targets="attn"))
    xb, tb, cb = x.repeat(8, 1, 1, 1), t.repeat(8), ctx.repeat(8, 1, 1)
    with torch.no_grad():
        set_adapters(unet, names[0])
        single = timed(lambda: unet(xb, tb, cb).sample, args.repeats, 1, args.device)

        def routed_pass():
            with route_adapters(unet, names):
                unet(xb, tb, cb)

        routed = timed(routed_pass, args.repeats, 1, args.device)

        def sequential():
            for name in names:
                set_adapters(unet, name)
                unet(x, t, ctx)

        seq = timed(sequential, args.repeats, 1, args.device)
    return {"single_adapter_batch8_s": single, "routed8_batch8_s": routed, "sequential8_s": seq,
            "routed8_ratio_to_single": routed / single, "routed8_ratio_to_sequential": routed / seq}


def median_row(method_runs: dict[int, dict]) -> dict:
    """One method's rounds (by round index) → one row: the median of each figure, and the step times of every
    round."""
    runs = list(method_runs.values())
    row = dict(runs[0])
    for key, value in row.items():
        if isinstance(value, float):
            row[key] = statistics.median(run[key] for run in runs)
    row["step_time_s_rounds"] = [run["step_time_s"] for run in runs]
    return row


def step_time_ratio(method_runs: dict[int, dict], peer_runs: dict[int, dict]) -> float:
    """The median over rounds of the method's step time over the peer's in the same round: the two ran minutes
    apart, so a round that the machine made slow for both cancels out, where a ratio of the two medians keeps
    it. With a single round it is the plain ratio; without a round both finished, the ratio of the medians."""
    shared = sorted(method_runs.keys() & peer_runs.keys())
    if not shared:
        return (statistics.median(r["step_time_s"] for r in method_runs.values())
                / statistics.median(r["step_time_s"] for r in peer_runs.values()))
    return statistics.median(method_runs[i]["step_time_s"] / peer_runs[i]["step_time_s"] for i in shared)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="toy-world UNet at 16×16 latents, few repeats")
    add_unet_arguments(ap)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--rounds", type=int, default=1, help="run every method this many times, in turn; report medians, and "
                    "step-time ratios as the median of the per-round ratios")
    ap.add_argument("--training-only", action="store_true", help="skip inference and multi-adapter serving timings")
    ap.add_argument("--routing", default=None, help="ETHER methods that also time 8 routed adapters "
                    "(default: all ETHER rows with --quick, ether-n1,etherplus-n1 otherwise)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.shape = args.shape or ("quick" if args.quick else "sd15")
    args.latent = latent_size(args.shape, args.latent)
    args.repeats = args.repeats or (5 if args.shape == "quick" else 3)
    if args.routing is None:
        ether_rows = [m for m in METHODS if m.startswith("ether")]
        args.routing = ",".join(ether_rows if args.shape == "quick" else ["ether-n1", "etherplus-n1"])
    if args.worker:
        args.method = args.worker
        print(json.dumps(worker(args)))
        return
    runs: dict[str, dict[int, dict]] = {}
    for round_index in range(args.rounds):  # methods take turns, so slow drifts of the machine hit all alike
        for method in args.methods.split(","):
            cmd = [sys.executable, __file__, "--worker", method, "--shape", args.shape, "--device", args.device,
                   "--dtype", args.dtype, "--latent", str(args.latent), "--repeats", str(args.repeats),
                   "--routing", args.routing]
            cmd += ["--training-only"] if args.training_only else []
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{method}: failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else '?'}")
                continue
            runs.setdefault(method, {})[round_index] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{method}: round {round_index + 1} done", flush=True)
    rows = [median_row(method_runs) for method_runs in runs.values()]
    by = {r["method"]: r for r in rows}
    for r in rows:
        for peer, key in (("lora-r4", "lora"), ("delora-r4", "delora"), ("hra-r1", "hra"), ("oft", "oft"),
                          ("backward-floor", "floor")):
            if peer in by:
                r[f"step_time_ratio_to_{key}"] = step_time_ratio(runs[r["method"]], runs[peer])
        if "lora-r4" in by:
            r["peak_memory_ratio_to_lora"] = r["peak_memory_mb"] / max(by["lora-r4"]["peak_memory_mb"], 1e-9)
    targets = {}
    for label, (method, key, bound, shape) in TARGETS.items():
        if shape not in (None, args.shape):
            continue
        value = by.get(method, {}).get(key)
        targets[label] = {"value": value, "bound": bound, "met": value is not None and value <= bound}
    header = (f"{'method':14s} {'params':>10s} {'file KB':>9s} {'step s':>8s} {'×LoRA':>6s} {'peak MB':>8s} "
              f"{'unmerged×':>9s} {'merged×':>8s} {'routed8×':>8s}")
    print(f"\nshape={args.shape} latent={args.latent} device={args.device} dtype={args.dtype} "
          f"threads={torch.get_num_threads()} repeats={args.repeats} rounds={args.rounds}\n{header}")
    for r in rows:
        print(f"{r['method']:14s} {r['trainable_params']:10,d} {r['adapter_file_bytes'] / 1024:9.1f} "
              f"{r['step_time_s']:8.3f} {r.get('step_time_ratio_to_lora', float('nan')):6.2f} "
              f"{r['peak_memory_mb']:8.1f} {r.get('unmerged_inference_ratio_to_base', float('nan')):9.3f} "
              f"{r.get('merged_inference_ratio_to_base', float('nan')):8.3f} "
              f"{r.get('routed8_ratio_to_single', float('nan')):8.2f}")
    print("\ntargets:")
    for label, t in targets.items():
        if t["value"] is None:
            print(f"  [not measured] {label}")
        else:
            print(f"  [{'met' if t['met'] else 'MISSED'}] {label}: {t['value']:.3f}")
    if args.out:
        report = {"shape": args.shape, "latent": args.latent, "device": args.device, "dtype": args.dtype,
                  "threads": torch.get_num_threads(), "repeats": args.repeats, "rounds": args.rounds,
                  "command": "python benchmarks/adapters.py " + " ".join(sys.argv[1:]), "rows": rows,
                  "targets": targets}
        atomic_write_text(args.out, json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
