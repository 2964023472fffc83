"""Adapter files: bit-exact round trip, and every malformed-file case refused with its documented message."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ether_diffusion import AdapterConfig, AdapterFileError, add_adapter, list_adapters
from ether_diffusion.adapter_file import describe, load_adapter, read_adapter_file, save_adapter
from ether_diffusion.inject import adapter_modules
from ether_diffusion.testing import tiny_sd_pipeline, write_adapter_tensors


@pytest.fixture
def saved(tmp_path, tiny_pipe):
    add_adapter(tiny_pipe.unet, "subj", AdapterConfig(method="etherplus", n_blocks=4))
    add_adapter(tiny_pipe.text_encoder, "subj", AdapterConfig(method="ether", targets="text"))
    with torch.no_grad():
        for model in (tiny_pipe.unet, tiny_pipe.text_encoder):
            for adapter in adapter_modules(model, "subj").values():
                for p in adapter.vectors.values():
                    p.add_(torch.randn_like(p))
    path = save_adapter(tmp_path / "a.safetensors", {"unet": tiny_pipe.unet, "text_encoder": tiny_pipe.text_encoder},
                        "subj", info={"instance_prompt": "a sks circle"})
    return path, tiny_pipe


def components(pipe):
    return {"unet": pipe.unet, "text_encoder": pipe.text_encoder}


def test_round_trip_is_bit_exact(saved):
    path, pipe = saved
    fresh = tiny_sd_pipeline()
    name, parsed = load_adapter(path, components(fresh))
    assert name == "subj" and parsed.metadata["instance_prompt"] == "a sks circle"
    for comp in ("unet", "text_encoder"):
        a, b = adapter_modules(getattr(pipe, comp), "subj"), adapter_modules(getattr(fresh, comp), "subj")
        assert a.keys() == b.keys()
        for layer in a:
            for vec in a[layer].vectors:
                assert torch.equal(a[layer].vectors[vec], b[layer].vectors[vec])
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([3])
    ctx = torch.randn(1, 8, 32)
    with torch.no_grad():
        assert torch.equal(pipe.unet(x, t, ctx).sample, fresh.unet(x, t, ctx).sample)
    text = describe(parsed)
    assert "method=etherplus n_blocks=4" in text and "instance_prompt: a sks circle" in text


def _rewrite(path, out, tensors=None, meta_edit=None):
    tensors = dict(load_file(path)) if tensors is None else tensors
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        inner = json.loads(fh.metadata()["ether_diffusion"])
    if meta_edit:
        meta_edit(inner)
    return write_adapter_tensors(out, tensors, inner)


def test_truncated_file(saved, tmp_path):
    path, _ = saved
    bad = tmp_path / "trunc.safetensors"
    bad.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(AdapterFileError, match="not a readable safetensors file"):
        read_adapter_file(bad)


def test_not_safetensors(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"\x80\x04pickle-ish garbage")
    with pytest.raises(AdapterFileError, match="not a readable safetensors file"):
        read_adapter_file(bad)
    with pytest.raises(AdapterFileError, match="not found"):
        read_adapter_file(tmp_path / "missing.safetensors")


def test_plain_safetensors_without_metadata(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, plain)
    with pytest.raises(AdapterFileError, match="not an ether-diffusion adapter"):
        read_adapter_file(plain)


def test_unknown_version(saved, tmp_path):
    path, _ = saved
    bad = _rewrite(path, tmp_path / "v9.safetensors", meta_edit=lambda m: m.update(format_version=9))
    with pytest.raises(AdapterFileError, match="format version 9 is not supported"):
        read_adapter_file(bad)


def test_non_finite_values(saved, tmp_path):
    path, _ = saved
    tensors = dict(load_file(path))
    key = sorted(tensors)[0]
    tensors[key][0] = float("nan")
    with pytest.raises(AdapterFileError, match=f"tensor {key} contains NaN"):
        read_adapter_file(_rewrite(path, tmp_path / "nan.safetensors", tensors=tensors))


def test_missing_tensor_and_wrong_shape(saved, tmp_path):
    path, _ = saved
    tensors = dict(load_file(path))
    key = sorted(tensors)[0]
    del tensors[key]
    with pytest.raises(AdapterFileError, match="tensors do not match the metadata; missing"):
        read_adapter_file(_rewrite(path, tmp_path / "missing.safetensors", tensors=tensors))
    tensors = dict(load_file(path))
    tensors[key] = torch.zeros(3)
    with pytest.raises(AdapterFileError, match="has shape"):
        read_adapter_file(_rewrite(path, tmp_path / "shape.safetensors", tensors=tensors))


def test_other_base_refused_and_model_unchanged(saved):
    path, _ = saved
    from diffusers import UNet2DConditionModel

    other = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=48,
                                 attention_head_dim=4)
    fresh = tiny_sd_pipeline()
    with pytest.raises(AdapterFileError, match="made for another base model"):
        load_adapter(path, {"unet": other, "text_encoder": fresh.text_encoder})
    assert list_adapters(fresh.text_encoder) == [] and list_adapters(other) == []
    with pytest.raises(AdapterFileError, match="has a 'text_encoder' part"):
        load_adapter(path, {"unet": fresh.unet})


def test_weight_hash_mismatch_only_warns(saved):
    path, _ = saved
    other_weights = tiny_sd_pipeline(seed=5)
    with pytest.warns(UserWarning, match="base weights differ"):
        load_adapter(path, components(other_weights))
