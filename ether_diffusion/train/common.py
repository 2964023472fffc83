"""Pieces every training loop shares: seeded per-step randomness, the diffusion loss, optimiser and schedule,
checkpoints with exact resume, text conditioning for SD 1.x / 2.x / SDXL, FLUX.1 and SD3.

Randomness is drawn from generators seeded by (seed, step, rank), not from a global stream, so a run resumed
at step k draws exactly what the uninterrupted run drew: resume equivalence needs only the adapter vectors,
the optimiser state and the step.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import bases
from ..atomic import atomic_write, atomic_write_text
from ..errors import EtherError

CHECKPOINT_PREFIX = "checkpoint-"
DEFAULT_MAX_SEQUENCE_LENGTH = {"flux": 512, "sd3": 77}  # T5 tokens per prompt, as diffusers' scripts


def step_generator(seed: int, step: int, rank: int = 0, stream: int = 0) -> torch.Generator:
    """A CPU generator for one (step, rank, stream): the same numbers whenever that step is run."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1009 + rank * 31 + stream)


def timestep_weights(cfg, num_timesteps: int) -> torch.Tensor | None:
    """Sampling weights over the training timesteps, as diffusers' SDXL scripts' `--timestep_bias_*` flags give
    them: `later` multiplies the last `portion` of the timesteps (the noisiest, where sampling decides the layout),
    `earlier` the first (the least noisy: fine detail), `range` those in [begin, end); None for uniform sampling."""
    strategy = cfg.timestep_bias_strategy
    if strategy == "none" or cfg.timestep_bias_multiplier == 1.0:
        return None
    if strategy == "range" and cfg.timestep_bias_end > num_timesteps:
        raise EtherError(f"timestep_bias_end ({cfg.timestep_bias_end}) is beyond the base's {num_timesteps} "
                         "training timesteps")
    weights = torch.ones(num_timesteps)
    portion = max(1, int(cfg.timestep_bias_portion * num_timesteps))
    biased = {"later": slice(num_timesteps - portion, None), "earlier": slice(0, portion),
              "range": slice(cfg.timestep_bias_begin, cfg.timestep_bias_end)}[strategy]
    weights[biased] *= cfg.timestep_bias_multiplier
    return weights / weights.sum()


def noisy_latents_and_target(scheduler, latents: torch.Tensor, g: torch.Generator, noise_offset: float = 0.0,
                             weights: torch.Tensor | None = None):
    """Sample noise and timesteps (uniform, or from `timestep_weights`); return (noisy latents, timesteps,
    training target) for the scheduler's prediction type (epsilon or v_prediction)."""
    noise = torch.randn(latents.shape, generator=g, dtype=torch.float32).to(latents)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=g).to(latents)
    if weights is None:
        t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=g)
    else:
        t = torch.multinomial(weights, latents.shape[0], replacement=True, generator=g)
    t = t.to(latents.device)
    noisy = scheduler.add_noise(latents, noise, t)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(latents, noise, t)
    else:
        raise EtherError(f"prediction type {kind!r} is not supported for training (epsilon or v_prediction)")
    return noisy, t, target


def min_snr_weights(scheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023), for epsilon and v-prediction targets."""
    alphas = scheduler.alphas_cumprod.to(t.device)[t]
    snr = alphas / (1 - alphas)
    weight = torch.clamp(snr, max=gamma) / snr
    if scheduler.config.prediction_type == "v_prediction":
        weight = torch.clamp(snr, max=gamma) / (snr + 1)
    return weight


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample MSE, optionally weighted: shape (batch,)."""
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.dim())))
    return loss * weights if weights is not None else loss


def make_optimizer(param_groups: list[dict], cfg) -> torch.optim.Optimizer:
    kwargs = dict(betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise EtherError("--use-8bit-adam needs bitsandbytes (pip install bitsandbytes)") from None
        return bnb.optim.AdamW8bit(param_groups, **kwargs)
    return adamw(param_groups, loss_scaling=cfg.mixed_precision == "fp16", **kwargs)


def adamw(params: list, loss_scaling: bool = False, **kwargs) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per tensor where torch has it (floating-point tensors on CPU or CUDA).

    Why: adapters are many small tensors (ETHER+ has four vectors per layer), and the default per-tensor loop
    then costs more than the arithmetic: on this CPU, 320 vectors of 128 take 10 ms per step unfused, 1.2 ms fused.
    Not with fp16 loss scaling: a fused step is called even when the scaler skips it, so accelerate could not
    tell the learning-rate schedule to skip it too.
    """
    tensors = [p for group in params for p in group["params"]] if params and isinstance(params[0], dict) else params
    fused = not loss_scaling and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in tensors)
    return torch.optim.AdamW(params, fused=fused or None, **kwargs)


def make_lr_scheduler(optimizer, cfg):
    from diffusers.optimization import get_scheduler

    try:
        return get_scheduler(cfg.lr_scheduler, optimizer=optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                             num_training_steps=cfg.max_steps)
    except ValueError as exc:
        raise EtherError(f"lr_scheduler {cfg.lr_scheduler!r}: {exc}") from None


# -- checkpoints ------------------------------------------------------------------------------------------------


def list_checkpoints(output_dir: Path) -> list[Path]:
    found = [p for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def resolve_resume(output_dir: Path, resume: str | None) -> Path | None:
    """'latest' → newest complete checkpoint (None when there is none yet); a path → that checkpoint."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise EtherError(f"not a checkpoint folder (no state.json): {path}")
    return path


def save_checkpoint(output_dir: Path, step: int, write_adapter, optimizer, lr_scheduler, extra: dict,
                    keep: int | None, scaler=None) -> Path:
    """Write checkpoint-STEP/ completely in a temporary folder, then rename it into place; prune old ones."""
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = output_dir / f".{CHECKPOINT_PREFIX}{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_adapter(tmp / "adapter.safetensors")
    atomic_write(tmp / "optimizer.pt", lambda p: torch.save(
        {"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
         "scaler": scaler.state_dict() if scaler is not None else None}, p))
    atomic_write_text(tmp / "state.json", json.dumps({"step": step, **extra}, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    if keep is not None:
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint_state(path: Path, optimizer, lr_scheduler, scaler=None) -> dict:
    states = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(states["optimizer"])
    lr_scheduler.load_state_dict(states["lr_scheduler"])
    if scaler is not None and states.get("scaler"):
        scaler.load_state_dict(states["scaler"])
    return json.loads((path / "state.json").read_text())


# -- text conditioning ------------------------------------------------------------------------------------------


def encode_text(pipe, prompts: list[str], device, max_sequence_length: int | None = None) -> dict:
    """Denoiser conditioning for prompts, from the pipeline's own `encode_prompt`: {'encoder_hidden_states': …}
    plus SDXL's pooled 'text_embeds' or FLUX / SD3's 'pooled_projections'. `max_sequence_length` is the T5 token
    budget of FLUX / SD3 (default: the diffusers scripts' 512 / 77)."""
    family = bases.family(pipe).name
    if family in DEFAULT_MAX_SEQUENCE_LENGTH:
        length = max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH[family]
        if family == "flux":
            embeds, pooled, _ = pipe.encode_prompt(prompts, None, device=device, num_images_per_prompt=1,
                                                   max_sequence_length=length)
        else:
            embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False, max_sequence_length=length)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}
    if bases.is_sdxl(pipe):
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds, "text_embeds": pooled}
    embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
    return {"encoder_hidden_states": embeds}


def unet_kwargs(pipe, cond: dict, batch: int, resolution: int, dtype, device) -> dict:
    """Extra UNet inputs: SDXL's pooled text embeddings and size/crop time ids (original = target, no crop)."""
    if "text_embeds" not in cond:
        return {"encoder_hidden_states": cond["encoder_hidden_states"]}
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=dtype, device=device)
    return {"encoder_hidden_states": cond["encoder_hidden_states"],
            "added_cond_kwargs": {"text_embeds": cond["text_embeds"], "time_ids": time_ids.repeat(batch, 1)}}


def check_finite(loss: torch.Tensor, step: int, output_dir: Path) -> None:
    if not math.isfinite(loss.item()):
        found = list_checkpoints(output_dir)
        where = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint had been written yet"
        raise EtherError(f"the loss became {loss.item()} at step {step}; stopping ({where}); "
                         f"try a lower learning rate or mixed_precision='no'")
