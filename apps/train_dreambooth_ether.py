#!/usr/bin/env python
"""DreamBooth with an ETHER adapter, taking the flag names of diffusers' `train_dreambooth_lora.py`.

    accelerate launch apps/train_dreambooth_ether.py --pretrained_model_name_or_path=path/to/sd15 \
        --instance_data_dir=dog --output_dir=dog-ether --instance_prompt="a photo of sks dog" \
        --resolution=512 --max_train_steps=1400 --learning_rate=6e-3 [--method etherplus --n_blocks 1]

A thin layer over `ether_diffusion.train.diffusers_flags`: it writes what `ether-diffusion train dreambooth`
writes (adapter, model card, settings, checkpoints). See apps/README.md.
"""

import sys

from ether_diffusion.train.diffusers_flags import main

if __name__ == "__main__":
    sys.exit(main())
