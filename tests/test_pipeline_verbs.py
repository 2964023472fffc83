"""Pipeline-level verbs named after diffusers' LoRA verbs, on a tiny pipeline with adapter files."""

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from ether_diffusion import AdapterConfig, EtherError, add_adapter
from ether_diffusion.adapter_file import save_adapter
from ether_diffusion.inject import adapter_modules
from ether_diffusion.pipelines import (
    SCHEDULERS,
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
    schedulers_for,
    set_scheduler,
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


def test_set_scheduler_changes_the_solver_and_keeps_the_trained_noise_schedule():
    pipe = tiny_sd_pipeline()
    trained = pipe.scheduler
    for name in schedulers_for(pipe):
        cls = SCHEDULERS[name]
        set_scheduler(pipe, name)
        assert type(pipe.scheduler) is getattr(diffusers, cls)
        assert torch.equal(pipe.scheduler.alphas_cumprod, trained.alphas_cumprod)
        assert pipe.scheduler.config.prediction_type == trained.config.prediction_type
    before = pipe.scheduler
    with pytest.raises(EtherError, match="unknown scheduler 'k_lms'.*Euler a"):
        set_scheduler(pipe, "k_lms")
    with pytest.raises(EtherError, match="'FlowMatch Euler' does not fit this UNET base"):
        set_scheduler(pipe, "FlowMatch Euler")
    assert pipe.scheduler is before


def test_generate_command_samples_with_the_named_scheduler(tmp_path):
    from ether_diffusion.cli import main
    from ether_diffusion.pipelines import load_pipeline

    prompt = "a large red striped circle on a white background"
    assert main(["generate", "--prompt", prompt, "--out", str(tmp_path), "--steps", "3", "--scheduler", "Euler a"]) == 0
    written = np.asarray(Image.open(tmp_path / "0-0.png"))
    pipe = load_pipeline()  # the same sampling set up by hand with diffusers' own class
    pipe.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    assert np.array_equal(written, np.asarray(generate(pipe, prompt, seed=0, steps=3)[0]))
    default = np.asarray(generate(load_pipeline(), prompt, seed=0, steps=3)[0])
    assert not np.array_equal(written, default)
