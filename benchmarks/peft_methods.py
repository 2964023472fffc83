"""PEFT peers (LoRA, OFT, HRA) put on the same layers the ETHER runs adapt: benchmark-only, PEFT is an extra."""

from __future__ import annotations

import torch

from ether_diffusion.inject import find_targets

PEFT_TAGS = ("lora_", "oft_", "hra_")


def add_peft(model: torch.nn.Module, kind: str, targets: str = "attn") -> list[torch.nn.Parameter]:
    """Inject PEFT `kind` (lora-r4 as diffusers' DreamBooth default, oft with PEFT's default block size, hra-r1)
    into the layers `targets` selects; return its parameters, which alone require gradients."""
    from peft import HRAConfig, LoraConfig, OFTConfig, inject_adapter_in_model

    names = find_targets(model, targets)
    config = {"lora-r4": LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=names),
              "oft": OFTConfig(target_modules=names), "hra-r1": HRAConfig(r=1, target_modules=names)}[kind]
    inject_adapter_in_model(config, model)
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(any(tag in name for tag in PEFT_TAGS))
        if p.requires_grad:
            params.append(p)
    return params
