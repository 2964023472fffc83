"""Train the embedded base model from scratch on rendered toy-world scenes (CPU, about two hours).

    python -m ether_diffusion.toyworld.train_base --out runs/base --vae-steps 2500 --unet-steps 4000

Stages: (1) the VAE on random 32×32 crops (fully convolutional, so crops are 4× cheaper and transfer to 64×64);
(2) encode a fixed pool of scenes once (latent caching); (3) UNet + text encoder jointly, with EMA weights.
Every step draws from generators seeded by (seed, step), so a run interrupted and started again with the same
arguments continues from its checkpoints (`OUT/vae-checkpoint.pt`, `OUT/checkpoint.pt`) to the same result.
The result is a StableDiffusionPipeline folder in fp16 at `OUT/pipeline`.
"""

from __future__ import annotations

import argparse
import copy
import math
import json
import random
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..atomic import atomic_write, atomic_write_text
from ..data import image_to_tensor
from ..train.common import diffusion_loss, min_snr_weights
from . import world
from .base_model import scheduler_config, text_encoder_config, unet_config, vae_config
from .tokenizer import IDENTIFIER_TOKENS, write_tokenizer

CFG_DROPOUT = 0.1


def render_pool(n: int, seed: int, pattern_weights: dict[str, float] | None = None) -> tuple[list[world.Scene], torch.Tensor]:
    """n seeded scenes of the base world (solid and patterned objects) and their pictures."""
    rng = random.Random(seed)
    scenes = [world.random_world_scene(rng, pattern_weights) for _ in range(n)]
    return scenes, torch.stack([image_to_tensor(world.render(s)) for s in tqdm(scenes, desc="render", leave=False)])


def parse_pattern_weights(ap: argparse.ArgumentParser, items: list[str]) -> dict[str, float] | None:
    """'checker=3' -> {'checker': 3.0}; a bad kind or weight is a usage error (exit status 2)."""
    weights: dict[str, float] = {}
    for item in items:
        kind, _, value = item.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if kind not in world.PATTERNS[1:] or not weight > 0:
            ap.error(f"--pattern-weight {item!r}: expected KIND=W with KIND one of "
                     f"{', '.join(world.PATTERNS[1:])} and W > 0")
        weights[kind] = weight
    return weights or None


def training_log(path: Path):
    """A function that appends one timestamped JSON row to `path` per call (the run's log, kept across resumes)."""

    def log(row: dict) -> None:
        with open(path, "a") as fh:
            fh.write(json.dumps({"time": round(time.time(), 1), **row}) + "\n")

    return log


def save_checkpoint(path: Path, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def codec_lr(peak: float, step: int, total: int) -> float:
    """Cosine decay from `peak` to 5% of it over the run: sharper reconstructions at the end."""
    return 0.05 * peak + 0.95 * peak * 0.5 * (1 + math.cos(math.pi * step / total))


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, object_weight: float = 0.0) -> torch.Tensor:
    """L2 + ½·L1 between pictures in [-1, 1]; with `object_weight` w, pixels that differ from the picture's
    background (its top-left pixel; toy-world backgrounds are flat) count 1 + w times: a small object covers a
    few percent of the picture, and an unweighted loss is mostly about the plain background."""
    error = recon - target
    if not object_weight:
        return error.pow(2).mean() + 0.5 * error.abs().mean()
    on_object = (target - target[:, :, :1, :1]).abs().amax(1, keepdim=True) > 0.1
    weight = 1 + object_weight * on_object.to(error.dtype)
    return (error.pow(2) * weight).mean() + 0.5 * (error.abs() * weight).mean()


def resume_codec(vae, opt: torch.optim.Optimizer, ckpt_path: Path) -> int:
    """Load a codec run's checkpoint (VAE and optimiser) if there is one; returns the step to continue from."""
    if not ckpt_path.exists():
        return 0
    ck = torch.load(ckpt_path, weights_only=True)
    vae.load_state_dict(ck["vae"])
    opt.load_state_dict(ck["opt"])
    return int(ck["step"])


def train_codec(vae, opt: torch.optim.Optimizer, batch_loss, steps: int, seed: int, peak_lr: float, log, stage: str,
                ckpt_path: Path, checkpointing_steps: int = 250) -> None:
    """The codec's training loop, shared by the VAE stage and the decoder tuning: `batch_loss(generator)` draws a
    batch and returns its loss; the LR is cosine-decayed (`codec_lr`); every step's generator is seeded by
    (seed, step) and a checkpoint is written every `checkpointing_steps`, so a restarted run resumes exactly."""
    start = resume_codec(vae, opt, ckpt_path)
    t0 = time.time()
    bar = tqdm(desc=stage, total=steps, initial=start, unit="step")
    for step in range(start, steps):
        g = torch.Generator().manual_seed(seed * 100_003 + step)
        for group in opt.param_groups:
            group["lr"] = codec_lr(peak_lr, step, steps)
        loss = batch_loss(g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % 100 == 0:
            log({"stage": stage, "step": step + 1, "loss": loss.item(), "seconds": round(time.time() - t0, 1)})
        if (step + 1) % checkpointing_steps == 0:
            save_checkpoint(ckpt_path, {"vae": vae.state_dict(), "opt": opt.state_dict(), "step": step + 1})
    bar.close()


def train_vae(vae, images: torch.Tensor, steps: int, seed: int, log, ckpt_path: Path, peak_lr: float = 2e-3) -> None:
    """Reconstruction + tiny KL on random 32×32 crops, cosine-decayed LR; resumable from `ckpt_path`."""

    def batch_loss(g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(images), (32,), generator=g)
        oy, ox = (int(v) for v in torch.randint(0, 33, (2,), generator=g))
        x = images[idx, :, oy : oy + 32, ox : ox + 32]
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.mean + post.std * torch.randn(post.mean.shape, generator=g)).sample
        return reconstruction_loss(recon, x) + 1e-6 * post.kl().mean()

    opt = torch.optim.AdamW(vae.parameters(), lr=peak_lr, weight_decay=0.0)
    train_codec(vae, opt, batch_loss, steps, seed, peak_lr, log, "vae", ckpt_path)


@torch.no_grad()
def encode_pool(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for chunk in tqdm(images.split(128), desc="encode", leave=False):
        dist = vae.encode(chunk).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def settle_identifier_tokens(text_encoder, tokenizer) -> None:
    """Give the never-trained identifier tokens (sks, zwx, …) the mean embedding of the colour words.

    They stay absent from every caption, but start as "some colour" rather than as untrained noise, so "a sks
    circle" draws a plain circle (the class prior DreamBooth expects of a rare token), which an adapter then
    turns into the subject.
    """
    table = text_encoder.get_input_embeddings().weight
    colours = tokenizer.convert_tokens_to_ids([f"{c}</w>" for c in world.OBJECT_COLOURS])
    identifiers = tokenizer.convert_tokens_to_ids([f"{t}</w>" for t in IDENTIFIER_TOKENS])
    table[identifiers] = table[colours].mean(0)


@torch.no_grad()
def transfer_text_encoder(old, old_tokenizer, new, new_tokenizer) -> int:
    """Copy a trained text encoder into one with a larger vocabulary: every weight, and the embedding row of each
    token both vocabularies share (matched by spelling, so ids may differ). Returns the number of new tokens."""
    state = {k: v for k, v in old.state_dict().items() if "token_embedding" not in k}
    new.load_state_dict(state, strict=False)
    old_vocab, table, old_table = old_tokenizer.get_vocab(), new.get_input_embeddings().weight, old.get_input_embeddings().weight
    fresh = 0
    for token, index in new_tokenizer.get_vocab().items():
        if token in old_vocab:
            table[index] = old_table[old_vocab[token]]
        else:
            fresh += 1
    return fresh


@torch.no_grad()
def grow_unet(unet, state: dict) -> list[str]:
    """Load a smaller UNet's weights into one with attention the smaller one lacks, as an identity.

    Every tensor of `state` must fit; the UNet's own tensors missing from it may only belong to attention: whole
    attention blocks, whose output projections are zeroed, or extra transformer layers inside an existing block
    (a deeper `transformer_layers_per_block`), whose residual branches (self-attention, cross-attention and
    feed-forward outputs) are zeroed. So the grown UNet computes exactly what the smaller one did and training
    continues from there. Returns the names of the new blocks and layers.
    """
    missing, unexpected = unet.load_state_dict(state, strict=False)
    strays = [key for key in missing if ".attentions." not in key]
    if unexpected or strays:
        raise ValueError(f"cannot grow this UNet: unexpected {unexpected[:3]}, missing outside attention {strays[:3]}")
    new = []
    for name in sorted({re.match(r"(.*?\.attentions\.\d+)\.", key)[1] for key in missing}):
        block = unet.get_submodule(name)
        if f"{name}.proj_out.weight" in missing:  # the whole block is new
            branches = [block.proj_out]
            new.append(name)
        else:  # new transformer layers inside a block the smaller UNet had
            layers = sorted({int(re.match(rf"{re.escape(name)}\.transformer_blocks\.(\d+)\.", key)[1])
                             for key in missing if key.startswith(f"{name}.")})
            branches = [m for i in layers for m in (block.transformer_blocks[i].attn1.to_out[0],
                                                     block.transformer_blocks[i].attn2.to_out[0],
                                                     block.transformer_blocks[i].ff.net[2])]
            new += [f"{name}.transformer_blocks.{i}" for i in layers]
        for layer in branches:
            layer.weight.zero_()
            layer.bias.zero_()
    return new


def unet_lr(peak: float, step: int, total: int) -> float:
    """Warm-up over 200 steps, constant, then a cosine down to 10% over the last 30% of the steps.

    The decay depends only on the final step count, so a run continued to more steps repeats the earlier
    constant-LR steps exactly and only the tail changes.
    """
    lr = peak * min(1.0, (step + 1) / 200)
    start = int(0.7 * total)
    if step >= start:
        progress = (step - start) / max(1, total - start)
        lr *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return lr


def denoiser_step(unet, text_encoder, optimizer: torch.optim.Optimizer, ema_pairs: list, noise_scheduler,
                  ids: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, step: int,
                  min_snr_gamma: float | None = None) -> torch.Tensor:
    """One joint training step of the UNet and text encoder: noise-prediction loss (Min-SNR weighted when a gamma is
    given), AdamW with the gradient norm clipped to 1, then the EMA copies (`ema_pairs`: (ema, live) modules)
    moved towards the live weights. Returns the loss. The benchmark of larger bases times exactly this step."""
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    pred = unet(noisy, timesteps, text_encoder(ids)[0]).sample
    weights = min_snr_weights(noise_scheduler, timesteps, min_snr_gamma) if min_snr_gamma else None
    loss = diffusion_loss(pred, noise, weights).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], 1.0)
    optimizer.step()
    decay = min(0.999, (1 + step) / (10 + step))
    with torch.no_grad():
        for ema, live in ema_pairs:
            for pe, pl in zip(ema.parameters(), live.parameters()):
                pe.lerp_(pl, 1 - decay)
    return loss


def main(argv: list[str] | None = None) -> None:
    from diffusers import AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from ..errors import EtherError
    from ..pipelines import load_pipeline

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--vae-steps", type=int, default=2500)
    ap.add_argument("--unet-steps", type=int, default=4000)
    ap.add_argument("--pool", type=int, default=20000, help="number of rendered training scenes")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--vae-lr", type=float, default=2e-3, help="peak VAE learning rate (cosine-decayed)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init-from", type=Path, default=None,
                    help="start VAE, UNet and text encoder from this pipeline folder instead of from scratch "
                         "(continued training; words new to the vocabulary get fresh embeddings)")
    ap.add_argument("--pattern-weight", action="append", default=[], metavar="KIND=W",
                    help="show patterned objects of KIND W times as often as the other kinds in the UNet's pool "
                         f"(repeatable; kinds: {', '.join(world.PATTERNS[1:])}), e.g. checker=3 for the hardest kind")
    ap.add_argument("--transformer-layers", type=int, default=1,
                    help="transformer layers per attention block; with --init-from a smaller UNet, the extra layers "
                         "start as identities")
    ap.add_argument("--min-snr-gamma", type=float, default=None,
                    help="weight each sample's loss by min(SNR, gamma) / SNR (Min-SNR weighting, e.g. 5): less "
                         "effort on nearly clean timesteps, more on the noisy ones where layout and pattern are set")
    args = ap.parse_args(argv)
    pattern_weights = parse_pattern_weights(ap, args.pattern_weight)
    try:  # fp32 on the CPU; a folder that is no pipeline is one sentence, before any output is written
        init = load_pipeline(str(args.init_from)) if args.init_from else None
    except EtherError as exc:
        ap.error(f"--init-from: {exc}")

    torch.manual_seed(args.seed)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    log = training_log(out / "training-log.jsonl")

    tok_dir = out / "tokenizer"
    write_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)

    vae_path = out / "vae.pt"
    vae = AutoencoderKL(**vae_config())
    if vae_path.exists():
        vae.load_state_dict(torch.load(vae_path, weights_only=True))
    else:
        if init is not None:
            vae.load_state_dict(init.vae.state_dict())
        _, vae_images = render_pool(8000, args.seed + 1)
        train_vae(vae, vae_images, args.vae_steps, args.seed, log, out / "vae-checkpoint.pt", args.vae_lr)
        save_checkpoint(vae_path, vae.state_dict())
    vae.eval().requires_grad_(False)

    scenes, images = render_pool(args.pool, args.seed, pattern_weights)
    means, stds = encode_pool(vae, images)
    scaling = float(1.0 / means.std())
    recon = vae.decode(means[:256]).sample
    vae_mse = float(F.mse_loss(recon, images[:256]))
    log({"stage": "latents", "scaling_factor": scaling, "vae_recon_mse": vae_mse})
    vae.register_to_config(scaling_factor=scaling)

    unet = UNet2DConditionModel(**unet_config(args.transformer_layers))
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_encoder_config()))
    if init is not None:
        grown = grow_unet(unet, init.unet.state_dict())
        fresh = transfer_text_encoder(init.text_encoder, init.tokenizer, text_encoder, tokenizer)
        log({"stage": "init", "from": str(args.init_from), "new_tokens": fresh, "new_attention_blocks": grown})
        del init
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    noise_scheduler = DDPMScheduler(**scheduler_config(), clip_sample=False)

    ckpt_path = out / "checkpoint.pt"
    start = 0
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=True)
        for module, key in ((unet, "unet"), (text_encoder, "text_encoder"), (ema_unet, "ema_unet"),
                            (ema_text, "ema_text"), (opt, "opt")):
            module.load_state_dict(ck[key])
        start = int(ck["step"])
        print(f"resuming at step {start}")

    t0 = time.time()
    bar = tqdm(desc="unet+text", total=args.unet_steps, initial=start, unit="step")
    for step in range(start, args.unet_steps):
        g = torch.Generator().manual_seed(args.seed * 100_003 + step)  # per-step seeds: exact resume
        rng = random.Random(args.seed * 100_003 + step)
        idx = torch.randint(0, len(scenes), (args.batch_size,), generator=g)
        caps = ["" if rng.random() < CFG_DROPOUT else world.base_caption_for_training(rng, scenes[i]) for i in idx]
        ids = tokenizer(caps, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        latents = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=g)) * scaling
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, 1000, (args.batch_size,), generator=g)
        for group in opt.param_groups:
            group["lr"] = unet_lr(args.lr, step, args.unet_steps)
        loss = denoiser_step(unet, text_encoder, opt, [(ema_unet, unet), (ema_text, text_encoder)], noise_scheduler,
                             ids, latents, noise, t, step, args.min_snr_gamma)
        done = step + 1
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if done % 50 == 0:
            log({"stage": "unet", "step": done, "loss": loss.item(), "seconds": round(time.time() - t0, 1)})
        if done % 250 == 0:
            save_checkpoint(ckpt_path, dict(unet=unet.state_dict(), text_encoder=text_encoder.state_dict(),
                                            ema_unet=ema_unet.state_dict(), ema_text=ema_text.state_dict(),
                                            opt=opt.state_dict(), step=done))
    bar.close()
    log({"stage": "done", "steps": args.unet_steps})

    settle_identifier_tokens(ema_text, tokenizer)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=ema_text, tokenizer=tokenizer, unet=ema_unet,
        scheduler=DPMSolverMultistepScheduler(**scheduler_config()),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.to(torch.float16).save_pretrained(out / "pipeline")
    atomic_write_text(out / "pipeline" / "TRAINING.json", json.dumps(
        {"command": "python -m ether_diffusion.toyworld.train_base " + " ".join(sys.argv[1:] if argv is None else argv), "args": {
            k: str(v) for k, v in vars(args).items()}, "steps": args.unet_steps, "vae_recon_mse": vae_mse}, indent=2))
    print(f"saved {out / 'pipeline'}")


if __name__ == "__main__":
    main()
