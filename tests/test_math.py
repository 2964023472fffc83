"""The layer against dense fp64 matrices written straight from the paper's formulas."""

import itertools

import pytest
import torch
from torch import nn

from ether_diffusion import AdapterConfig, add_adapter, merge_adapters, set_adapters, unmerge_adapters
from ether_diffusion.layers import EtherLayer

IN, OUT = 96, 40


def reference_block_matrix(vec: torch.Tensor, n: int) -> list[torch.Tensor]:
    """Unit vectors of the n contiguous chunks, each normalised on its own (the paper's block-diagonal)."""
    chunks = vec.double().chunk(n)
    return [c / c.norm() for c in chunks]


def reference_H(u: torch.Tensor, v: torch.Tensor | None, n: int, method: str, s: float = 1.0) -> torch.Tensor:
    blocks = []
    for i, uh in enumerate(reference_block_matrix(u, n)):
        k = uh.numel()
        if method == "ether":
            H = torch.eye(k, dtype=torch.float64) - 2 * torch.outer(uh, uh)
        else:
            vh = reference_block_matrix(v, n)[i]
            H = torch.eye(k, dtype=torch.float64) - torch.outer(uh, uh) + torch.outer(vh, vh)
        blocks.append(torch.eye(k, dtype=torch.float64) + s * (H - torch.eye(k, dtype=torch.float64)))
    return torch.block_diag(*blocks)


def make_layer(method, sides, n, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(IN, OUT, bias=bias)
    model = nn.Sequential()
    model.add_module("proj", lin)
    add_adapter(model, "a", AdapterConfig(method=method, n_blocks=n, sides=sides, targets="proj"))
    layer = model.proj
    with torch.no_grad():  # move away from the identity init of ETHER+
        for p in layer.ether_adapters["a"].vectors.values():
            p.copy_(torch.randn_like(p))
    return model, layer, lin


def reference_output(layer: EtherLayer, x: torch.Tensor, s: float = 1.0) -> torch.Tensor:
    adapter = layer.ether_adapters["a"]
    cfg, vec = adapter.config, adapter.vectors
    W = layer.base.weight.double().reshape(layer.base.weight.shape[0], -1)
    if "input" in cfg.side_list:
        W = W @ reference_H(vec["u_input"], vec["v_input"] if "v_input" in vec else None, cfg.n_blocks, cfg.method, s)
    if "output" in cfg.side_list:
        W = reference_H(vec["u_output"], vec["v_output"] if "v_output" in vec else None, cfg.n_blocks, cfg.method, s) @ W
    y = x.double() @ W.T
    return y + layer.base.bias.double() if layer.base.bias is not None else y


CASES = list(itertools.product(["ether", "etherplus"], ["input", "output", "both"], [1, 4, 8], [True, False]))


@pytest.mark.parametrize("method,sides,n,bias", CASES)
def test_forward_matches_dense_reference(method, sides, n, bias):
    model, layer, _ = make_layer(method, sides, n, bias)
    x = torch.randn(3, 5, IN)
    torch.testing.assert_close(model(x).double(), reference_output(layer, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method,sides,n", [("ether", "both", 4), ("etherplus", "both", 8)])
@pytest.mark.parametrize("strength", [0.0, 0.5, 2.0])
def test_strength_scales_H_minus_I(method, sides, n, strength):
    model, layer, _ = make_layer(method, sides, n)
    set_adapters(model, "a", strength)
    x = torch.randn(7, IN)
    torch.testing.assert_close(model(x).double(), reference_output(layer, x, strength), atol=1e-5, rtol=1e-5)
    if strength == 0.0:
        torch.testing.assert_close(model(x), layer.base(x))


@pytest.mark.parametrize("n", [1, 4, 8])
def test_ether_is_a_reflection(n):
    u = torch.randn(IN)
    H = reference_H(u, None, n, "ether")
    torch.testing.assert_close(H @ H.T, torch.eye(IN, dtype=torch.float64))
    assert torch.linalg.det(H).item() == pytest.approx((-1) ** n)  # one reflection per block
    assert torch.linalg.matrix_norm(H - torch.eye(IN, dtype=torch.float64)).item() == pytest.approx(2 * n**0.5)
    # and the layer's transform equals it
    from ether_diffusion.ether import METHOD_SPECS, dense_transform, unit_blocks

    torch.testing.assert_close(dense_transform(unit_blocks(u.double(), n), None, METHOD_SPECS["ether"]), H)


def test_etherplus_starts_at_identity_and_ether_does_not():
    torch.manual_seed(0)
    x = torch.randn(4, IN)
    for method, expect_identity in (("etherplus", True), ("ether", False)):
        lin = nn.Linear(IN, OUT)
        model = nn.Sequential()
        model.add_module("proj", lin)
        reference = lin(x)
        add_adapter(model, "a", AdapterConfig(method=method, targets="proj"))
        same = torch.allclose(model(x), reference, atol=1e-6)
        assert same == expect_identity


@pytest.mark.parametrize("method,sides,n", [("ether", "input", 4), ("etherplus", "both", 8), ("ether", "output", 1)])
def test_merge_equals_unmerged_and_unmerge_restores(method, sides, n):
    model, layer, lin = make_layer(method, sides, n)
    original = lin.weight.detach().clone()
    x = torch.randn(6, IN)
    expected = model(x)
    merge_adapters(model)
    assert not torch.equal(lin.weight, original)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    unmerge_adapters(model)
    assert torch.equal(lin.weight, original)


def test_conv1x1_matches_linear():
    torch.manual_seed(0)
    conv = nn.Conv2d(IN, OUT, 1)
    model = nn.Sequential()
    model.add_module("proj_in", conv)
    add_adapter(model, "a", AdapterConfig(method="etherplus", n_blocks=4, targets="proj_in"))
    layer = model.proj_in
    with torch.no_grad():
        for p in layer.ether_adapters["a"].vectors.values():
            p.copy_(torch.randn_like(p))
    x = torch.randn(2, IN, 3, 5)
    tokens = x.permute(0, 2, 3, 1).reshape(-1, IN)
    ref = reference_output(layer, tokens).reshape(2, 3, 5, OUT).permute(0, 3, 1, 2)
    torch.testing.assert_close(model(x).double(), ref, atol=1e-5, rtol=1e-5)


def test_gradients_reach_only_adapter_vectors_and_training_reduces_loss():
    torch.manual_seed(0)
    teacher = nn.Linear(IN, OUT)
    target_H = reference_H(torch.randn(IN), None, 1, "ether").float()
    x = torch.randn(256, IN)
    with torch.no_grad():
        y = teacher(x @ target_H.T)
    model = nn.Sequential()
    model.add_module("proj", teacher)
    add_adapter(model, "a", AdapterConfig(method="ether", targets="proj"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["proj.ether_adapters.a.u_input"]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(150):
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert teacher.weight.grad is None
    assert losses[-1] < 0.1 * losses[0]


def test_half_precision_base_keeps_fp32_vectors():
    model, layer, _ = make_layer("etherplus", "both", 4)
    model.to(torch.bfloat16)
    assert layer.base.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in layer.ether_adapters["a"].parameters())
    x = torch.randn(3, IN)
    y = model(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), reference_output(layer, x.bfloat16().double()), atol=0.15, rtol=0.05)


class LargestNewTensor:
    """Records the largest tensor any aten op produces (forward and backward), skipping views of the
    parameters: a dense (d × d) transform anywhere in the hot path shows up as a d²-element result."""

    def __init__(self, model):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        owned = {p.untyped_storage().data_ptr() for p in model.parameters()}
        record = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in owned:
                        record.largest = max(record.largest, t.numel())
                return out

        self.largest = 0
        self.mode = Mode()


@pytest.mark.parametrize("method,sides,n", [("etherplus", "both", 1), ("etherplus", "both", 4), ("ether", "input", 1),
                                            ("ether", "output", 8)])
def test_forward_and_backward_never_build_a_dense_matrix(method, sides, n):
    """O(d) per token: with d = 512 and 4 tokens, every intermediate stays far below d² = 262,144 elements."""
    torch.manual_seed(0)
    d, tokens = 512, 4
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(d, d))
    add_adapter(model, "a", AdapterConfig(method=method, n_blocks=n, sides=sides, targets="proj"))
    watch = LargestNewTensor(model)
    with watch.mode:
        model(torch.randn(tokens, d, requires_grad=True)).sum().backward()
    assert watch.largest < d * d // 8, watch.largest
    # the test can fail: the same layer computed through a dense H trips it
    dense = LargestNewTensor(model)
    with dense.mode:
        h = torch.eye(d) - torch.outer(torch.ones(d), torch.ones(d)) / d
        (torch.randn(tokens, d) @ h).sum()
    assert dense.largest >= d * d


def test_strength_meaning_differs_by_method_and_the_sweep_avoids_singular_ether_strengths():
    from ether_diffusion.ether import SWEEP_STRENGTHS

    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(16, generator=g), torch.randn(16, generator=g)
    assert abs(torch.linalg.det(reference_H(u, None, 1, "ether", 0.5))) < 1e-12  # a projection
    for s in SWEEP_STRENGTHS["ether"]:
        eig = torch.linalg.eigvalsh(reference_H(u, None, 1, "ether", s))
        assert eig.abs().min() >= 0.39, s  # the reflected direction is scaled by 1 − 2s, never near 0
    for s in SWEEP_STRENGTHS["etherplus"]:
        if s < 1:
            assert torch.linalg.svdvals(reference_H(u, v, 1, "etherplus", s)).min() > 1e-3, s


# -- the training fast path (fused.py): the adapter as a low-rank update, factors and application as two autograd functions

GRAD_CASES = list(itertools.product(["ether", "etherplus"], ["input", "output", "both"], [1, 4], [1.0, 0.6]))
WIDE_IN, WIDE_OUT = 256, 160  # wide enough that ETHER+ n = 4 on both sides (rank 16) takes the low-rank path


def _wide_layer(method, sides, n, strength, bias=True, dtype=torch.float64, d_out=WIDE_OUT, d_in=WIDE_IN):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(d_in, d_out, bias=bias))
    add_adapter(model, "a", AdapterConfig(method=method, n_blocks=n, sides=sides, targets="proj"))
    with torch.no_grad():
        for p in model.proj.ether_adapters["a"].vectors.values():
            p.copy_(torch.randn_like(p))
    model.to(dtype)
    model.proj.set_active({"a": strength})
    return model, model.proj


@pytest.mark.parametrize("method,sides,n,strength", GRAD_CASES)
@pytest.mark.parametrize("OUT_DIM", [16, 24], ids=["wide-to-narrow", "square"])
def test_low_rank_gradients_pass_gradcheck(method, sides, n, strength, OUT_DIM):
    """Analytic gradients of the low-rank function against finite differences, for input and every vector
    (a square layer normalises both sides' vectors together, so both shapes are checked)."""
    from ether_diffusion.ether import METHOD_SPECS
    from ether_diffusion.fused import low_rank_linear

    torch.manual_seed(0)
    base = nn.Linear(24, OUT_DIM).double().requires_grad_(False)
    spec = METHOD_SPECS[method]
    kinds = 1 + spec.has_v
    vectors_in = [torch.randn(24, dtype=torch.float64, requires_grad=True) for _ in range(kinds)] \
        if sides != "output" else []
    vectors_out = [torch.randn(OUT_DIM, dtype=torch.float64, requires_grad=True) for _ in range(kinds)] \
        if sides != "input" else []

    def run(x, *vecs):
        return low_rank_linear(x, base, spec, strength, n, list(vecs[:len(vectors_in)]), list(vecs[len(vectors_in):]))

    x = torch.randn(2, 3, 24, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(run, (x, *vectors_in, *vectors_out))


@pytest.mark.parametrize("method,sides,n,strength", GRAD_CASES)
@pytest.mark.parametrize("d_out", [WIDE_OUT, WIDE_IN])
def test_low_rank_training_path_matches_dense_reference_gradients(method, sides, n, strength, d_out):
    """The layer as training runs it (the low-rank function) against autograd through the dense fp64 H matrices."""
    model, layer = _wide_layer(method, sides, n, strength, bias=(n == 1), d_out=d_out)
    x = torch.randn(4, 40, WIDE_IN, dtype=torch.float64, requires_grad=True)
    out = model(x)
    assert type(out.grad_fn).__name__ == "ViewBackward0"
    assert type(out.grad_fn.next_functions[0][0]).__name__ == "_LowRankApplyBackward"  # the fast path really ran
    upstream = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, *layer.ether_adapters["a"].vectors.values()], upstream)

    vectors = {k: v.detach().clone().requires_grad_(True) for k, v in layer.ether_adapters["a"].vectors.items()}
    W = layer.base.weight.double()
    if "u_input" in vectors:
        W = W @ reference_H(vectors["u_input"], vectors.get("v_input"), n, method, strength)
    if "u_output" in vectors:
        W = reference_H(vectors["u_output"], vectors.get("v_output"), n, method, strength) @ W
    x_ref = x.detach().clone().requires_grad_(True)
    ref = x_ref @ W.T + (layer.base.bias if layer.base.bias is not None else 0)
    torch.testing.assert_close(out, ref)
    want = torch.autograd.grad(ref, [x_ref, *vectors.values()], upstream)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_few_tokens_take_the_applied_transforms_with_the_same_gradients():
    """With few tokens for the layer's size, building A and L would cost more than it saves: the layer applies
    the transforms instead, and both paths give the same output and gradients."""
    model, layer = _wide_layer("etherplus", "both", 1, 0.8, d_in=512, d_out=384)
    vectors = list(layer.ether_adapters["a"].parameters())
    x = torch.randn(200, 512, dtype=torch.float64)
    many, few = model(x), model(x[:4])
    assert type(many.grad_fn.next_functions[0][0]).__name__ == "_LowRankApplyBackward"
    assert "LowRank" not in type(few.grad_fn).__name__ + type(few.grad_fn.next_functions[0][0]).__name__
    torch.testing.assert_close(many[:4], few)
    for g_many, g_few in zip(torch.autograd.grad(many[:4].square().sum(), vectors),
                             torch.autograd.grad(few.square().sum(), vectors)):
        torch.testing.assert_close(g_many, g_few)


def test_routed_batch_gradients_pass_gradcheck():
    """Per-sample routing with per-sample strengths (the general path) keeps exact gradients for the input and the
    vectors of both routed adapters."""
    from torch.func import functional_call

    from ether_diffusion import route_adapters

    model, layer = _wide_layer("etherplus", "both", 4, 1.0)
    add_adapter(model, "b", AdapterConfig(method="etherplus", n_blocks=4, targets="proj"))
    model.double()
    torch.manual_seed(1)
    names = ["proj.ether_adapters.a.u_input", "proj.ether_adapters.a.v_output", "proj.ether_adapters.b.u_output"]
    leaves = [torch.randn_like(model.get_parameter(name)).requires_grad_(True) for name in names]
    x = torch.randn(3, 2, WIDE_IN, dtype=torch.float64, requires_grad=True)

    def run(x, *vecs):
        with route_adapters(model, ["a", None, "b"], strengths=[0.5, 1.0, 0.8]):
            return functional_call(model, dict(zip(names, vecs)), (x,))

    assert torch.autograd.gradcheck(run, (x, *leaves))


def test_low_rank_path_keeps_no_output_sized_tensor_for_backward(monkeypatch):
    """ETHER+ on both sides saves the layer input and thin (tokens × 2n) products, not the (tokens × out) output
    that the general path keeps for the output-side vectors (the test fails on that path)."""
    from ether_diffusion.layers import EtherLayer

    tokens, d_in, d_out = 64, 32, 96
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(d_in, d_out))
    model.requires_grad_(False)
    add_adapter(model, "a", AdapterConfig(method="etherplus", sides="both", targets="proj"))
    x = torch.randn(tokens, d_in, requires_grad=True)

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved_sizes() -> list[int]:  # tensors kept for backward, other than the weights themselves
        sizes = []

        def keep(t):
            if t.untyped_storage().data_ptr() not in weights:
                sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            model(x).sum().backward()
        return sizes

    assert max(saved_sizes()) <= tokens * d_in
    monkeypatch.setattr(EtherLayer, "_low_rank_plan", lambda self, tokens: None)
    assert max(saved_sizes()) >= tokens * d_out


def test_low_rank_path_in_bf16_keeps_fp32_vector_gradients():
    model, layer = _wide_layer("etherplus", "both", 4, 1.0, dtype=torch.float32)
    model.to(torch.bfloat16)
    x = torch.randn(160, WIDE_IN, dtype=torch.bfloat16, requires_grad=True)
    out = model(x)
    assert out.dtype == torch.bfloat16
    assert type(out.grad_fn.next_functions[0][0]).__name__ == "_LowRankApplyBackward"
    out.float().square().sum().backward()
    grads = [p.grad for p in layer.ether_adapters["a"].parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert x.grad.dtype == torch.bfloat16


def test_low_rank_path_under_autocast_matches_the_general_path(monkeypatch):
    """Mixed-precision training (fp32 weights, bf16 autocast, as accelerate runs it): same output and gradients
    as the applied transforms, within bf16 precision, and fp32 gradients for the fp32 vectors."""
    from ether_diffusion.layers import EtherLayer

    model, layer = _wide_layer("etherplus", "both", 4, 1.0, dtype=torch.float32)
    vectors = list(layer.ether_adapters["a"].parameters())
    x = torch.randn(160, WIDE_IN, requires_grad=True)

    def run():
        for p in [*vectors, x]:
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().square().sum().backward()
        return out, [p.grad for p in vectors] + [x.grad]

    fast_out, fast_grads = run()
    assert fast_out.dtype == torch.bfloat16
    assert type(fast_out.grad_fn.next_functions[0][0]).__name__ == "_LowRankApplyBackward"
    assert all(g.dtype == torch.float32 for g in fast_grads)
    monkeypatch.setattr(EtherLayer, "_low_rank_plan", lambda self, tokens: None)
    general_out, general_grads = run()
    for got, want in zip([fast_out, *fast_grads], [general_out, *general_grads]):
        assert (got.float() - want.float()).norm() <= 0.05 * want.float().norm()


# -- small layers of one shape build their factors together, before the forward (low_rank_groups.py) -------------

class _Branches(nn.Module):
    """Two square layers (one group), two wide ones (another group) and a lone one (builds its own)."""

    def __init__(self):
        super().__init__()
        self.sq0, self.sq1 = nn.Linear(64, 64), nn.Linear(64, 64)
        self.wide0, self.wide1 = nn.Linear(64, 96), nn.Linear(64, 96)
        self.lone = nn.Linear(96, 64)

    def forward(self, x):
        h = self.sq1(self.sq0(x))
        return self.lone(self.wide0(h) * torch.tanh(self.wide1(h)))


def _branches(method, sides, n, strength=0.7):
    torch.manual_seed(0)
    model = _Branches().double()
    add_adapter(model, "a", AdapterConfig(method=method, n_blocks=n, sides=sides, targets="sq0|sq1|wide0|wide1|lone"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p))
    set_adapters(model, "a", strength)
    return model


@pytest.mark.parametrize("method,sides,n", [("etherplus", "both", 1), ("etherplus", "both", 2), ("ether", "input", 2),
                                            ("etherplus", "output", 1)])
def test_grouped_factors_match_dense_reference_over_two_forwards(method, sides, n):
    """Layers of one shape take factors built together; outputs and gradients (input, every vector) equal autograd
    through the dense fp64 H matrices, also when two forwards feed one backward (gradient accumulation)."""
    from torch.func import functional_call

    model = _branches(method, sides, n)
    grouped = []
    for name in ("sq0", "sq1", "wide0", "wide1", "lone"):
        getattr(model, name).register_forward_pre_hook(
            lambda layer, args, name=name: grouped.append(name) if layer.low_rank_factors is not None else None)
    xs = [torch.randn(2, 40, 64, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    upstream = [torch.randn(2, 40, 64, dtype=torch.float64) for _ in range(2)]
    outs = [model(x) for x in xs]
    assert grouped == ["sq0", "sq1", "wide0", "wide1"] * 2  # the lone layer built its own
    assert all(layer.low_rank_factors is None for layer in model.modules() if isinstance(layer, EtherLayer))
    vectors = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(outs, [*xs, *vectors], upstream)

    plain, weights = _Branches().double(), {}
    leaves = {name: p.detach().clone().requires_grad_(True) for name, p in model.named_parameters() if p.requires_grad}
    for name in ("sq0", "sq1", "wide0", "wide1", "lone"):
        layer = getattr(model, name)
        vec = {k.rsplit(".", 1)[-1]: v for k, v in leaves.items() if k.startswith(f"{name}.")}
        W = layer.base.weight.detach()
        if "u_input" in vec:
            W = W @ reference_H(vec["u_input"], vec.get("v_input"), n, method, 0.7)
        if "u_output" in vec:
            W = reference_H(vec["u_output"], vec.get("v_output"), n, method, 0.7) @ W
        weights[f"{name}.weight"], weights[f"{name}.bias"] = W, layer.base.bias.detach()
    x_refs = [x.detach().clone().requires_grad_(True) for x in xs]
    refs = [functional_call(plain, weights, (x,)) for x in x_refs]
    want = torch.autograd.grad(refs, [*x_refs, *leaves.values()], upstream)
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_no_groups_without_gradients_or_with_gradient_checkpointing_and_none_after_unload():
    from ether_diffusion import unload_adapters

    model = _branches("etherplus", "both", 1)
    seen = []
    model.sq0.register_forward_pre_hook(lambda layer, args: seen.append(layer.low_rank_factors is not None))
    x = torch.randn(8, 64, dtype=torch.float64)
    with torch.no_grad():
        model(x)
    model.gradient_checkpointing = True  # the flag diffusers and transformers set
    model(x)
    model.gradient_checkpointing = False
    model(x)
    assert seen == [False, False, True]
    unload_adapters(model)
    assert not model._forward_pre_hooks and not model._forward_hooks and not model._forward_hooks_always_called
