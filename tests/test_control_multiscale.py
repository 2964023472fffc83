"""Multiscale control injection (features at every down block, T2I-Adapter's entry points): no effect before
training, the same UNet output as diffusers' own `down_intrablock_additional_residuals` path on SD- and
SDXL-shaped UNets, the adapter file round trip and its refusal of another base, and the exported encoder file."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ether_diffusion.adapter_file import AdapterFileError, save_adapter
from ether_diffusion.control import (
    MultiScaleControlEncoder,
    attach_control,
    build_encoder,
    control_image,
    enable_control,
    encoder_config,
)
from ether_diffusion.errors import EtherError
from ether_diffusion.export import export_control_encoders
from ether_diffusion.pipelines import generate, load_ether_weights, set_ether_adapters
from ether_diffusion.testing import tiny_sd_pipeline, tiny_sdxl_pipeline
from ether_diffusion.toyworld import world

HINT = world.render_segmentation(world.Scene("square", ("red",), "white", "large", 20.0, 40.0, 14.0))
ARGS = dict(seed=3, steps=3, guidance=5.0)


def _multiscale(pipe, seed: int | None = 1) -> tuple[dict, MultiScaleControlEncoder]:
    """A multiscale encoder for `pipe`'s UNet, its zero projections randomised when `seed` is given."""
    config = encoder_config(pipe.unet, pipe.vae_scale_factor, "multiscale")
    encoder = build_encoder(config)
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in encoder.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return config, encoder


def _same(a, b) -> bool:
    return all(torch.equal(torch.tensor(list(x.getdata())), torch.tensor(list(y.getdata()))) for x, y in zip(a, b))


def test_untrained_multiscale_encoder_leaves_the_base_model_unchanged():
    pipe = tiny_sd_pipeline()
    base = generate(pipe, "a red square", **ARGS)
    attach_control(pipe.unet, "ctl", _multiscale(pipe, seed=None)[1], "segmentation")
    assert _same(generate(pipe, "a red square", control_image=HINT, **ARGS), base)


@pytest.mark.parametrize("make_pipe", [tiny_sd_pipeline, tiny_sdxl_pipeline], ids=["sd", "sdxl"])
def test_hook_gives_what_diffusers_own_adapter_residuals_give(make_pipe):
    """SD puts a cross-attention block first, SDXL a plain one: the residuals' sizes differ per layout and
    diffusers' UNet itself consumes them (a wrong size fails there)."""
    pipe = make_pipe()
    unet = pipe.unet
    _, encoder = _multiscale(pipe)
    attach_control(unet, "ctl", encoder, "segmentation")
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    timestep = torch.tensor([500, 500])
    hidden = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    extra = {}
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(2, pooled, generator=g),
                                      "time_ids": torch.randn(2, 6, generator=g)}
    image = torch.rand(1, 3, 32, 32, generator=g)
    with torch.no_grad():
        base = unet(sample, timestep, hidden, **extra).sample
        with control_image(unet, image, scale=0.7):
            hooked = unet(sample, timestep, encoder_hidden_states=hidden, **extra).sample
        enable_control(unet, False)
        residuals = [0.7 * f for f in encoder(image.repeat(2, 1, 1, 1))]
        reference = unet(sample, timestep, hidden, down_intrablock_additional_residuals=residuals, **extra).sample
    assert (hooked - base).abs().max() > 1e-4
    torch.testing.assert_close(hooked, reference, atol=1e-6, rtol=0)


def test_a_control_image_of_another_size_is_refused_in_one_line():
    pipe = tiny_sd_pipeline()
    attach_control(pipe.unet, "ctl", _multiscale(pipe)[1], "segmentation")
    with torch.no_grad(), control_image(pipe.unet, torch.rand(1, 3, 64, 64)):
        with pytest.raises(EtherError, match=r"control image gives \(16, 16\) features for \(8, 8\) latents"):
            pipe.unet(torch.randn(1, 4, 8, 8), torch.tensor([1]), torch.randn(1, 77, pipe.unet.config.cross_attention_dim))


def test_adapter_file_round_trip_and_refusal_of_another_layout(tmp_path):
    pipe = tiny_sd_pipeline()
    config, encoder = _multiscale(pipe)
    attach_control(pipe.unet, "ctl", encoder, "segmentation")
    expected = generate(pipe, "a red square", control_image=HINT, **ARGS)
    path = save_adapter(tmp_path / "ms.safetensors", {"unet": pipe.unet}, "ctl", control=("segmentation", config, encoder))

    fresh = tiny_sd_pipeline()
    load_ether_weights(fresh, path)
    assert _same(generate(fresh, "a red square", control_image=HINT, **ARGS), expected)

    wrong = {**config, "level_factors": [1, 1]}
    bad = save_adapter(tmp_path / "bad.safetensors", {"unet": pipe.unet}, "ctl",
                       control=("segmentation", wrong, build_encoder(wrong)))
    with pytest.raises(AdapterFileError, match="multiscale control encoder feeds down blocks"):
        load_ether_weights(tiny_sd_pipeline(), bad)


def test_export_writes_the_multiscale_encoder_with_its_strength_baked_in(tmp_path):
    pipe = tiny_sd_pipeline()
    config, encoder = _multiscale(pipe)
    path = save_adapter(tmp_path / "ms.safetensors", {"unet": pipe.unet}, "ctl", control=("segmentation", config, encoder))
    target = tiny_sd_pipeline()
    load_ether_weights(target, path)
    set_ether_adapters(target, ["ctl"], [0.5])
    (written,) = export_control_encoders(target, tmp_path / "out.safetensors")
    with safe_open(str(written), "pt") as fh:
        meta = fh.metadata()
    assert meta["class"] == "ether_diffusion.control.MultiScaleControlEncoder"
    assert "down_intrablock_additional_residuals" in meta["usage"]
    rebuilt = build_encoder(json.loads(meta["config"]))
    rebuilt.load_state_dict(load_file(written))
    image = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        for got, want in zip(rebuilt(image), encoder(image)):
            torch.testing.assert_close(got, 0.5 * want, atol=1e-6, rtol=1e-5)
