"""PEFT peers (LoRA, DoRA, DeLoRA, OFT, HRA) put on the same layers the ETHER runs adapt: benchmark-only, PEFT is an
extra."""

from __future__ import annotations

import torch

from ether_diffusion.inject import find_targets

PEFT_TAGS = ("lora_", "oft_", "hra_", "delora_")
# Each method's documented learning rate for DreamBooth: ETHER / ETHER+ the paper's 6e-3; LoRA / DoRA diffusers'
# 6e-4 (the paper's LoRA rate); DeLoRA 10-100x LoRA's per PEFT's docs (the low end, 10x); OFT the paper's 6e-5; HRA
# as OFT.
RECOMMENDED_LR = {"ether": 6e-3, "etherplus": 6e-3, "lora-r4": 6e-4, "dora-r4": 6e-4, "delora-r4": 6e-3,
                  "oft": 6e-5, "hra-r1": 6e-5}
ETHER_METHODS = ("ether", "etherplus")


def add_peft(model: torch.nn.Module, kind: str, targets: str = "attn") -> list[torch.nn.Parameter]:
    """Inject PEFT `kind` (lora-r4 as diffusers' DreamBooth default, lora-r16 the rank FLUX LoRAs are commonly
    trained at, dora-r4 the same with `use_dora` as diffusers'
    `--use_dora`, delora-r4 with PEFT's default boundary lambda 15, oft with PEFT's default block size, hra-r1)
    into the layers `targets` selects; return its parameters, which alone require gradients."""
    from peft import DeloraConfig, HRAConfig, LoraConfig, OFTConfig, inject_adapter_in_model

    names = find_targets(model, targets)
    config = {"lora-r4": LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=names),
              "lora-r16": LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian", target_modules=names),
              "dora-r4": LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", use_dora=True,
                                    target_modules=names),
              "delora-r4": DeloraConfig(r=4, delora_lambda=15, target_modules=names),
              "oft": OFTConfig(target_modules=names), "hra-r1": HRAConfig(r=1, target_modules=names)}[kind]
    inject_adapter_in_model(config, model)
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(any(tag in name for tag in PEFT_TAGS))
        if p.requires_grad:
            params.append(p)
    return params
