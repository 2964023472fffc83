"""Pipeline-level verbs named after diffusers' LoRA verbs, on a tiny pipeline with adapter files."""

import pytest
import torch

from ether_diffusion import AdapterConfig, EtherError, add_adapter
from ether_diffusion.adapter_file import save_adapter
from ether_diffusion.inject import adapter_modules
from ether_diffusion.pipelines import (
    adapter_file_info,
    delete_ether_adapters,
    disable_ether,
    enable_ether,
    fuse_ether,
    generate,
    get_list_ether_adapters,
    load_ether_weights,
    parse_adapter_arg,
    pipeline_components,
    set_ether_adapters,
    unfuse_ether,
    unload_ether_weights,
)
from ether_diffusion.testing import tiny_sd_pipeline


def make_file(path, seed, text=False):
    pipe = tiny_sd_pipeline()
    add_adapter(pipe.unet, "x", AdapterConfig(method="etherplus", n_blocks=2))
    if text:
        add_adapter(pipe.text_encoder, "x", AdapterConfig(method="ether", targets="text"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in pipeline_components(pipe).values():
            for adapter in adapter_modules(model, "x").values():
                for p in adapter.vectors.values():
                    p.copy_(torch.randn(p.shape, generator=g))
    return save_adapter(path, pipeline_components(pipe), "x", info={"instance_prompt": f"a sks{seed} circle"})


def pixels(pipe):
    return torch.from_numpy(pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                                 output_type="np").images)


def test_verbs(tmp_path):
    a, b = make_file(tmp_path / "a.safetensors", 1, text=True), make_file(tmp_path / "b.safetensors", 2)
    pipe = tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    base = pixels(pipe)
    assert load_ether_weights(pipe, a, adapter_name="dog") == "dog"
    load_ether_weights(pipe, b, adapter_name="cat")
    assert get_list_ether_adapters(pipe) == {"unet": ["dog", "cat"], "text_encoder": ["dog"]}
    assert adapter_file_info(pipe, "cat").metadata["instance_prompt"] == "a sks2 circle"
    both = pixels(pipe)
    assert not torch.allclose(both, base)
    set_ether_adapters(pipe, ["dog", "cat"], [0.0, 0.0])
    torch.testing.assert_close(pixels(pipe), base, atol=1e-5, rtol=0)
    set_ether_adapters(pipe, ["dog", "cat"], [1.0, 1.0])
    disable_ether(pipe)
    torch.testing.assert_close(pixels(pipe), base, atol=1e-5, rtol=0)
    enable_ether(pipe)
    fuse_ether(pipe)
    torch.testing.assert_close(pixels(pipe), both, atol=1e-4, rtol=0)
    with pytest.raises(EtherError, match="unmerge"):
        set_ether_adapters(pipe, ["dog"])
    unfuse_ether(pipe)
    with pytest.raises(EtherError, match="unknown adapter"):
        set_ether_adapters(pipe, ["bird"])
    delete_ether_adapters(pipe, "cat")
    assert get_list_ether_adapters(pipe) == {"unet": ["dog"], "text_encoder": ["dog"]}
    unload_ether_weights(pipe)
    assert get_list_ether_adapters(pipe) == {}
    torch.testing.assert_close(pixels(pipe), base, atol=1e-6, rtol=0)
    assert len(generate(pipe, "a red circle", steps=2, num_images=2)) == 2


def test_adapter_argument_parsing():
    assert parse_adapter_arg("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_adapter_arg("a.safetensors:0.5") == ("a.safetensors", 0.5)
    assert parse_adapter_arg("C:/x/a.safetensors", 0.7) == ("C:/x/a.safetensors", 0.7)
