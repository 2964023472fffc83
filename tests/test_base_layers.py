"""The adapted layer calls its base layer: accelerate's offload hooks, padded 1×1 convs and bitsandbytes'
quantised Linears work, other layer kinds are refused by name; casting never rounds the fp32 vectors; merge keeps
the original weight off the accelerator and unmerges bit for bit. References are dense fp64 matrices."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ether_diffusion import AdapterConfig, EtherError, add_adapter, merge_adapters, unmerge_adapters
from ether_diffusion.inject import ether_layers
from ether_diffusion.testing import randomise_vectors

from test_math import reference_H


def dense(layer, side):
    adapter = layer.ether_adapters["a"]
    vec, cfg = adapter.vectors, adapter.config
    return reference_H(vec[f"u_{side}"], vec.get(f"v_{side}"), cfg.n_blocks, cfg.method)


def test_padded_1x1_conv_keeps_its_output_shape_and_matches_the_dense_reference():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 1, padding=2, stride=2)
    model = nn.Sequential()
    model.add_module("proj", conv)
    add_adapter(model, "a", AdapterConfig(method="etherplus", sides="both", targets="proj"))
    randomise_vectors(model)
    x = torch.randn(2, 8, 7, 7)
    layer = model.proj
    w = dense(layer, "output") @ conv.weight.double().view(12, 8) @ dense(layer, "input")
    want = F.conv2d(x.double(), w.view(12, 8, 1, 1), conv.bias.double(), stride=2, padding=2)
    got = model(x)
    assert got.shape == want.shape == (2, 12, 6, 6)
    assert torch.allclose(got.double(), want, atol=1e-5)


def test_sequential_cpu_offload_hooks_load_base_weights_and_adapter_vectors():
    """accelerate's cpu_offload keeps every parameter on the meta device until its module runs."""
    from accelerate import cpu_offload

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 8))
    add_adapter(model, "a", AdapterConfig(method="etherplus", targets="0,2"))
    randomise_vectors(model)
    x = torch.randn(3, 16)
    want = model(x).detach()
    cpu_offload(model, execution_device=torch.device("cpu"))
    assert all(p.device.type == "meta" for p in model.parameters())  # nothing is resident between calls
    assert torch.allclose(model(x), want, atol=1e-6)


def test_diffusers_sequential_offload_on_a_tiny_pipeline():
    from ether_diffusion.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    add_adapter(pipe.unet, "a", AdapterConfig(method="etherplus", targets="attn"))
    add_adapter(pipe.text_encoder, "a", AdapterConfig(method="ether", targets="text"))
    randomise_vectors(pipe.unet)
    randomise_vectors(pipe.text_encoder, seed=1)
    kwargs = dict(num_inference_steps=2, height=32, width=32, output_type="np")
    want = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    from accelerate import cpu_offload

    for model in (pipe.unet, pipe.text_encoder, pipe.vae):  # what enable_sequential_cpu_offload does, on CPU
        cpu_offload(model, execution_device=torch.device("cpu"))
    got = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert abs(got - want).max() < 1e-5


def test_bitsandbytes_int8_linear_runs_through_its_own_forward_and_refuses_merging():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    q = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False)
    q.load_state_dict(lin.state_dict())
    model = nn.Sequential()
    model.add_module("proj", q.to("cpu"))  # quantises the weight to int8
    assert model.proj.weight.dtype == torch.int8
    add_adapter(model, "a", AdapterConfig(method="etherplus", sides="both", targets="proj"))
    randomise_vectors(model)
    layer = model.proj
    x = torch.randn(5, 64)
    h_in, h_out = dense(layer, "input").float(), dense(layer, "output").float()
    base_out = layer.base(x @ h_in.T)  # the quantised layer's own output on the transformed input
    want = (base_out - lin.bias) @ h_out.T + lin.bias
    assert torch.allclose(model(x), want, atol=1e-4)
    unquantised = (x @ h_in.T @ lin.weight.T) @ h_out.T + lin.bias  # and it is the adapted layer, up to int8 error
    assert (model(x) - unquantised).abs().max() < 0.1
    with pytest.raises(EtherError, match="quantised"):
        merge_adapters(model)


def test_bitsandbytes_4bit_linear_is_adapted_too():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    q = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32)
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")
    q.bias = nn.Parameter(lin.bias.data.clone())
    model = nn.Sequential()
    model.add_module("proj", q.to("cpu"))
    add_adapter(model, "a", AdapterConfig(method="ether", sides="input", targets="proj"))
    randomise_vectors(model)
    x = torch.randn(5, 64)
    want = model.proj.base(x @ dense(model.proj, "input").float().T)
    assert torch.allclose(model(x), want, atol=1e-5)


class ScaledLinear(nn.Linear):
    """A Linear subclass whose forward is not x ↦ Wx + b: ETHER must not guess at it."""

    def forward(self, x):
        return 2 * super().forward(x)


@pytest.mark.parametrize("module", [ScaledLinear(8, 8), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 1, groups=2)])
def test_other_layer_kinds_are_refused_with_the_layer_name(module):
    model = nn.Sequential()
    model.add_module("odd_layer", module)
    with pytest.raises(EtherError, match="odd_layer"):
        add_adapter(model, "a", AdapterConfig(method="ether", targets="odd_layer"))
    assert not list(ether_layers(model))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_casting_the_model_never_rounds_the_fp32_vectors(dtype):
    model = nn.Sequential(nn.Linear(40, 40))
    add_adapter(model, "a", AdapterConfig(method="etherplus", targets="0"))
    randomise_vectors(model)
    before = {k: v.detach().clone() for k, v in model.named_parameters() if "ether_adapters" in k}
    assert all(v.dtype == torch.float32 for v in before.values())
    for cast in (lambda m: m.to(dtype), lambda m: m.half() if dtype == torch.float16 else m.bfloat16(),
                 lambda m: m.to("cpu", dtype)):
        cast(model)
        for k, v in model.named_parameters():
            if k in before:
                assert v.dtype == torch.float32 and torch.equal(v, before[k]), k  # bit for bit
            else:
                assert v.dtype == dtype
        model.float()
    model.double()  # widening is lossless and allowed
    assert all(v.dtype == torch.float64 for k, v in model.named_parameters() if k in before)


def test_merge_keeps_the_original_weight_in_cpu_memory_and_unmerges_bit_for_bit():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16))
    add_adapter(model, "a", AdapterConfig(method="etherplus", targets="0"))
    randomise_vectors(model)
    original = model[0].base.weight.detach().clone()
    merge_adapters(model)
    assert model[0]._original_weight.device.type == "cpu"
    assert not torch.equal(model[0].base.weight, original)
    unmerge_adapters(model)
    assert torch.equal(model[0].base.weight, original)
