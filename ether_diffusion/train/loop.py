"""The training machinery DreamBooth and control training share: accelerator, base model, latents, resume, and
the step loop (micro-batches, gradient all-reduce, clipping, optimiser, progress, checkpoints, validation).

A trainer supplies what differs as callables: the loss of one micro-batch, how to write its adapter file, and
how to draw validation images.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from .. import bases
from ..adapter_file import AdapterFile, read_adapter_file
from ..data import Example, check_resolution, prepare
from ..errors import EtherError
from ..layers import AdapterConfig
from ..pipelines import load_pipeline
from ..runtime import resolve_device
from .common import check_finite, encode_text, load_checkpoint_state, resolve_resume, save_checkpoint
from .config import TrainingConfig, save_resolved


# accelerate's loss-scaled optimiser step re-wraps `optimizer.step`, which torch's LR scheduler mistakes for a call
# order problem; the order here is right (optimiser step, then schedule step, skipped with the optimiser's).
warnings.filterwarnings("ignore", message=r"Seems like `optimizer.step\(\)` has been overridden")


def make_accelerator(cfg: TrainingConfig):
    """accelerate's Accelerator for this run (`cfg.device`, auto: the GPU when present; TensorBoard logging when
    installed).

    fp16 always trains with dynamic loss scaling: accelerate provides the GradScaler on GPUs; on a CPU, where it
    provides none but the base still runs in fp16, a CPU GradScaler takes its place, so the same code path runs.
    """
    from accelerate import Accelerator

    log_with = None
    try:
        import tensorboard  # noqa: F401

        log_with = "tensorboard"
    except ImportError:
        pass
    # accelerate keeps one process-wide state; a second run in the same process (a notebook, the app, tests)
    # with another precision must start from a clean one (the distributed part, PartialState, is kept)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=resolve_device(cfg.device).type == "cpu",
                              log_with=log_with, project_dir=cfg.output_dir)
    if cfg.mixed_precision == "fp16" and accelerator.scaler is None:
        accelerator.scaler = torch.amp.GradScaler(accelerator.device.type)
    return accelerator


def prepare_optimizer(accelerator, optimizer):
    """The optimiser wrapped by accelerate: its step goes through the loss scaler (skipping steps whose
    gradients overflowed). The trainable vectors stay where they are; the loop all-reduces their gradients."""
    return accelerator.prepare_optimizer(optimizer, device_placement=False)


def prepare_base(cfg: TrainingConfig, device, pipe=None):
    """Load (or take) the base pipeline in the run's precision; settle and check the training resolution.

    Returns (pipe, weight dtype, resolution).
    """
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
    if pipe is None:
        pipe = load_pipeline(cfg.base, dtype=weight_dtype, device=device)
    pipe.set_progress_bar_config(disable=True)
    # SDXL's VAE overflows in fp16: keep it fp32 (its pipeline upcasts latents before decoding); SD 1.x / 2.x
    # pipelines decode in the UNet's dtype, so their VAE must stay in it (as in diffusers' own scripts)
    if bases.is_sdxl(pipe) and getattr(pipe.vae.config, "force_upcast", False) and weight_dtype != torch.float32:
        pipe.vae.to(torch.float32)
    resolution = cfg.resolution or bases.default_resolution(pipe)
    cfg.resolution = resolution
    check_resolution(resolution)
    factor = bases.size_multiple(pipe)
    if resolution % factor:
        raise EtherError(f"resolution {resolution} does not fit this base model (use a multiple of {factor})")
    pipe.vae.requires_grad_(False)
    bases.denoiser(pipe).requires_grad_(False)
    return pipe, weight_dtype, resolution


def sample_indices(n_items: int, first_sample: int, count: int, seed: int) -> list[int]:
    """Items for global sample ids [first, first+count): a fresh seeded permutation per pass over the data."""
    out = []
    for s in range(first_sample, first_sample + count):
        epoch, pos = divmod(s, n_items)
        perm = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        out.append(int(perm[pos]))
    return out


class LatentSource:
    """Pictures → scaled latents, with optional caching of the (deterministic) VAE posterior."""

    def __init__(self, pipe, examples: list[Example], resolution: int, device, *, cache: bool,
                 center_crop: bool = True, random_flip: bool = False):
        self.pipe, self.examples, self.resolution, self.device = pipe, examples, resolution, device
        self.center_crop, self.random_flip = center_crop, random_flip
        self.vae_dtype = next(pipe.vae.parameters()).dtype
        self.cache = None
        if cache:
            variants = [False, True] if random_flip else [False]
            g = torch.Generator()
            self.cache = {
                (i, flip): self._posterior(prepare(ex.image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else ex.image,
                                                   resolution, center_crop=True, flip=False, generator=g)[None])
                for i, ex in enumerate(tqdm(examples, desc="cache latents", leave=False)) for flip in variants
            }

    @torch.no_grad()
    def _posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.pipe.vae.encode(pixels.to(self.device, self.vae_dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def latents(self, indices: list[int], g: torch.Generator) -> torch.Tensor:
        means, stds = [], []
        for i in indices:
            if self.cache is not None:
                flip = self.random_flip and bool(torch.rand(1, generator=g) < 0.5)
                mean, std = self.cache[(i, flip)]
            else:
                pixels = prepare(self.examples[i].image, self.resolution, center_crop=self.center_crop,
                                 flip=self.random_flip, generator=g)
                mean, std = self._posterior(pixels[None])
            means.append(mean)
            stds.append(std)
        mean, std = torch.cat(means), torch.cat(stds)
        sample = mean + std * torch.randn(mean.shape, generator=g).to(mean.device)
        vae_cfg = self.pipe.vae.config
        shift = getattr(vae_cfg, "shift_factor", None) or 0.0
        return (sample - shift) * vae_cfg.scaling_factor


class TextConditioner:
    """Captions → denoiser text conditioning. With frozen text encoders each caption is encoded once and reused
    (on FLUX / SD3 this is what keeps T5 out of the training steps)."""

    def __init__(self, pipe, device, cache: bool, max_sequence_length: int | None = None):
        self.pipe, self.device, self.max_sequence_length = pipe, device, max_sequence_length
        self.cache: dict[str, dict] | None = {} if cache else None

    def __call__(self, captions: list[str]) -> dict:
        if self.cache is None:
            return encode_text(self.pipe, captions, self.device, self.max_sequence_length)
        missing = sorted({c for c in captions if c not in self.cache})
        if missing:
            with torch.no_grad():
                encoded = encode_text(self.pipe, missing, self.device, self.max_sequence_length)
            for i, c in enumerate(missing):
                self.cache[c] = {k: v[i : i + 1] for k, v in encoded.items()}
        parts = [self.cache[c] for c in captions]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def open_run(cfg: TrainingConfig, accelerator, output_dir: Path, tracker: str) -> None:
    """Create the run folder, save the resolved settings, start the trackers."""
    from dataclasses import asdict

    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, output_dir / "training_config.json")
        accelerator.init_trackers(tracker, config={k: str(v) for k, v in asdict(cfg).items()})


def check_same_adapter(cfg: TrainingConfig, adapter: AdapterFile, where: Path) -> None:
    """A checkpoint continues only the run it came from: same method, block count and sides on every component
    (another block layout would silently reinterpret the vectors)."""
    want = AdapterConfig(method=cfg.method, n_blocks=cfg.n_blocks, sides=cfg.sides, targets=cfg.targets).to_dict()
    for comp, meta in adapter.components.items():
        have = meta["config"]
        changed = [f"{k} {have[k]!r} → {want[k]!r}" for k in ("method", "n_blocks", "sides") if have[k] != want[k]]
        if changed:
            raise EtherError(f"checkpoint {where} was trained with other adapter settings ({comp}: "
                             f"{'; '.join(changed)}); resume with the settings it was trained with, or start a new "
                             "--output-dir")


def resume(cfg: TrainingConfig, output_dir: Path, restore: Callable[[AdapterFile], None], optimizer, lr_scheduler,
           is_main: bool, scaler=None) -> int:
    """Restore adapter weights, optimiser, schedule and loss scaler from a checkpoint; return the step to start at."""
    resume_from = resolve_resume(output_dir, cfg.resume_from_checkpoint)
    if resume_from is None:
        if cfg.resume_from_checkpoint and is_main:
            print(f"no checkpoint in {output_dir} yet; starting from step 0")
        return 0
    adapter = read_adapter_file(resume_from / "adapter.safetensors")
    check_same_adapter(cfg, adapter, resume_from)
    restore(adapter)
    step = load_checkpoint_state(resume_from, optimizer, lr_scheduler, scaler)["step"]
    if is_main:
        print(f"resuming from {resume_from} at step {step}")
    return step


def run_steps(
    cfg: TrainingConfig,
    accelerator,
    params: list[torch.nn.Parameter],
    optimizer,
    lr_scheduler,
    start_step: int,
    output_dir: Path,
    micro_loss: Callable[[int, int], torch.Tensor],
    write_adapter: Callable[[Path, int], Path],
    validate: Callable[[int], str],
) -> tuple[float, list[str], float]:
    """Steps start_step … max_steps. `micro_loss(step, micro)` returns one micro-batch's loss, already divided
    by the accumulation count. Returns (last loss, validation image paths, seconds).

    Each step: backward through the loss scaler (fp16), one all-reduce of the loss (so a non-finite loss stops
    every rank, not one rank while the others wait), one all-reduce of the small flattened gradients, unscale,
    clip, optimiser step (skipped by the scaler on overflow, and the schedule with it).
    """
    world = accelerator.num_processes
    scaler = accelerator.scaler
    validation_images: list[str] = []
    bar = tqdm(total=cfg.max_steps, initial=start_step, desc="train", unit="step",
               disable=not accelerator.is_local_main_process)
    t0, loss_value = time.time(), float("nan")
    for step in range(start_step, cfg.max_steps):
        total = torch.zeros((), device=accelerator.device)
        for micro in range(cfg.gradient_accumulation_steps):
            loss = micro_loss(step, micro)
            accelerator.backward(loss)
            total += loss.detach().float()
        mean_loss = accelerator.reduce(total, reduction="mean") if world > 1 else total
        check_finite(mean_loss, step + 1, output_dir)
        if world > 1:  # the trainable tensors are small: one all-reduce of their flattened gradients
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = accelerator.reduce(torch.cat([g_.flatten() for g_ in grads]), reduction="mean")
            for p, chunk in zip(params, flat.split([p.numel() for p in params])):
                p.grad = chunk.view_as(p)
        if scaler is not None:
            scaler.unscale_(optimizer.optimizer)  # true gradients before clipping
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        if not optimizer.step_was_skipped:
            lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(mean_loss)
        done = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}")
        accelerator.log({"loss": loss_value, "lr": lr_scheduler.get_last_lr()[0]}, step=done)
        if done % cfg.checkpointing_steps == 0 or done == cfg.max_steps:  # the last one lets a run be extended
            if accelerator.is_main_process:
                save_checkpoint(output_dir, done, lambda p, d=done: write_adapter(p, d), optimizer, lr_scheduler,
                                {"loss": loss_value}, cfg.checkpoints_total_limit, scaler)
            accelerator.wait_for_everyone()
        if cfg.validation_steps and (done % cfg.validation_steps == 0 or done == cfg.max_steps):
            if accelerator.is_main_process:
                validation_images.append(validate(done))
            accelerator.wait_for_everyone()
    bar.close()
    return loss_value, validation_images, time.time() - t0


def log_validation_grid(accelerator, grid: Image.Image, step: int) -> None:
    """Send a validation grid to TensorBoard when it is the tracker."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
