"""diffusers' DreamBooth-LoRA command line, for ETHER: the flag names of `train_dreambooth_lora.py` mapped onto
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
        "timestep_bias_portion", "dataset_name", "image_column", "caption_column")
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
    p.add_argument("--report_to", default="tensorboard", help="tensorboard (logged when installed), all or none")
    for flag in REFUSED:
        p.add_argument(f"--{flag}", default=None, nargs="?", const=True, help=argparse.SUPPRESS)
    return p


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
              if v is not None and k not in ("validation_epochs", "report_to", *REFUSED)}
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
