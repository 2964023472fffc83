"""What a larger embedded base would cost to train on this CPU: one training step of the toy-world base's UNet and
text encoder (batch 32, the trainer's own `denoiser_step`: loss, clipped AdamW step, EMA update) for the shipped
architecture and the larger ones that could draw patterns in finer detail, interleaved round by round so that every
ratio comes from the same minutes.

    python benchmarks/base_cost.py --out docs/benchmarks/toyworld-base-cost.json

Figures: each variant's median seconds per step and its ratio to the shipped one's in the same round, its
parameters and fp16 size (the embedded model may take 40 MB), and the hours that the shipped model's 27,500 UNet
steps (versions 1 to 2.5, docs/toyworld.md) would take at that speed: the cost of training such a base from scratch.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from ether_diffusion.atomic import atomic_write_text
from ether_diffusion.toyworld.base_model import scheduler_config, text_encoder_config, unet_config
from ether_diffusion.toyworld.train_base import denoiser_step

SHIPPED_STEPS = 27_500  # UNet steps behind the shipped model: 4,000 + 5,000 + 4,500 + 4,000 + 4,000 + 6,000
VARIANTS = {
    "shipped (16×16 latents)": ({}, 16),
    "2 transformer layers per block": ({"transformer_layers_per_block": 2}, 16),
    "first level 128 channels": ({"block_out_channels": (128, 128, 128)}, 16),
    "all levels 1.5× wider": ({"block_out_channels": (96, 192, 192)}, 16),
    "32×32 latents": ({"sample_size": 32}, 32),
}


class Variant:
    """One architecture with its own optimiser, EMA copies and fixed inputs; a step is the trainer's own
    `denoiser_step` (loss, clipped AdamW step, EMA update)."""

    def __init__(self, overrides: dict, latent: int, batch: int, seed: int):
        torch.manual_seed(seed)
        self.unet = UNet2DConditionModel(**{**unet_config(), **overrides})
        text_config = CLIPTextConfig(**text_encoder_config())
        self.text_encoder = CLIPTextModel(text_config)
        params = list(self.unet.parameters()) + list(self.text_encoder.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
        self.ema_pairs = [(copy.deepcopy(m).requires_grad_(False), m) for m in (self.unet, self.text_encoder)]
        self.noise_scheduler = DDPMScheduler(**scheduler_config(), clip_sample=False)
        self.latents = torch.randn(batch, 4, latent, latent)
        self.ids = torch.randint(0, text_config.vocab_size, (batch, text_config.max_position_embeddings))
        self.timesteps = torch.randint(0, 1000, (batch,))
        self.unet_parameters = sum(p.numel() for p in self.unet.parameters())
        self.steps = 0

    def step(self) -> float:
        start = time.perf_counter()
        denoiser_step(self.unet, self.text_encoder, self.optimizer, self.ema_pairs, self.noise_scheduler, self.ids,
                      self.latents, torch.randn_like(self.latents), self.timesteps, self.steps)
        self.steps += 1
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4, help="timed rounds after one warm-up round")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if min(args.rounds, args.batch_size, args.threads) < 1:
        ap.error("--rounds, --batch-size and --threads must be at least 1")
    torch.set_num_threads(args.threads)

    variants = {name: Variant(over, latent, args.batch_size, seed=0) for name, (over, latent) in VARIANTS.items()}
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(args.rounds + 1):
        order = names[round_index % len(names):] + names[:round_index % len(names)]
        spent = {name: variants[name].step() for name in order}
        if round_index:  # the first round warms allocators and caches up
            for name in names:
                times[name].append(spent[name])
        print(f"round {round_index}/{args.rounds}: " + ", ".join(f"{spent[n]:.2f}" for n in names), file=sys.stderr)

    shipped = names[0]
    rows = []
    for name in names:
        seconds = statistics.median(times[name])
        ratio = statistics.median(t / s for t, s in zip(times[name], times[shipped]))
        params = variants[name].unet_parameters
        rows.append({"variant": name, "unet_parameters": params, "unet_fp16_mb": round(params * 2 / 2**20, 1),
                     "seconds_per_step": round(seconds, 2), "times_shipped": round(ratio, 2),
                     "hours_for_shipped_steps": round(seconds * SHIPPED_STEPS / 3600, 1), "overrides": VARIANTS[name][0]})
    print(f"\n{'variant':<34}{'UNet params':>12}{'fp16 MB':>9}{'s/step':>8}{'× shipped':>10}{'h for 27,500 steps':>20}")
    for r in rows:
        print(f"{r['variant']:<34}{r['unet_parameters']:>12,}{r['unet_fp16_mb']:>9}{r['seconds_per_step']:>8}"
              f"{r['times_shipped']:>10}{r['hours_for_shipped_steps']:>20}")
    report = {"command": "python benchmarks/base_cost.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "settings": vars(args), "torch": torch.__version__, "shipped_steps": SHIPPED_STEPS, "rows": rows}
    atomic_write_text(args.out, json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
