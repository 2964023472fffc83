"""DreamBooth-style subject training with ETHER / ETHER+ adapters, on accelerate.

`train_dreambooth(config)` is the whole job: validate inputs, load the base, make missing class images, train
the adapter vectors (UNet or FLUX / SD3 transformer, optionally the CLIP text encoders), checkpoint, validate, and write
`OUTPUT_DIR/ether_adapter.safetensors` with a model card. Runs unchanged under `accelerate launch` (DDP): every
rank computes its own micro-batches, gradients of the (small) adapter vectors are averaged with one all-reduce,
and only rank 0 writes files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import bases, inject
from ..adapter_file import copy_vectors, save_adapter
from ..atomic import atomic_write, atomic_write_text
from ..data import Example, check_resolution, load_dataset_examples, load_folder
from ..errors import EtherError
from ..layers import AdapterConfig
from ..pipelines import describe_base, image_grid, pipeline_components
from .common import make_lr_scheduler, make_optimizer, step_generator
from .config import DreamBoothConfig
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
from .objectives import make_objective

ADAPTER_NAME = "default"
ADAPTER_FILE = "ether_adapter.safetensors"


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
            with torch.no_grad():  # at the training size (a FLUX / SD3 default of 1024 px would be resized anyway)
                images = pipe(cfg.class_prompt, num_images_per_prompt=len(chunk), generator=generators,
                              num_inference_steps=cfg.class_generation_steps, height=cfg.resolution,
                              width=cfg.resolution).images
            for i, image in zip(chunk, images):
                atomic_write(class_dir / f"class-{i:05d}.png", lambda tmp, im=image: im.save(tmp, format="PNG"))
            bar.update(len(chunk))
        bar.close()
    accelerator.wait_for_everyone()
    return load_folder(class_dir, cfg.class_prompt, what="class")[: cfg.num_class_images]


def _trigger(instance_prompt: str, class_prompt: str | None) -> str | None:
    """The identifier: the instance prompt's words that the class prompt lacks (e.g. 'sks')."""
    if not class_prompt:
        return None
    extra = [w for w in instance_prompt.split() if w not in class_prompt.split()]
    return " ".join(extra) or None


def write_model_card(path: Path, cfg: DreamBoothConfig, n_params: int, steps: int, validation: list[str]) -> None:
    """`OUT/README.md` as the diffusers scripts write it: Hugging Face model-card front matter, the resolved
    settings, and commands that work as printed."""
    resolved = AdapterConfig(method=cfg.method, n_blocks=cfg.n_blocks, sides=cfg.sides, targets=cfg.targets)
    base = describe_base(cfg.base)
    base_flag = "" if cfg.base is None else f" --base {cfg.base}"
    images = "\n".join(f"![validation]({v})" for v in validation[-1:]) or "(no validation images)"
    front = ["---", f"base_model: {json.dumps(base)}", "library_name: ether-diffusion", "license: other",  # the base model's licence applies
             f"instance_prompt: {json.dumps(cfg.instance_prompt)}", "tags:",
             *(f"- {t}" for t in ("text-to-image", "diffusers", "ether", resolved.method, "dreambooth")), "---"]
    text = "\n".join(front) + f"""

# ETHER adapter: `{cfg.instance_prompt}`

- base model: `{base}`
- method: {resolved.method} (n_blocks={resolved.n_blocks}, sides={resolved.sides}, targets={resolved.targets}), {n_params:,} parameters
- trigger prompt: `{cfg.instance_prompt}`
- trained {steps} steps, learning rate {cfg.learning_rate}, resolution {cfg.resolution}, batch \
{cfg.train_batch_size} × {cfg.gradient_accumulation_steps} accumulation, mixed precision {cfg.mixed_precision}
- prior preservation: {f'yes ({cfg.class_prompt!r}, weight {cfg.prior_loss_weight})' if cfg.with_prior_preservation else 'no'}; text encoder adapted: {'yes' if cfg.train_text_encoder else 'no'}

{images}

## Use it
```bash
ether-diffusion generate --prompt "{cfg.instance_prompt}" --out out/ --adapter {ADAPTER_FILE}{base_flag}
```
```python
from ether_diffusion.pipelines import load_pipeline, load_ether_weights
pipe = load_pipeline({cfg.base!r})
load_ether_weights(pipe, "{ADAPTER_FILE}")
image = pipe("{cfg.instance_prompt}").images[0]
```
Export to a LoRA any diffusers / ComfyUI / A1111 loader reads:
`ether-diffusion export {ADAPTER_FILE} --to lora{base_flag} --out lora.safetensors`.
"""
    atomic_write_text(path, text)


def train_dreambooth(cfg: DreamBoothConfig, pipe=None,
                     extra_trainable: list[torch.nn.Parameter] | None = None) -> Path | None:
    """Run a whole DreamBooth training; return the path of the written adapter file.

    `extra_trainable`: further parameters of `pipe` trained at the UNet learning rate and not saved (the
    benchmarks train PEFT LoRA / OFT this way, in the same loop). With `train_adapters=False` they are all
    that is trained, nothing is written but the checkpoints' optimiser state, and None is returned.
    """
    cfg.validate()
    AdapterConfig(method=cfg.method, n_blocks=cfg.n_blocks, sides=cfg.sides, targets=cfg.targets)  # checks early
    if cfg.resolution is not None:
        check_resolution(cfg.resolution)
    if cfg.dataset_name:  # bad data fails before any model loads
        instance = load_dataset_examples(cfg.dataset_name, cfg.image_column, cfg.caption_column, cfg.instance_prompt)
    else:
        instance = load_folder(cfg.instance_dir, cfg.instance_prompt)
    output_dir = Path(cfg.output_dir)
    accelerator = make_accelerator(cfg)
    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    pipe, weight_dtype, resolution = prepare_base(cfg, device, pipe)
    class_examples = ensure_class_images(pipe, cfg, accelerator) if cfg.with_prior_preservation else []

    torch.manual_seed(cfg.seed)  # identical adapter initialisation on every rank
    components = pipeline_components(pipe)
    denoiser = bases.denoiser(pipe)
    objective = make_objective(pipe, cfg, resolution, weight_dtype, device)  # refuses flags of the other family
    denoiser_cfg = AdapterConfig(method=cfg.method, n_blocks=cfg.n_blocks, sides=cfg.sides, targets=cfg.targets)
    groups = []
    if cfg.train_adapters:
        inject.add_adapter(denoiser, ADAPTER_NAME, denoiser_cfg)
        groups.append({"params": inject.trainable_parameters(denoiser), "lr": cfg.learning_rate})
    elif not extra_trainable:
        raise EtherError("nothing to train: train_adapters is off and no extra parameters were given")
    text_models = [m for n, m in components.items() if n.startswith("text_encoder")]
    for model in text_models:
        model.requires_grad_(False)
        if cfg.train_text_encoder and cfg.train_adapters:
            te_cfg = AdapterConfig(method=cfg.method, n_blocks=cfg.n_blocks, sides=cfg.sides,
                                   targets=cfg.text_encoder_targets)
            inject.add_adapter(model, ADAPTER_NAME, te_cfg)
            groups.append({"params": inject.trainable_parameters(model),
                           "lr": cfg.text_encoder_lr or cfg.learning_rate})
    if extra_trainable:  # after the text encoders are frozen: extra parameters may live in them
        groups.append({"params": [p.requires_grad_(True) for p in extra_trainable], "lr": cfg.learning_rate})
    if cfg.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
        denoiser.train()  # diffusers checkpoints only in training mode
    params = [p for g in groups for p in g["params"]]
    n_params = sum(p.numel() for p in params)
    optimizer = prepare_optimizer(accelerator, make_optimizer(groups, cfg))
    lr_scheduler = make_lr_scheduler(optimizer.optimizer, cfg)

    def write_adapter(path: Path, steps: int) -> Path | None:
        if not cfg.train_adapters:
            return None  # only the caller's extra parameters were trained; the caller keeps them
        info = {"instance_prompt": cfg.instance_prompt, "trigger": _trigger(cfg.instance_prompt, cfg.class_prompt),
                "class_prompt": cfg.class_prompt, "base_model": describe_base(cfg.base),
                "training": {"steps": steps, "learning_rate": cfg.learning_rate, "resolution": resolution,
                             "prior_preservation": cfg.with_prior_preservation, "seed": cfg.seed,
                             "batch_size": cfg.train_batch_size * cfg.gradient_accumulation_steps * world}}
        return save_adapter(path, components, ADAPTER_NAME, info=info)

    start_step = resume(cfg, output_dir, lambda f: copy_vectors(f, components, ADAPTER_NAME), optimizer,
                        lr_scheduler, accelerator.is_main_process, accelerator.scaler)

    text_trained = any(p.requires_grad for model in text_models for p in model.parameters())
    conditioning = TextConditioner(pipe, device, cache=not text_trained, max_sequence_length=cfg.max_sequence_length)

    def source(examples: list[Example]) -> LatentSource:
        return LatentSource(pipe, examples, resolution, device, cache=cfg.cache_latents,
                            center_crop=cfg.center_crop, random_flip=cfg.random_flip)

    sources = [(source(instance), instance, 1.0)]
    if class_examples:
        sources.append((source(class_examples), class_examples, cfg.prior_loss_weight))
    open_run(cfg, accelerator, output_dir, "ether-dreambooth")
    bs, accum = cfg.train_batch_size, cfg.gradient_accumulation_steps

    def micro_loss(step: int, micro: int) -> torch.Tensor:
        g = step_generator(cfg.seed, step, rank, micro)
        first = ((step * accum + micro) * world + rank) * bs
        latents, caps, weights = [], [], []
        for src, examples, weight in sources:
            idx = sample_indices(len(examples), first, bs, cfg.seed + len(weights))
            latents.append(src.latents(idx, g))
            caps += [examples[i].caption for i in idx]
            weights += [weight] * bs
        latents = torch.cat(latents).to(device, weight_dtype)
        per_sample = objective.loss(latents, conditioning(caps), g, accelerator.autocast)
        w = torch.tensor(weights, device=device)
        return (per_sample * w).sum() / bs / accum  # instance mean + prior_loss_weight × class mean

    loss_value, validation_images, seconds = run_steps(
        cfg, accelerator, params, optimizer, lr_scheduler, start_step, output_dir, micro_loss, write_adapter,
        lambda step: run_validation(pipe, cfg, output_dir, step, accelerator))

    final = output_dir / ADAPTER_FILE if cfg.train_adapters else None
    if accelerator.is_main_process:
        if final is not None:
            write_adapter(final, cfg.max_steps)
            write_model_card(output_dir / "README.md", cfg, n_params, cfg.max_steps, validation_images)
        atomic_write_text(output_dir / "training_summary.json", json.dumps(
            {"steps": cfg.max_steps, "resumed_from_step": start_step, "final_loss": loss_value,
             "seconds": round(seconds, 2), "trainable_parameters": n_params, "processes": world}, indent=2))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


def run_validation(pipe, cfg: DreamBoothConfig, output_dir: Path, step: int, accelerator) -> str:
    """Draw the validation prompts with the current adapter; save one grid (rows: prompts) and log it."""
    prompts = cfg.validation_prompts or [cfg.instance_prompt]
    denoiser = bases.denoiser(pipe)
    was_training = denoiser.training
    denoiser.eval()
    rows = []
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            generator = torch.Generator().manual_seed(cfg.seed + i)
            rows.append(pipe(prompt, num_images_per_prompt=cfg.num_validation_images, generator=generator,
                             num_inference_steps=cfg.validation_inference_steps,
                             guidance_scale=cfg.validation_guidance).images)
    denoiser.train(was_training)
    rel = f"validation/step-{step:06d}.png"
    grid = image_grid(rows)
    atomic_write(output_dir / rel, lambda tmp: grid.save(tmp, format="PNG"))
    log_validation_grid(accelerator, grid, step)
    return rel
