"""Control training: a control encoder plus ETHER adapters on a frozen UNet learn control image → picture.

`train_control(config)` validates the dataset (bad rows by number) before any model loads, attaches a fresh
zero-initialised encoder to `unet.conv_in`, adds ETHER / ETHER+ adapters on the `attn+ff` preset (unless
`train_adapters` is off: encoder only), and trains both with their own learning rates through the shared loop
(checkpoints, exact resume, DDP, validation grids showing each control map beside its pictures). The result is
one adapter file holding the vectors and the encoder, with metadata naming the control kind.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from .. import bases, inject
from ..adapter_file import CONTROL_MODULE, AdapterFile, copy_vectors, save_adapter
from ..atomic import atomic_write, atomic_write_text
from ..control import attach_control, build_encoder, control_image, encoder_config
from ..data import ControlExample, Example, load_control_dataset, load_control_folder, prepare
from ..layers import AdapterConfig
from ..pipelines import describe_base, generate, image_grid
from .common import make_lr_scheduler, make_optimizer, step_generator
from .config import ControlConfig
from .loop import (
    LatentSource,
    TextConditioner,
    log_validation_grid,
    make_accelerator,
    prepare_optimizer,
    open_run,
    prepare_base,
    resume,
    run_steps,
    sample_indices,
)
from .objectives import NoisePrediction

ADAPTER_NAME = "control"
ADAPTER_FILE = "ether_control.safetensors"


def control_tensor(example: ControlExample, resolution: int) -> torch.Tensor:
    """The control picture cropped like its target picture, resized without blending labels: (3, R, R) in [0, 1]."""
    pixels = prepare(example.control, resolution, center_crop=True, flip=False, generator=torch.Generator(),
                     resample=Image.Resampling.NEAREST)
    return (pixels + 1) / 2


def train_control(cfg: ControlConfig, pipe=None, extra_trainable: list[torch.nn.Parameter] | None = None) -> Path:
    """Run a whole control training; return the path of the written adapter file.

    `extra_trainable`: further parameters of `pipe` trained at the adapter learning rate but not saved in the
    adapter file (the benchmarks train a PEFT LoRA this way, in the same loop, for comparison).
    """
    cfg.validate()
    adapter_cfg = AdapterConfig(method=cfg.method, n_blocks=cfg.n_blocks, sides=cfg.sides, targets=cfg.targets)
    if cfg.dataset_name:  # every row checked before any model loads
        rows = load_control_dataset(cfg.dataset_name, cfg.image_column, cfg.conditioning_image_column,
                                    cfg.caption_column)
    else:
        rows = load_control_folder(cfg.data_dir)
    output_dir = Path(cfg.output_dir)
    accelerator = make_accelerator(cfg)
    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    pipe, weight_dtype, resolution = prepare_base(cfg, device, pipe)
    bases.require_unet(pipe, "control training")
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).requires_grad_(False)

    torch.manual_seed(cfg.seed)  # identical initialisation on every rank
    enc_config = encoder_config(pipe.unet, pipe.vae_scale_factor, cfg.control_injection)
    encoder = build_encoder(enc_config).to(device)
    attach_control(pipe.unet, ADAPTER_NAME, encoder, cfg.control_kind)
    groups = [{"params": list(encoder.parameters()), "lr": cfg.encoder_learning_rate}]
    if cfg.train_adapters:
        inject.add_adapter(pipe.unet, ADAPTER_NAME, adapter_cfg)
        groups.append({"params": inject.trainable_parameters(pipe.unet), "lr": cfg.learning_rate})
    if extra_trainable:
        groups.append({"params": [p.requires_grad_(True) for p in extra_trainable], "lr": cfg.learning_rate})
    if cfg.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        pipe.unet.train()
    params = [p for g in groups for p in g["params"]]
    n_encoder = sum(p.numel() for p in groups[0]["params"])
    n_params = sum(p.numel() for p in params)
    optimizer = prepare_optimizer(accelerator, make_optimizer(groups, cfg))
    lr_scheduler = make_lr_scheduler(optimizer.optimizer, cfg)

    def write_adapter(path: Path, steps: int) -> Path:
        info = {"base_model": describe_base(cfg.base), "control_encoder_parameters": n_encoder,
                "training": {"steps": steps, "learning_rate": cfg.learning_rate,
                             "encoder_learning_rate": cfg.encoder_learning_rate, "resolution": resolution,
                             "seed": cfg.seed, "rows": len(rows), "caption_dropout": cfg.caption_dropout,
                             "batch_size": cfg.train_batch_size * cfg.gradient_accumulation_steps * world}}
        return save_adapter(path, {"unet": pipe.unet}, ADAPTER_NAME, info=info,
                            control=(cfg.control_kind, enc_config, encoder))

    def restore(saved: AdapterFile) -> None:
        if cfg.train_adapters:
            copy_vectors(saved, {"unet": pipe.unet}, ADAPTER_NAME)
        encoder.load_state_dict(saved.extra_tensors(CONTROL_MODULE))

    start_step = resume(cfg, output_dir, restore, optimizer, lr_scheduler, accelerator.is_main_process,
                        accelerator.scaler)
    conditioning = TextConditioner(pipe, device, cache=True)
    latents_of = LatentSource(pipe, [Example(Path(""), r.image, r.caption) for r in rows], resolution, device,
                              cache=cfg.cache_latents)
    open_run(cfg, accelerator, output_dir, "ether-control")
    objective = NoisePrediction(pipe, cfg, resolution, weight_dtype, device)
    bs, accum = cfg.train_batch_size, cfg.gradient_accumulation_steps

    def micro_loss(step: int, micro: int) -> torch.Tensor:
        g = step_generator(cfg.seed, step, rank, micro)
        idx = sample_indices(len(rows), ((step * accum + micro) * world + rank) * bs, bs, cfg.seed)
        latents = latents_of.latents(idx, g).to(device, weight_dtype)
        hints = torch.stack([control_tensor(rows[i], resolution) for i in idx]).to(device)
        drop = torch.rand(bs, generator=g) < cfg.caption_dropout  # unconditional samples: guidance works later
        caps = ["" if d else rows[i].caption for i, d in zip(idx, drop.tolist())]
        with control_image(pipe.unet, hints):
            return objective.loss(latents, conditioning(caps), g, accelerator.autocast).mean() / accum

    def validate(step: int) -> str:
        return run_validation(pipe, cfg, rows, output_dir, step, accelerator)

    loss_value, validation_images, seconds = run_steps(
        cfg, accelerator, params, optimizer, lr_scheduler, start_step, output_dir, micro_loss, write_adapter, validate)

    final = output_dir / ADAPTER_FILE
    if accelerator.is_main_process:
        write_adapter(final, cfg.max_steps)
        atomic_write_text(output_dir / "training_summary.json", json.dumps(
            {"steps": cfg.max_steps, "resumed_from_step": start_step, "final_loss": loss_value,
             "seconds": round(seconds, 2), "trainable_parameters": n_params, "encoder_parameters": n_encoder,
             "processes": world, "validation": validation_images}, indent=2))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


def run_validation(pipe, cfg: ControlConfig, rows: list[ControlExample], output_dir: Path, step: int,
                   accelerator) -> str:
    """One grid row per validation example: its control map, then pictures drawn from it."""
    was_training = pipe.unet.training
    pipe.unet.eval()
    grid_rows = []
    with torch.no_grad():
        for i, row in enumerate(rows[: cfg.validation_rows]):
            prompt = cfg.validation_prompts[i % len(cfg.validation_prompts)] if cfg.validation_prompts else row.caption
            size = cfg.resolution
            images = generate(pipe, prompt, seed=cfg.seed + i, steps=cfg.validation_inference_steps,
                              guidance=cfg.validation_guidance, num_images=cfg.num_validation_images,
                              height=size, width=size, control_image=row.control)
            grid_rows.append([row.control.resize((size, size), Image.Resampling.NEAREST), *images])
    pipe.unet.train(was_training)
    rel = f"validation/step-{step:06d}.png"
    grid = image_grid(grid_rows)
    atomic_write(output_dir / rel, lambda tmp: grid.save(tmp, format="PNG"))
    log_validation_grid(accelerator, grid, step)
    return rel
