"""The denoising objective of each base family: noise a batch of latents, run the denoiser, per-sample loss.

UNet bases (SD 1.x, 2.x, SDXL) train as DDPM: epsilon or v targets, optional timestep bias and Min-SNR
weighting. FLUX.1 and SD3 train with flow matching exactly as diffusers' `train_dreambooth_lora_flux.py` and
`train_dreambooth_lora_sd3.py` do, from diffusers' own pieces (`compute_density_for_timestep_sampling`,
`compute_loss_weighting_for_sd3`, the scheduler's sigmas, FLUX's `_pack_latents` / `_prepare_latent_image_ids`),
with every random draw taken from the step's seeded generator so that resume stays exact.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Callable

import torch

from .. import bases
from ..errors import EtherError
from .common import diffusion_loss, min_snr_weights, noisy_latents_and_target, timestep_weights, unet_kwargs

DEFAULT_WEIGHTING = {"flux": "none", "sd3": "logit_normal"}  # the diffusers scripts' defaults


class NoisePrediction:
    """DDPM training of a UNet (the scheduler's prediction type: epsilon or v)."""

    def __init__(self, pipe, cfg, resolution: int, dtype: torch.dtype, device):
        from diffusers import DDPMScheduler

        self.pipe, self.cfg, self.resolution, self.dtype, self.device = pipe, cfg, resolution, dtype, device
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.bias = timestep_weights(cfg, self.scheduler.config.num_train_timesteps)

    def loss(self, latents: torch.Tensor, cond: dict, g: torch.Generator,
             autocast: Callable[[], AbstractContextManager]) -> torch.Tensor:
        noisy, t, target = noisy_latents_and_target(self.scheduler, latents, g, self.cfg.noise_offset, self.bias)
        kwargs = unet_kwargs(self.pipe, cond, latents.shape[0], self.resolution, self.dtype, self.device)
        with autocast():
            pred = self.pipe.unet(noisy, t, **kwargs).sample
        snr = min_snr_weights(self.scheduler, t, self.cfg.snr_gamma) if self.cfg.snr_gamma else None
        return diffusion_loss(pred, target, snr)


class FlowMatching:
    """Rectified-flow training of a FLUX.1 or SD3 transformer: x_σ = (1 − σ)·x + σ·noise, target noise − x
    (SD3 with `precondition_outputs`: the prediction is turned into an x estimate and compared with x)."""

    def __init__(self, pipe, cfg, resolution: int, dtype: torch.dtype, device):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.family = bases.family(pipe).name
        unsupported = [flag for flag, on in (("--snr-gamma", cfg.snr_gamma), ("--noise-offset", cfg.noise_offset),
                                             ("--timestep-bias-strategy", cfg.timestep_bias_strategy != "none"))
                       if on]
        if unsupported:
            raise EtherError(f"{', '.join(unsupported)} belong to DDPM training of UNet bases; on this "
                             f"{self.family.upper()} base use --weighting-scheme (and --logit-mean/--logit-std/"
                             "--mode-scale)")
        self.pipe, self.cfg, self.dtype, self.device = pipe, cfg, dtype, device
        self.scheme = cfg.weighting_scheme or DEFAULT_WEIGHTING[self.family]
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        self.precondition = self.family == "sd3" and cfg.precondition_outputs

    def loss(self, latents: torch.Tensor, cond: dict, g: torch.Generator,
             autocast: Callable[[], AbstractContextManager]) -> torch.Tensor:
        from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

        cfg, batch = self.cfg, latents.shape[0]
        noise = torch.randn(latents.shape, generator=g, dtype=torch.float32).to(latents)
        u = compute_density_for_timestep_sampling(self.scheme, batch, cfg.logit_mean, cfg.logit_std, cfg.mode_scale,
                                                  generator=g)
        n = self.scheduler.config.num_train_timesteps
        indices = (u * n).long().clamp(max=n - 1)
        timesteps = self.scheduler.timesteps[indices].to(latents.device)
        sigmas = self.scheduler.sigmas[indices].to(latents.device, latents.dtype).view(-1, 1, 1, 1)
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        with autocast():
            pred = self._predict(noisy, timesteps, cond)
        if self.precondition:
            pred, target = pred * (-sigmas) + noisy, latents
        else:
            target = noise - latents
        weighting = compute_loss_weighting_for_sd3(self.scheme, sigmas).float()
        return (weighting * (pred.float() - target.float()) ** 2).reshape(batch, -1).mean(dim=1)

    def _predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        pipe, transformer = self.pipe, self.pipe.transformer
        if self.family == "sd3":
            return transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=cond["encoder_hidden_states"],
                               pooled_projections=cond["pooled_projections"], return_dict=False)[0]
        b, c, h, w = noisy.shape
        packed = pipe._pack_latents(noisy, b, c, h, w)
        image_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
        text_ids = torch.zeros(cond["encoder_hidden_states"].shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        guidance = (torch.full((b,), self.cfg.guidance_scale, device=noisy.device)
                    if transformer.config.guidance_embeds else None)
        pred = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                           pooled_projections=cond["pooled_projections"],
                           encoder_hidden_states=cond["encoder_hidden_states"], txt_ids=text_ids, img_ids=image_ids,
                           return_dict=False)[0]
        scale = pipe.vae_scale_factor
        return pipe._unpack_latents(pred, h * scale, w * scale, scale)


def make_objective(pipe, cfg, resolution: int, dtype: torch.dtype, device) -> NoisePrediction | FlowMatching:
    """The objective that fits the base's family."""
    cls = FlowMatching if bases.family(pipe).flow_matching else NoisePrediction
    return cls(pipe, cfg, resolution, dtype, device)
