"""Where and in what precision a command runs: `--device auto|cpu|cuda|mps` and `--dtype auto|fp32|fp16|bf16`.

`auto` picks CUDA when present (else the CPU) and fp16 on CUDA (else fp32), which is what users of the diffusers
scripts expect. Adapter vectors stay fp32 whatever the base's dtype (see `layers.EtherAdapter`).
"""

from __future__ import annotations

import argparse

import torch

from .errors import EtherError

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(choice: str = "auto") -> torch.device:
    """The torch device for a `--device` choice; an unavailable accelerator is a user error, not a crash later."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise EtherError("--device cuda: no CUDA GPU is available here (torch.cuda.is_available() is False); "
                         "use --device cpu or auto")
    if choice == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise EtherError("--device mps: Apple's MPS backend is not available here; use --device cpu or auto")
    if choice not in DEVICES:
        raise EtherError(f"unknown device {choice!r}; choose one of: {', '.join(DEVICES)}")
    return torch.device(choice)


def resolve_dtype(choice: str, device: torch.device) -> torch.dtype:
    """The base model's dtype for a `--dtype` choice: auto = fp16 on CUDA, fp32 elsewhere."""
    if choice == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[choice]
    except KeyError:
        raise EtherError(f"unknown dtype {choice!r}; choose one of: auto, {', '.join(DTYPES)}") from None


def mixed_precision_for(dtype: torch.dtype) -> str:
    """accelerate's mixed_precision setting that trains a base held in `dtype`."""
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "no")


def add_device_arguments(p: argparse.ArgumentParser, dtype_help: str = "the base model's dtype") -> None:
    p.add_argument("--device", choices=DEVICES, default="auto", help="auto: cuda when present, else cpu")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help=f"{dtype_help}; auto: fp16 on cuda, "
                   "else fp32 (adapter vectors stay fp32)")


def device_and_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    device = resolve_device(args.device)
    return device, resolve_dtype(args.dtype, device)
