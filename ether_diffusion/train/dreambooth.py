"""DreamBooth-style subject training with ETHER / ETHER+ adapters, on accelerate.

`train_dreambooth(config)` is the whole job: validate inputs, load the base, make missing class images, train
the adapter vectors (UNet, optionally text encoders), checkpoint, validate, and write
`OUTPUT_DIR/ether_adapter.safetensors` with a model card. Runs unchanged under `accelerate launch` (DDP): every
rank computes its own micro-batches, gradients of the (small) adapter vectors are averaged with one all-reduce,
and only rank 0 writes files.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from .. import inject
from ..adapter_file import copy_vectors, read_adapter_file, save_adapter
from ..atomic import atomic_write, atomic_write_text
from ..data import Example, check_resolution, load_folder, prepare
from ..errors import EtherError
from ..layers import AdapterConfig
from ..pipelines import describe_base, image_grid, load_pipeline, pipeline_components
from .common import (
    check_finite,
    diffusion_loss,
    encode_text,
    load_checkpoint_state,
    make_lr_scheduler,
    make_optimizer,
    min_snr_weights,
    noisy_latents_and_target,
    resolve_resume,
    save_checkpoint,
    step_generator,
    unet_kwargs,
)
from .config import DreamBoothConfig, save_resolved

ADAPTER_NAME = "default"
ADAPTER_FILE = "ether_adapter.safetensors"


def _accelerator(cfg: DreamBoothConfig):
    from accelerate import Accelerator

    log_with = None
    try:
        import tensorboard  # noqa: F401

        log_with = "tensorboard"
    except ImportError:
        pass
    return Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available(), log_with=log_with,
                       project_dir=cfg.output_dir)


def ensure_class_images(pipe, cfg: DreamBoothConfig, accelerator) -> list[Example]:
    """Generate (batched, seeded, main process) only the class images missing from class_dir, then load all."""
    class_dir = Path(cfg.class_dir)
    class_dir.mkdir(parents=True, exist_ok=True)
    existing = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    missing = cfg.num_class_images - len(existing)
    if missing > 0 and accelerator.is_main_process:
        taken = {p.name for p in existing}
        indices = [i for i in range(cfg.num_class_images * 2) if f"class-{i:05d}.png" not in taken][:missing]
        bar = tqdm(total=missing, desc="class images", disable=not accelerator.is_local_main_process)
        for start in range(0, missing, cfg.sample_batch_size):
            chunk = indices[start : start + cfg.sample_batch_size]
            generators = [torch.Generator().manual_seed(cfg.seed * 100_003 + i) for i in chunk]
            with torch.no_grad():
                images = pipe(cfg.class_prompt, num_images_per_prompt=len(chunk), generator=generators,
                              num_inference_steps=cfg.class_generation_steps).images
            for i, image in zip(chunk, images):
                atomic_write(class_dir / f"class-{i:05d}.png", lambda tmp, im=image: im.save(tmp, format="PNG"))
            bar.update(len(chunk))
        bar.close()
    accelerator.wait_for_everyone()
    return load_folder(class_dir, cfg.class_prompt, what="class")[: cfg.num_class_images]


def _sample_indices(n_items: int, first_sample: int, count: int, seed: int) -> list[int]:
    """Items for global sample ids [first, first+count): a fresh seeded permutation per pass over the data."""
    out = []
    for s in range(first_sample, first_sample + count):
        epoch, pos = divmod(s, n_items)
        perm = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        out.append(int(perm[pos]))
    return out


class _LatentSource:
    """Pictures → scaled latents, with optional caching of the (deterministic) VAE posterior."""

    def __init__(self, pipe, examples: list[Example], cfg: DreamBoothConfig, resolution: int, device):
        self.pipe, self.examples, self.cfg, self.resolution, self.device = pipe, examples, cfg, resolution, device
        self.vae_dtype = next(pipe.vae.parameters()).dtype
        self.cache = None
        if cfg.cache_latents:
            variants = [False, True] if cfg.random_flip else [False]
            g = torch.Generator()
            self.cache = {
                (i, flip): self._posterior(prepare(ex.image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else ex.image, resolution,
                                                   center_crop=True, flip=False, generator=g)[None])
                for i, ex in enumerate(examples) for flip in variants
            }

    @torch.no_grad()
    def _posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.pipe.vae.encode(pixels.to(self.device, self.vae_dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def latents(self, indices: list[int], g: torch.Generator) -> torch.Tensor:
        means, stds = [], []
        for i in indices:
            if self.cache is not None:
                flip = self.cfg.random_flip and bool(torch.rand(1, generator=g) < 0.5)
                mean, std = self.cache[(i, flip)]
            else:
                pixels = prepare(self.examples[i].image, self.resolution, center_crop=self.cfg.center_crop,
                                 flip=self.cfg.random_flip, generator=g)
                mean, std = self._posterior(pixels[None])
            means.append(mean)
            stds.append(std)
        mean, std = torch.cat(means), torch.cat(stds)
        sample = mean + std * torch.randn(mean.shape, generator=g).to(mean.device)
        vae_cfg = self.pipe.vae.config
        shift = getattr(vae_cfg, "shift_factor", None) or 0.0
        return (sample - shift) * vae_cfg.scaling_factor


def _trigger(instance_prompt: str, class_prompt: str | None) -> str | None:
    """The identifier: the instance prompt's words that the class prompt lacks (e.g. 'sks')."""
    if not class_prompt:
        return None
    extra = [w for w in instance_prompt.split() if w not in class_prompt.split()]
    return " ".join(extra) or None


def write_model_card(path: Path, cfg: DreamBoothConfig, n_params: int, steps: int, validation: list[str]) -> None:
    images = "\n".join(f"![validation]({v})" for v in validation[-1:]) or "(no validation images)"
    text = f"""# ETHER adapter: `{cfg.instance_prompt}`

- base model: `{describe_base(cfg.base)}`
- method: {cfg.method} (n_blocks={cfg.n_blocks}, sides={cfg.sides}, targets={cfg.targets}), {n_params:,} parameters
- trigger prompt: `{cfg.instance_prompt}`
- trained {steps} steps, learning rate {cfg.learning_rate}, resolution {cfg.resolution},
  prior preservation: {f'yes ({cfg.class_prompt!r}, weight {cfg.prior_loss_weight})' if cfg.with_prior_preservation else 'no'}

{images}

## Use it
```bash
ether-diffusion generate --prompt "{cfg.instance_prompt}" --out out/ --adapter {ADAPTER_FILE}{'' if cfg.base is None else f' --base {cfg.base}'}
```
```python
from ether_diffusion.pipelines import load_pipeline, load_ether_weights
pipe = load_pipeline({cfg.base!r})
load_ether_weights(pipe, "{ADAPTER_FILE}")
image = pipe("{cfg.instance_prompt}").images[0]
```
Export to a LoRA any diffusers / ComfyUI / A1111 loader reads: `ether-diffusion export {ADAPTER_FILE} --to lora --out lora.safetensors`.
"""
    atomic_write_text(path, text)


def train_dreambooth(cfg: DreamBoothConfig, pipe=None) -> Path:
    """Run a whole DreamBooth training; return the path of the written adapter file."""
    cfg.validate()
    AdapterConfig(method=cfg.method, n_blocks=cfg.n_blocks, sides=cfg.sides, targets=cfg.targets)  # checks early
    if cfg.resolution is not None:
        check_resolution(cfg.resolution)
    instance = load_folder(cfg.instance_dir, cfg.instance_prompt)  # bad data fails before any model loads
    output_dir = Path(cfg.output_dir)
    accelerator = _accelerator(cfg)
    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)

    if pipe is None:
        pipe = load_pipeline(cfg.base, dtype=weight_dtype, device=device)
    pipe.set_progress_bar_config(disable=True)
    if getattr(pipe.vae.config, "force_upcast", False) and weight_dtype != torch.float32:
        pipe.vae.to(torch.float32)
    resolution = cfg.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    cfg.resolution = resolution
    check_resolution(resolution)
    factor = pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    if resolution % factor:
        raise EtherError(f"resolution {resolution} does not fit this base model (use a multiple of {factor})")
    class_examples = ensure_class_images(pipe, cfg, accelerator) if cfg.with_prior_preservation else []

    torch.manual_seed(cfg.seed)  # identical adapter initialisation on every rank
    components = pipeline_components(pipe)
    unet_cfg = AdapterConfig(method=cfg.method, n_blocks=cfg.n_blocks, sides=cfg.sides, targets=cfg.targets)
    inject.add_adapter(pipe.unet, ADAPTER_NAME, unet_cfg)
    groups = [{"params": inject.trainable_parameters(pipe.unet), "lr": cfg.learning_rate}]
    text_models = [m for n, m in components.items() if n.startswith("text_encoder")]
    for model in text_models:
        model.requires_grad_(False)
        if cfg.train_text_encoder:
            te_cfg = AdapterConfig(method=cfg.method, n_blocks=cfg.n_blocks, sides=cfg.sides,
                                   targets=cfg.text_encoder_targets)
            inject.add_adapter(model, ADAPTER_NAME, te_cfg)
            groups.append({"params": inject.trainable_parameters(model),
                           "lr": cfg.text_encoder_lr or cfg.learning_rate})
    pipe.vae.requires_grad_(False)
    if cfg.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        pipe.unet.train()  # diffusers checkpoints only in training mode
    params = [p for g in groups for p in g["params"]]
    n_params = sum(p.numel() for p in params)
    optimizer = make_optimizer(groups, cfg)
    lr_scheduler = make_lr_scheduler(optimizer, cfg)

    def write_adapter(path: Path, steps: int) -> Path:
        info = {"instance_prompt": cfg.instance_prompt, "trigger": _trigger(cfg.instance_prompt, cfg.class_prompt),
                "class_prompt": cfg.class_prompt, "base_model": describe_base(cfg.base),
                "training": {"steps": steps, "learning_rate": cfg.learning_rate, "resolution": resolution,
                             "prior_preservation": cfg.with_prior_preservation, "seed": cfg.seed,
                             "batch_size": cfg.train_batch_size * cfg.gradient_accumulation_steps * world}}
        return save_adapter(path, components, ADAPTER_NAME, info=info)

    start_step = 0
    resume_from = resolve_resume(output_dir, cfg.resume_from_checkpoint)
    if resume_from is not None:
        copy_vectors(read_adapter_file(resume_from / "adapter.safetensors"), components, ADAPTER_NAME)
        start_step = load_checkpoint_state(resume_from, optimizer, lr_scheduler)["step"]
        if accelerator.is_main_process:
            print(f"resuming from {resume_from} at step {start_step}")
    elif cfg.resume_from_checkpoint and accelerator.is_main_process:
        print(f"no checkpoint in {output_dir} yet; starting from step 0")

    # Text conditioning: fixed when the text encoders are frozen, so encode each caption once.
    captions = sorted({ex.caption for ex in instance + class_examples})
    cached_cond = None
    if not cfg.train_text_encoder:
        with torch.no_grad():
            cached_cond = {c: encode_text(pipe, [c], device) for c in captions}

    def conditioning(batch_captions: list[str]) -> dict:
        if cached_cond is not None:
            parts = [cached_cond[c] for c in batch_captions]
            return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        return encode_text(pipe, batch_captions, device)

    sources = [(_LatentSource(pipe, instance, cfg, resolution, device), instance, 1.0)]
    if class_examples:
        sources.append((_LatentSource(pipe, class_examples, cfg, resolution, device), class_examples,
                        cfg.prior_loss_weight))
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the training noise schedule of the base
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, output_dir / "training_config.json")
        accelerator.init_trackers("ether-dreambooth", config={k: str(v) for k, v in asdict(cfg).items()})

    validation_images: list[str] = []
    bar = tqdm(total=cfg.max_steps, initial=start_step, desc="train", unit="step",
               disable=not accelerator.is_local_main_process)
    t0, loss_value = time.time(), float("nan")
    bs, accum = cfg.train_batch_size, cfg.gradient_accumulation_steps
    for step in range(start_step, cfg.max_steps):
        total = torch.zeros((), device=device)
        for micro in range(accum):
            g = step_generator(cfg.seed, step, rank, micro)
            first = ((step * accum + micro) * world + rank) * bs
            latents, caps, weights = [], [], []
            for source, examples, weight in sources:
                idx = _sample_indices(len(examples), first, bs, cfg.seed + len(weights))
                latents.append(source.latents(idx, g))
                caps += [examples[i].caption for i in idx]
                weights += [weight] * bs
            latents = torch.cat(latents).to(device, weight_dtype)
            noisy, t, target = noisy_latents_and_target(scheduler, latents, g, cfg.noise_offset)
            cond = conditioning(caps)
            kwargs = unet_kwargs(pipe, cond, len(caps), resolution, weight_dtype, device)
            with accelerator.autocast():
                pred = pipe.unet(noisy, t, **kwargs).sample
            snr = min_snr_weights(scheduler, t, cfg.snr_gamma) if cfg.snr_gamma else None
            per_sample = diffusion_loss(pred, target, snr)
            w = torch.tensor(weights, device=device)
            loss = (per_sample * w).sum() / bs / accum  # instance mean + prior_loss_weight × class mean
            loss.backward()
            total += loss.detach()
        check_finite(total, step + 1, output_dir)
        if world > 1:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = accelerator.reduce(torch.cat([g_.flatten() for g_ in grads]), reduction="mean")
            for p, chunk in zip(params, flat.split([p.numel() for p in params])):
                p.grad = chunk.view_as(p)
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(accelerator.reduce(total, reduction="mean")) if world > 1 else float(total)
        done = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}")
        accelerator.log({"loss": loss_value, "lr": lr_scheduler.get_last_lr()[0]}, step=done)
        if done % cfg.checkpointing_steps == 0 or done == cfg.max_steps:  # the last one lets a run be extended
            if accelerator.is_main_process:
                save_checkpoint(output_dir, done, lambda p, d=done: write_adapter(p, d), optimizer, lr_scheduler,
                                {"loss": loss_value}, cfg.checkpoints_total_limit)
            accelerator.wait_for_everyone()
        if cfg.validation_steps and (done % cfg.validation_steps == 0 or done == cfg.max_steps):
            if accelerator.is_main_process:
                validation_images.append(run_validation(pipe, cfg, output_dir, done, accelerator))
            accelerator.wait_for_everyone()
    bar.close()

    final = output_dir / ADAPTER_FILE
    if accelerator.is_main_process:
        write_adapter(final, cfg.max_steps)
        write_model_card(output_dir / "README.md", cfg, n_params, cfg.max_steps, validation_images)
        atomic_write_text(output_dir / "training_summary.json", json.dumps(
            {"steps": cfg.max_steps, "resumed_from_step": start_step, "final_loss": loss_value,
             "seconds": round(time.time() - t0, 2), "trainable_parameters": n_params, "processes": world}, indent=2))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


def run_validation(pipe, cfg: DreamBoothConfig, output_dir: Path, step: int, accelerator) -> str:
    """Draw the validation prompts with the current adapter; save one grid (rows: prompts) and log it."""
    prompts = cfg.validation_prompts or [cfg.instance_prompt]
    was_training = pipe.unet.training
    pipe.unet.eval()
    rows = []
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            generator = torch.Generator().manual_seed(cfg.seed + i)
            rows.append(pipe(prompt, num_images_per_prompt=cfg.num_validation_images, generator=generator,
                             num_inference_steps=cfg.validation_inference_steps,
                             guidance_scale=cfg.validation_guidance).images)
    pipe.unet.train(was_training)
    rel = f"validation/step-{step:06d}.png"
    grid = image_grid(rows)
    atomic_write(output_dir / rel, lambda tmp: grid.save(tmp, format="PNG"))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
    return rel
