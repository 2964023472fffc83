"""Layer names in adapter files and exports are the ecosystem's canonical ones, whatever transformers is installed.

The references are written down here from what the consumers map, not taken from this package's output:
ComfyUI's and A1111's key maps accept `lora_unet_<diffusers module path>`, `lora_te_text_model_encoder_layers_
{b}_self_attn_{q,k,v,out}_proj` for SD 1.x/2.x and `lora_te1_…` / `lora_te2_…` for SDXL's two text encoders;
diffusers' LoRA files name modules `unet.<path>` and `text_encoder[_2].text_model.encoder.layers.{b}.<path>`.
The full-size SD-1.5 and SDXL architectures are built on the meta device (no memory, no download).
"""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ether_diffusion import AdapterConfig, add_adapter
from ether_diffusion.adapter_file import load_adapter, save_adapter
from ether_diffusion.export import export_lora, lora_key_names
from ether_diffusion.inject import ether_layers
from ether_diffusion.pipelines import pipeline_components
from ether_diffusion.testing import randomise_vectors, tiny_sd_pipeline, write_adapter_tensors

ATTN = ("to_q", "to_k", "to_v", "to_out.0")
TEXT = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")


def sd15_unet_blocks() -> list[str]:
    """SD-1.5's 16 transformer blocks (diffusers module paths)."""
    blocks = [f"down_blocks.{d}.attentions.{a}.transformer_blocks.0" for d in range(3) for a in range(2)]
    blocks += ["mid_block.attentions.0.transformer_blocks.0"]
    blocks += [f"up_blocks.{u}.attentions.{a}.transformer_blocks.0" for u in (1, 2, 3) for a in range(3)]
    return blocks


def sdxl_unet_blocks() -> list[str]:
    """SDXL's 70 transformer blocks: depth 2 at 64², 10 at 32² and in the middle."""
    blocks = [f"down_blocks.1.attentions.{a}.transformer_blocks.{t}" for a in range(2) for t in range(2)]
    blocks += [f"down_blocks.2.attentions.{a}.transformer_blocks.{t}" for a in range(2) for t in range(10)]
    blocks += [f"mid_block.attentions.0.transformer_blocks.{t}" for t in range(10)]
    blocks += [f"up_blocks.0.attentions.{a}.transformer_blocks.{t}" for a in range(3) for t in range(10)]
    blocks += [f"up_blocks.1.attentions.{a}.transformer_blocks.{t}" for a in range(3) for t in range(2)]
    return blocks


def reference_kohya(unet_blocks: list[str], text: dict[str, int]) -> set[str]:
    keys = {f"lora_unet_{b.replace('.', '_')}_attn{i}_{m.replace('.', '_')}" for b in unet_blocks for i in (1, 2)
            for m in ATTN}
    keys |= {f"{prefix}_text_model_encoder_layers_{b}_{m.replace('.', '_')}" for prefix, n in text.items()
             for b in range(n) for m in TEXT}
    return keys


def reference_diffusers(unet_blocks: list[str], text: dict[str, int]) -> set[str]:
    keys = {f"unet.{b}.attn{i}.{m}" for b in unet_blocks for i in (1, 2) for m in ATTN}
    keys |= {f"{comp}.text_model.encoder.layers.{b}.{m}" for comp, n in text.items() for b in range(n) for m in TEXT}
    return keys


def meta_models(kind: str) -> dict[str, torch.nn.Module]:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    clip_l = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            max_position_embeddings=77, projection_dim=768)
    with torch.device("meta"):
        if kind == "sd15":
            return {"unet": UNet2DConditionModel(
                        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
                    "text_encoder": CLIPTextModel(clip_l)}
        clip_g = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                num_attention_heads=20, max_position_embeddings=77, projection_dim=1280)
        return {"unet": UNet2DConditionModel(
                    block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
                    transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                    addition_embed_type="text_time", addition_time_embed_dim=256,
                    projection_class_embeddings_input_dim=2816),
                "text_encoder": CLIPTextModel(clip_l), "text_encoder_2": CLIPTextModelWithProjection(clip_g)}


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_export_key_names_are_the_consumers_names_for_full_size_models(kind):
    models = meta_models(kind)
    for comp, model in models.items():
        add_adapter(model, "a", AdapterConfig(method="etherplus", targets="attn" if comp == "unet" else "text"))
    sdxl = kind == "sdxl"
    blocks = sdxl_unet_blocks() if sdxl else sd15_unet_blocks()
    text_kohya = {"lora_te1": 12, "lora_te2": 32} if sdxl else {"lora_te": 12}
    text_diffusers = {"text_encoder": 12, "text_encoder_2": 32} if sdxl else {"text_encoder": 12}
    for style, reference in (("kohya", reference_kohya(blocks, text_kohya)),
                             ("diffusers", reference_diffusers(blocks, text_diffusers))):
        got = set()
        for comp, model in models.items():
            for layer_name, _ in ether_layers(model):
                down, up, _ = lora_key_names(comp, layer_name, style, sdxl)
                got.add(down.rsplit(".", 2)[0])
                assert up.rsplit(".", 2)[0] == down.rsplit(".", 2)[0]
        assert got == reference, (style, sorted(got ^ reference)[:6])


def adapted_tiny():
    pipe = tiny_sd_pipeline()
    for comp, model in pipeline_components(pipe).items():
        add_adapter(model, "a", AdapterConfig(method="etherplus", targets="attn" if comp == "unet" else "text"))
        randomise_vectors(model, "a", seed=len(comp))
    return pipe


def test_kohya_export_of_a_tiny_pipeline_keeps_the_text_encoder_half(tmp_path):
    pipe = adapted_tiny()
    path = export_lora(pipe, tmp_path / "k.safetensors", style="kohya")["path"]
    keys = load_file(path).keys()
    n_text = pipe.text_encoder.config.num_hidden_layers
    want = {f"lora_te_text_model_encoder_layers_{b}_{m.replace('.', '_')}.lora_down.weight"
            for b in range(n_text) for m in TEXT}
    assert want <= set(keys)
    assert not any(k.startswith("lora_te_encoder_") for k in keys)


def test_adapter_files_store_canonical_names(tmp_path):
    pipe = adapted_tiny()
    path = save_adapter(tmp_path / "a.safetensors", pipeline_components(pipe), "a")
    with safe_open(str(path), "pt") as fh:
        keys = list(fh.keys())
        meta = json.loads(fh.metadata()["ether_diffusion"])
    text_keys = [k for k in keys if k.startswith("text_encoder.")]
    assert text_keys and all(k.startswith("text_encoder.text_model.encoder.layers.") for k in text_keys)
    assert all(name.startswith("text_model.") for name in meta["components"]["text_encoder"]["layers"])


def _drop_text_model(path, out):
    """Rewrite an adapter file with the text-encoder layer names transformers 5 gives CLIPTextModel."""
    with safe_open(str(path), "pt") as fh:
        tensors = {k.replace("text_encoder.text_model.", "text_encoder."): fh.get_tensor(k) for k in fh.keys()}
        raw = fh.metadata()
    meta = json.loads(raw["ether_diffusion"])
    layers = meta["components"]["text_encoder"]["layers"]
    meta["components"]["text_encoder"]["layers"] = {k.removeprefix("text_model."): v for k, v in layers.items()}
    return write_adapter_tensors(out, tensors, meta)


@pytest.mark.parametrize("spelling", ["canonical", "without text_model"])
def test_files_in_either_spelling_load_to_the_same_model(tmp_path, spelling):
    pipe = adapted_tiny()
    ids = pipe.tokenizer(["a red circle"], return_tensors="pt").input_ids
    with torch.no_grad():
        want = pipe.text_encoder(ids)[0]
    path = save_adapter(tmp_path / "a.safetensors", pipeline_components(pipe), "a")
    if spelling != "canonical":  # as a file written by a release that stored transformers-5 module names
        path = _drop_text_model(path, tmp_path / "old.safetensors")
        with safe_open(str(path), "pt") as fh:
            assert any(k.startswith("text_encoder.encoder.layers.") for k in fh.keys())
    fresh = tiny_sd_pipeline()
    load_adapter(path, pipeline_components(fresh))
    with torch.no_grad():
        got = fresh.text_encoder(ids)[0]
    assert torch.allclose(got, want, atol=1e-6)
