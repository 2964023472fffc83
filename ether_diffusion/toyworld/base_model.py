"""Architecture of the embedded base model: a small Stable-Diffusion-1.x-shaped pipeline for 64×64 pictures.

Standard diffusers classes only (AutoencoderKL, UNet2DConditionModel, CLIPTextModel, CLIPTokenizer), so the
saved folder loads with plain `StableDiffusionPipeline.from_pretrained` and every code path of the toolkit is
the one real SD checkpoints take.
"""

from __future__ import annotations

from pathlib import Path

from .tokenizer import MAX_LENGTH, build_vocab_and_merges

EMBEDDED_MODEL_DIR = Path(__file__).parent / "model"
CROSS_ATTENTION_DIM = 128


def vae_config() -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=64,
        mid_block_add_attention=False,  # fully convolutional: trains on crops, encodes any size
    )


def unet_config(transformer_layers: int = 1) -> dict:
    """The UNet's architecture; `transformer_layers` stacks that many transformer layers in every attention block."""
    return dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(64, 128, 128),
        # cross-attention at every level: a pattern's colours are placed stripe by stripe at 16×16, where a
        # UNet attending only at 8×8 and 4×4 draws the shape right but mixes up which colour goes where
        down_block_types=("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=CROSS_ATTENTION_DIM,
        attention_head_dim=8,
        norm_num_groups=32,
        transformer_layers_per_block=transformer_layers,
    )


def text_encoder_config() -> dict:
    vocab, _ = build_vocab_and_merges()
    return dict(
        vocab_size=len(vocab),
        hidden_size=CROSS_ATTENTION_DIM,
        intermediate_size=4 * CROSS_ATTENTION_DIM,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
        projection_dim=CROSS_ATTENTION_DIM,
    )


def scheduler_config() -> dict:
    """SD-1.x's training schedule (scaled-linear betas, 1000 steps, epsilon prediction)."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        steps_offset=1,
    )
