"""`ether-diffusion train dreambooth` flags: every DreamBoothConfig field, defaults from the dataclass."""

from __future__ import annotations

import argparse
from dataclasses import fields

from .config import DreamBoothConfig, build_config, read_config_file

SHORT_HELP = {
    "instance_dir": "folder of subject photos (jpg/png/webp, optional name.txt captions)",
    "instance_prompt": "prompt with the identifier, e.g. 'a photo of sks dog'",
    "output_dir": "where the adapter, checkpoints, validation images and model card go "
                  "(default: the app's adapters folder, ~/.local/share/ether-diffusion/adapters/<prompt>)",
    "base": "diffusers folder or hub id (default: the embedded model)",
    "method": "ether or etherplus",
    "targets": "preset (attn, attn+ff) or comma-separated regexes",
    "resume_from_checkpoint": "'latest' or a checkpoint folder",
    "validation_prompts": "repeatable; default: the instance prompt",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_train_parser(sub) -> None:
    train = sub.add_parser("train", help="train an adapter")
    kinds = train.add_subparsers(dest="kind", required=True)
    p = kinds.add_parser("dreambooth", help="subject-driven training (DreamBooth style)",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="TOML / YAML / JSON file of settings; flags override it")
    defaults = DreamBoothConfig()
    for f in fields(DreamBoothConfig):
        default = getattr(defaults, f.name)
        help_text = SHORT_HELP.get(f.name, "") + (f" (default: {default})" if default not in ("", None, []) else "")
        if isinstance(default, bool):
            p.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif isinstance(default, list):
            p.add_argument(_flag(f.name).rstrip("s"), dest=f.name, action="append", default=None, help=help_text)
        else:  # the annotation ("int | None", "float", "str") gives the type, whatever the default
            kind = int if str(f.type).startswith("int") else float if str(f.type).startswith("float") else str
            p.add_argument(_flag(f.name), type=kind, default=None, help=help_text)
    p.set_defaults(func=run_dreambooth)


def run_dreambooth(args: argparse.Namespace) -> None:
    from .dreambooth import train_dreambooth

    file_values = read_config_file(args.config) if args.config else {}
    cfg = build_config(DreamBoothConfig, file_values, vars(args))
    path = train_dreambooth(cfg)
    print(f"adapter written to {path}")
