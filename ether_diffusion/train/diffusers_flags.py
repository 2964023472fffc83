"""diffusers' DreamBooth-LoRA command line, for ETHER: the flag names of `train_dreambooth_lora.py` (and of its
FLUX / SD3 siblings `train_dreambooth_lora_flux.py`, `train_dreambooth_lora_sd3.py`) mapped onto
`DreamBoothConfig`, so swapping the script name in such a command trains an ETHER adapter.

    accelerate launch apps/train_dreambooth_ether.py --pretrained_model_name_or_path=… --instance_data_dir=…
        --output_dir=… --instance_prompt="a photo of sks dog" --max_train_steps=500 [--method etherplus] …

Flags that only make sense for LoRA (or for the hub) are refused by name, with the reason and what to use instead.
"""

from __future__ import annotations

import argparse
import math

from ..data import IMAGE_SUFFIXES
from ..errors import EtherError
from ..inject import MODEL_PRESETS
from .config import DreamBoothConfig, build_config

# diffusers flag → DreamBoothConfig field (None: same name)
RENAMED = {
    "pretrained_model_name_or_path": "base", "instance_data_dir": "instance_dir", "class_data_dir": "class_dir",
    "max_train_steps": "max_steps", "validation_prompt": "validation_prompts",
}
SAME = ("output_dir", "instance_prompt", "class_prompt", "resolution", "train_batch_size",
        "gradient_accumulation_steps", "learning_rate", "lr_scheduler", "lr_warmup_steps", "checkpointing_steps",
        "checkpoints_total_limit", "num_validation_images", "seed", "mixed_precision", "num_class_images",
        "prior_loss_weight", "sample_batch_size", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon",
        "max_grad_norm", "snr_gamma", "noise_offset", "resume_from_checkpoint", "text_encoder_lr",
        "timestep_bias_strategy", "timestep_bias_multiplier", "timestep_bias_begin", "timestep_bias_end",
        "timestep_bias_portion", "dataset_name", "image_column", "caption_column",
        # FLUX / SD3 scripts
        "weighting_scheme", "logit_mean", "logit_std", "mode_scale", "guidance_scale", "max_sequence_length",
        "precondition_outputs")
SWITCHES = ("with_prior_preservation", "train_text_encoder", "gradient_checkpointing", "use_8bit_adam",
            "center_crop", "random_flip")
ETHER_FLAGS = {"method": "ether or etherplus (default etherplus)", "n_blocks": "block-diagonal blocks (default 1)",
               "targets": "preset (attn, attn+ff) or comma-separated regexes (default attn)",
               "sides": "input, output or both (default: the method's)", "device": "auto, cpu, cuda or mps"}
REFUSED = {
    "rank": "an ETHER adapter has no rank (one vector per layer side); use --n_blocks to give it more freedom",
    "lora_dropout": "ETHER has no dropout on its vectors; leave it out",
    "use_dora": "DoRA is a LoRA variant; ETHER's transform is --method ether|etherplus",
    "lora_alpha": "ETHER has no LoRA scale; the strength is set when the adapter is used",
    "push_to_hub": "nothing is uploaded from training; upload OUTPUT_DIR with `huggingface-cli upload`",
    "hub_token": "nothing is uploaded from training; upload OUTPUT_DIR with `huggingface-cli upload`",
    "hub_model_id": "nothing is uploaded from training; upload OUTPUT_DIR with `huggingface-cli upload`",
    "train_text_encoder_ti": "textual inversion is not part of ETHER training; use --train_text_encoder",
    "allow_tf32": "set torch.backends.cuda.matmul.allow_tf32 in your environment instead",
    "enable_xformers_memory_efficient_attention": "diffusers uses PyTorch's scaled-dot-product attention already",
}
REPORT_TO = ("tensorboard", "all", "none")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train_dreambooth_ether.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag in (*RENAMED, *SAME):
        p.add_argument(f"--{flag}", default=None)
    for flag in SWITCHES:
        p.add_argument(f"--{flag}", action="store_true", default=None)
    for flag, text in ETHER_FLAGS.items():
        p.add_argument(f"--{flag}", default=None, help=text)
    p.add_argument("--validation_epochs", default=None, help="validate every N passes over the instance pictures")
    p.add_argument("--lora_layers", default=None,
                   help="FLUX / SD3 scripts: comma-separated module names to adapt (e.g. attn.to_k,attn.to_q); "
                        "becomes --targets")
    p.add_argument("--lora_blocks", default=None,
                   help="SD3 script: comma-separated transformer block indices the layers are taken from")
    p.add_argument("--report_to", default="tensorboard", help="tensorboard (logged when installed), all or none")
    for flag in REFUSED:
        p.add_argument(f"--{flag}", default=None, nargs="?", const=True, help=argparse.SUPPRESS)
    return p


def targets_from_lora_layers(layers: str | None, blocks: str | None) -> str:
    """diffusers' `--lora_layers` (module names, matched as name endings, as PEFT's target_modules) and SD3's
    `--lora_blocks` (block indices) as a `--targets` value: one exact pattern per module name."""
    import re

    names = [n.strip() for n in (layers or "").split(",") if n.strip()]
    patterns = [re.escape(n) for n in names] or ["attn"]  # the scripts' default layers are the attn preset
    if blocks is None:
        return ",".join(patterns)
    try:
        indices = [int(b) for b in blocks.split(",") if b.strip()]
    except ValueError:
        raise EtherError(f"--lora_blocks must be comma-separated block numbers, got {blocks!r}") from None
    if patterns == ["attn"]:
        patterns = list(MODEL_PRESETS["SD3Transformer2DModel"]["attn"])
    alternatives = "|".join(str(i) for i in indices)
    return ",".join(rf"transformer_blocks\.({alternatives})\.{p}" for p in patterns)


def steps_per_epoch(instance_dir: str, batch: int) -> int:
    """diffusers' epoch: one pass over the instance pictures at the total batch size."""
    from pathlib import Path

    folder = Path(instance_dir)
    count = sum(1 for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else 1
    return max(1, math.ceil(count / batch))


def config_from_args(argv: list[str] | None = None) -> DreamBoothConfig:
    """Parse a diffusers-style command into a validated `DreamBoothConfig` (errors: `EtherError`)."""
    args = build_parser().parse_args(argv)
    refused = [f for f in REFUSED if getattr(args, f) is not None]
    if refused:
        raise EtherError("; ".join(f"--{f} does not apply: {REFUSED[f]}" for f in refused))
    if args.report_to not in REPORT_TO:
        raise EtherError(f"--report_to {args.report_to}: only TensorBoard logging is built in (logged when "
                         "tensorboard is installed); use tensorboard or none")
    values = {RENAMED.get(k, k): v for k, v in vars(args).items()
              if v is not None and k not in ("validation_epochs", "report_to", "lora_layers", "lora_blocks", *REFUSED)}
    if args.lora_layers is not None or args.lora_blocks is not None:
        if args.targets is not None:
            raise EtherError("give the layers as --targets or as --lora_layers / --lora_blocks, not both")
        values["targets"] = targets_from_lora_layers(args.lora_layers, args.lora_blocks)
    if "validation_prompts" in values:
        values["validation_prompts"] = [values["validation_prompts"]]
    cfg = build_config(DreamBoothConfig, {}, values)
    if args.validation_epochs is not None:
        try:
            epochs = int(args.validation_epochs)
        except ValueError:
            raise EtherError(f"--validation_epochs must be an integer, got {args.validation_epochs!r}") from None
        batch = cfg.train_batch_size * cfg.gradient_accumulation_steps
        cfg.validation_steps = max(1, epochs * steps_per_epoch(cfg.instance_dir or cfg.dataset_name, batch))
    return cfg


def main(argv: list[str] | None = None) -> int:
    """Train as `ether-diffusion train dreambooth` would; exit status 2 with one line for user errors."""
    from ..console import run_command
    from .cli import announce_adapter
    from .dreambooth import train_dreambooth

    return run_command(lambda: announce_adapter(train_dreambooth(config_from_args(argv))))
