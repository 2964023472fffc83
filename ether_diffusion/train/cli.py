"""`ether-diffusion train dreambooth|control` flags: every config field, types from the dataclass annotations."""

from __future__ import annotations

import argparse
from dataclasses import fields

from .config import ControlConfig, DreamBoothConfig, TrainingConfig, build_config, read_config_file

SHORT_HELP = {
    "instance_dir": "folder of subject photos (jpg/png/webp, optional name.txt captions)",
    "instance_prompt": "prompt with the identifier, e.g. 'a photo of sks dog'",
    "data_dir": "folder with metadata.jsonl rows {image, conditioning_image, text} (paths relative to it)",
    "dataset_name": "instead of a folder: a hub dataset id or a local folder datasets.load_dataset reads (an "
                    "imagefolder with metadata.jsonl); needs pip install 'ether-diffusion[datasets]'",
    "caption_column": "the dataset's caption column (dreambooth default: the instance prompt for every picture)",
    "control_kind": "what the control images are: segmentation, edges, depth, pose or other",
    "control_injection": "where the map's features enter the UNet: multiscale (at every down block, as "
                         "T2I-Adapter; twice the paper's IoU in 600 steps on the embedded base) or conv_in (once, "
                         "the paper's setting); see docs/control.md",
    "train_adapters": "train ETHER adapters (control: --no-train-adapters trains the encoder alone)",
    "output_dir": "where the adapter, checkpoints and validation images go "
                  "(default: the app's adapters folder, ~/.local/share/ether-diffusion/adapters/<name>)",
    "base": "diffusers folder or hub id (default: the embedded model)",
    "method": "ether or etherplus",
    "learning_rate": "the adapters' learning rate (dreambooth: the paper's 6e-3; control: 1e-1, which follows the "
                     "map on the embedded base where the paper's 1e-3 does not, see docs/control.md)",
    "targets": "preset (attn, attn+ff) or comma-separated regexes",
    "max_steps": "optimizer steps (dreambooth: the paper's 1,400; control: 2,400, with batch 8 the budget that "
                 "reaches both IoU targets on the embedded base, was 2,000 of batch 4; see docs/control.md)",
    "train_batch_size": "pictures per step (control: 8, was 4; where memory is short, --train-batch-size 4 "
                        "--gradient-accumulation-steps 2 keeps 8 per step)",
    "resume_from_checkpoint": "'latest' or a checkpoint folder",
    "timestep_bias_strategy": "none, later (favour the noisiest timesteps, where the layout is decided), earlier "
                              "or range (--timestep-bias-begin/-end); weighted by --timestep-bias-multiplier",
    "weighting_scheme": "FLUX / SD3 timestep sampling and loss weighting: none, logit_normal, mode, sigma_sqrt or "
                        "cosmap (default: FLUX none, SD3 logit_normal, as diffusers' scripts)",
    "guidance_scale": "FLUX: the guidance-embedding value trained with, when the transformer has one",
    "max_sequence_length": "FLUX / SD3: T5 tokens per prompt (default: FLUX 512, SD3 77)",
    "precondition_outputs": "SD3: compare x estimates instead of velocities (EDM preconditioning)",
    "logit_mean": "FLUX / SD3 logit_normal weighting's mean",
    "logit_std": "FLUX / SD3 logit_normal weighting's std",
    "mode_scale": "FLUX / SD3 mode weighting's scale",
    "validation_prompts": "repeatable; default: the instance prompt (dreambooth) or each row's caption (control)",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_config_flags(p: argparse.ArgumentParser, config_cls: type[TrainingConfig]) -> None:
    p.add_argument("--config", help="TOML / YAML / JSON file of settings; flags override it")
    defaults = config_cls()
    for f in fields(config_cls):
        default = getattr(defaults, f.name)
        help_text = SHORT_HELP.get(f.name, "") + (f" (default: {default})" if default not in ("", None, []) else "")
        if isinstance(default, bool):
            p.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif isinstance(default, list):
            p.add_argument(_flag(f.name).rstrip("s"), dest=f.name, action="append", default=None, help=help_text)
        else:  # the annotation ("int | None", "float", "str") gives the type, whatever the default
            kind = int if str(f.type).startswith("int") else float if str(f.type).startswith("float") else str
            p.add_argument(_flag(f.name), type=kind, default=None, help=help_text)
    p.set_defaults(config_cls=config_cls, func=run_training)


def add_train_parser(sub) -> None:
    train = sub.add_parser("train", help="train an adapter")
    kinds = train.add_subparsers(dest="kind", required=True)
    _add_config_flags(kinds.add_parser("dreambooth", help="subject-driven training (DreamBooth style)"),
                      DreamBoothConfig)
    _add_config_flags(kinds.add_parser("control", help="control image → picture (control encoder + ETHER)"),
                      ControlConfig)


def run_training(args: argparse.Namespace) -> None:
    file_values = read_config_file(args.config) if args.config else {}
    cfg = build_config(args.config_cls, file_values, vars(args))
    if isinstance(cfg, ControlConfig):
        from .control import train_control as train
    else:
        from .dreambooth import train_dreambooth as train
    announce_adapter(train(cfg))


def announce_adapter(path) -> None:
    """Say where the adapter went, from the process that wrote it only (not from every DDP rank)."""
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(f"adapter written to {path}")
