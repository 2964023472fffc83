"""Injection into real diffusers / transformers models, parameter counts, per-sample routing, model-wide verbs."""

import pytest
import torch
from torch import nn

from ether_diffusion import (
    AdapterConfig,
    EtherError,
    add_adapter,
    count_parameters,
    delete_adapter,
    disable_adapters,
    enable_adapters,
    list_adapters,
    route_adapters,
    set_adapters,
    unload_adapters,
)
from ether_diffusion.inject import find_targets


def sd15_unet_on_meta():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(cross_attention_dim=768)


@pytest.mark.parametrize("method,expected", [("ether", 99_456), ("etherplus", 398_592)])
def test_sd15_parameter_counts_match_the_paper(method, expected):
    unet = sd15_unet_on_meta()
    layers = add_adapter(unet, "a", AdapterConfig(method=method, targets="attn"))
    assert len(layers) == 128
    assert count_parameters(unet) == expected
    assert sum(p.numel() for p in unet.parameters() if p.requires_grad) == expected


def test_only_the_newest_adapter_is_trainable():
    unet = sd15_unet_on_meta()
    add_adapter(unet, "subject", AdapterConfig(method="ether", targets="attn"))
    add_adapter(unet, "style", AdapterConfig(method="etherplus", targets="attn"))
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all(".style." in n for n in trainable)
    assert sum(p.numel() for n, p in unet.named_parameters() if n in trainable) == count_parameters(unet, "style")


def test_presets_on_unet_controlnet_and_clip(tiny_pipe):
    from diffusers import ControlNetModel

    unet, te = tiny_pipe.unet, tiny_pipe.text_encoder
    attn = find_targets(unet, "attn")
    ff = find_targets(unet, "attn+ff")
    assert attn and all(n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or n.endswith("to_out.0") for n in attn)
    assert set(attn) < set(ff) and any(n.endswith("ff.net.2") for n in ff)
    assert len(find_targets(te, "text")) == 4 * te.config.num_hidden_layers
    controlnet = ControlNetModel.from_unet(unet)
    assert len(find_targets(controlnet, "attn")) > 0
    assert find_targets(unet, r"attn2\.to_k") and all("attn2.to_k" in n for n in find_targets(unet, r"attn2\.to_k"))


def test_indivisible_layer_is_named_and_model_untouched():
    model = nn.Sequential()
    model.add_module("good", nn.Linear(64, 64))
    model.add_module("odd", nn.Linear(30, 64))
    with pytest.raises(EtherError, match=r"layer odd: input size 30 is not divisible by n_blocks=4"):
        add_adapter(model, "a", AdapterConfig(method="ether", n_blocks=4, targets="good,odd"))
    assert list_adapters(model) == [] and isinstance(model.good, nn.Linear)


def test_no_match_and_bad_regex_are_clear():
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(EtherError, match="select no Linear"):
        add_adapter(model, "a", AdapterConfig(targets="to_q"))
    with pytest.raises(EtherError, match="not a valid regular expression"):
        add_adapter(model, "a", AdapterConfig(targets="to_(q"))


def _randomise(model, name, seed):
    g = torch.Generator().manual_seed(seed)
    from ether_diffusion.inject import adapter_modules

    with torch.no_grad():
        for adapter in adapter_modules(model, name).values():
            for p in adapter.vectors.values():
                p.copy_(torch.randn(p.shape, generator=g))


def test_per_sample_routing_equals_each_adapter_alone(tiny_pipe):
    unet = tiny_pipe.unet
    for i, name in enumerate(["a", "b", "c"]):
        add_adapter(unet, name, AdapterConfig(method="etherplus", n_blocks=2))
        _randomise(unet, name, i)
    torch.manual_seed(0)
    x = torch.randn(4, 4, 8, 8)
    t = torch.tensor([10, 200, 500, 900])
    ctx = torch.randn(4, 8, unet.config.cross_attention_dim)
    plan, strengths = ["a", None, "c", "b"], [1.0, 1.0, 0.5, 2.0]
    with torch.no_grad(), route_adapters(unet, plan, strengths):
        routed = unet(x, t, ctx).sample
    for i, (name, s) in enumerate(zip(plan, strengths)):
        with torch.no_grad():
            if name is None:
                disable_adapters(unet)
            else:
                enable_adapters(unet)
                set_adapters(unet, name, s)
            alone = unet(x[i : i + 1], t[i : i + 1], ctx[i : i + 1]).sample
        torch.testing.assert_close(routed[i : i + 1], alone, atol=1e-5, rtol=1e-4)


def test_multiple_adapters_compose_delete_and_unload(tiny_pipe):
    unet = tiny_pipe.unet
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([100])
    ctx = torch.randn(1, 8, unet.config.cross_attention_dim)
    with torch.no_grad():
        base = unet(x, t, ctx).sample
    original = {k: v.clone() for k, v in unet.state_dict().items()}
    add_adapter(unet, "a", AdapterConfig(method="ether"))
    add_adapter(unet, "b", AdapterConfig(method="etherplus"))
    _randomise(unet, "b", 1)
    assert list_adapters(unet) == ["a", "b"]
    with pytest.raises(EtherError, match="unknown adapter"):
        set_adapters(unet, ["zzz"])
    set_adapters(unet, ["a", "b"], [1.0, 0.0])
    with torch.no_grad():
        only_a = unet(x, t, ctx).sample
        set_adapters(unet, "a")
        torch.testing.assert_close(unet(x, t, ctx).sample, only_a)
    delete_adapter(unet, "a")
    assert list_adapters(unet) == ["b"]
    unload_adapters(unet)
    assert list_adapters(unet) == []
    state = unet.state_dict()
    assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in state)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, ctx).sample, base)
