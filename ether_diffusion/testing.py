"""Tiny diffusion pipelines with random weights, built from configs (tests and quick benchmarks).

SD-1.x-, SDXL-, FLUX.1- and SD3-like, sharing the toy world's word-level CLIP tokenizer and a T5 tokenizer trained
here, so that nothing is downloaded.
"""

from __future__ import annotations

import tempfile

import torch

from .toyworld.tokenizer import build_vocab_and_merges, write_tokenizer

CROSS_DIM = 32


def _tokenizer():
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(tmp)
        return CLIPTokenizer.from_pretrained(tmp)


def _text_config(**overrides):
    from transformers import CLIPTextConfig

    vocab, _ = build_vocab_and_merges()
    cfg = dict(vocab_size=len(vocab), hidden_size=CROSS_DIM, intermediate_size=37, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=32, bos_token_id=vocab["<|startoftext|>"],
               eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"], projection_dim=CROSS_DIM)
    cfg.update(overrides)
    return CLIPTextConfig(**cfg)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(16, 16, 16), norm_num_groups=8, latent_channels=4, sample_size=32,
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)


def _scheduler(prediction_type: str):
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, prediction_type=prediction_type, steps_offset=1)


def tiny_sd_pipeline(prediction_type: str = "epsilon", seed: int = 0):
    """An SD-1.x-shaped pipeline (32 px images, 8×8 latents) with random weights."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS_DIM, attention_head_dim=4, norm_num_groups=32,
    )
    return StableDiffusionPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(_text_config()), tokenizer=_tokenizer(), unet=unet,
        scheduler=_scheduler(prediction_type), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(seed: int = 0):
    """An SDXL-shaped pipeline: two text encoders, pooled embeddings, size/crop time ids."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=32,
    )
    return StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(_text_config()), tokenizer=_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(_text_config()), tokenizer_2=_tokenizer(), unet=unet,
        scheduler=_scheduler("epsilon"),
    )


T5_SENTENCES = ("a large red circle on a white background", "a photo of sks dog on the beach",
                "a small blue and yellow striped square on a gray background", "a photo of a dog")


def t5_tokenizer():
    """A T5 tokenizer made here (a small unigram model trained on a few sentences), since T5's own comes from a hub."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(T5_SENTENCES, trainers.UnigramTrainer(
        vocab_size=64, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"))
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0,
                           model_max_length=32)


def _t5():
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4))


def tiny_flux_pipeline(seed: int = 0):
    """A FLUX.1-shaped pipeline (double and single transformer blocks, CLIP + T5, flow matching)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=CROSS_DIM, axes_dims_rope=[4, 4, 8])
    vae = AutoencoderKL(block_out_channels=(16, 16, 16), norm_num_groups=8, latent_channels=4, sample_size=32,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        shift_factor=0.0609, scaling_factor=1.5035)
    return FluxPipeline(transformer=transformer, vae=vae, text_encoder=CLIPTextModel(_text_config()),
                        tokenizer=_tokenizer(), text_encoder_2=_t5(), tokenizer_2=t5_tokenizer(),
                        scheduler=FlowMatchEulerDiscreteScheduler())


def tiny_sd3_pipeline(seed: int = 0):
    """An SD3-shaped pipeline (joint transformer blocks, two CLIP encoders + T5, flow matching)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
                                        caption_projection_dim=32, pooled_projection_dim=2 * CROSS_DIM, out_channels=4)
    vae = AutoencoderKL(block_out_channels=(16, 16, 16), norm_num_groups=8, latent_channels=4, sample_size=32,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        shift_factor=0.0609, scaling_factor=1.5035)
    return StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, text_encoder=CLIPTextModelWithProjection(_text_config()), tokenizer=_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(_text_config()), tokenizer_2=_tokenizer(), text_encoder_3=_t5(),
        tokenizer_3=t5_tokenizer(), scheduler=FlowMatchEulerDiscreteScheduler())


def full_size_transformer(kind: str):
    """FLUX.1-dev's or SD3.5-medium's transformer (their repositories' transformer/config.json) on the meta device:
    every layer name and shape, no memory."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    with torch.device("meta"):
        if kind == "flux":
            return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                          attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                          pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=[16, 56, 56])
        return SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                                     num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                                     pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                                     dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")


def tiny_backbones(folder) -> tuple[str, str]:
    """Randomly initialised DINO-style ViT and CLIP folders (with processors) for the evaluation plumbing."""
    from pathlib import Path

    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, ViTConfig, ViTImageProcessor,
                              ViTModel)

    torch.manual_seed(0)
    dino, clip = Path(folder) / "dino", Path(folder) / "clip"
    vit = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, image_size=32,
               patch_size=16)
    ViTModel(ViTConfig(**vit), add_pooling_layer=False).save_pretrained(dino)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(dino)
    config = CLIPConfig(text_config=_text_config().to_dict(), vision_config=vit, projection_dim=16)
    CLIPModel(config).save_pretrained(clip)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=_tokenizer()).save_pretrained(clip)
    return str(dino), str(clip)


def random_lpips_weights(folder) -> tuple[dict, dict]:
    """LPIPS weight files in the published layouts (torchvision's AlexNet checkpoint with a classifier part the
    loader must ignore, lpips' linear heads) holding random values; returns both state dicts."""
    from pathlib import Path

    from .lpips import ALEXNET_FILE, CHANNELS, HEADS_FILE, alexnet_features

    g = torch.Generator().manual_seed(0)
    trunk = {}
    for key, value in alexnet_features().state_dict().items():
        scale = 0.1 if key.endswith("bias") else value[0].numel() ** -0.5
        trunk[f"features.{key}"] = torch.randn(value.shape, generator=g) * scale
    trunk["classifier.1.weight"] = torch.randn(8, 9216, generator=g)
    heads = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for i, c in enumerate(CHANNELS)}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(trunk, folder / ALEXNET_FILE)
    torch.save(heads, folder / HEADS_FILE)
    return trunk, heads


def write_adapter_tensors(out, tensors: dict, metadata: dict | str, checksum: bool = True):
    """Write an adapter file from raw parts, as a writer would (with a valid checksum unless told otherwise): lets
    tests build files that are wrong in exactly one way."""
    import json

    from safetensors.torch import save_file

    from .adapter_file import CHECKSUM_KEY, METADATA_KEY, content_checksum

    meta_json = metadata if isinstance(metadata, str) else json.dumps(metadata)
    extra = {CHECKSUM_KEY: content_checksum(meta_json, tensors)} if checksum else {}
    save_file(tensors, str(out), metadata={"format": "pt", METADATA_KEY: meta_json, **extra})
    return out


def randomise_vectors(model, name: str = "a", seed: int = 0) -> None:
    """Give every vector of adapter `name` on `model` reproducible random values: away from ETHER+'s identity
    start, so tests compare real transforms."""
    from .inject import adapter_modules

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in adapter_modules(model, name).values():
            for p in adapter.vectors.values():
                p.copy_(torch.randn(p.shape, generator=g))
