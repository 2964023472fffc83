"""`EtherLayer`: wraps an `nn.Linear` (or 1×1 `nn.Conv2d`) and applies any number of named ETHER adapters.

The base weights are never touched except by `merge`, which remembers the original weight so that `unmerge`
restores it bit for bit. Adapter vectors are fp32 parameters and stay fp32 when the model is cast to half.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .ether import METHOD_SPECS, MethodSpec, apply_transform, check_method, default_sides, transform_weight, unit_blocks
from .errors import EtherError
from .fused import apply_low_rank, low_rank_linear, low_rank_pays


@dataclass(frozen=True)
class AdapterConfig:
    """What an adapter is: the method, its block count, which side(s) of each weight it acts on, where it lives."""

    method: str = "etherplus"
    n_blocks: int = 1
    sides: str | None = None  # None: the method's default (ETHER: input, ETHER+: both)
    targets: str = "attn"

    def __post_init__(self) -> None:
        if self.sides is None:
            object.__setattr__(self, "sides", default_sides(self.method))
        try:
            check_method(self.method, self.n_blocks, self.sides)
        except ValueError as exc:
            raise EtherError(str(exc)) from None

    @property
    def spec(self) -> MethodSpec:
        return METHOD_SPECS[self.method]

    @property
    def side_list(self) -> tuple[str, ...]:
        return ("input", "output") if self.sides == "both" else (self.sides,)

    def to_dict(self) -> dict:
        return asdict(self)


QUANTISED_LINEARS = ("Linear8bitLt", "Linear4bit")  # bitsandbytes: forward through the layer, never merged


def is_quantised(module: nn.Module) -> bool:
    """A bitsandbytes 8-/4-bit Linear: its weight is packed, so ETHER runs around its forward but cannot merge."""
    return type(module).__name__ in QUANTISED_LINEARS and type(module).__module__.startswith("bitsandbytes")


def is_adaptable(module: nn.Module) -> bool:
    """Exactly the layer types ETHER handles: nn.Linear, 1×1 nn.Conv2d (any stride or padding, one group) and
    bitsandbytes' quantised Linears. Other subclasses may compute something else than x ↦ Wx + b, so they are
    refused rather than guessed at."""
    if type(module) is nn.Linear or is_quantised(module):
        return True
    return type(module) is nn.Conv2d and module.kernel_size == (1, 1) and module.groups == 1


def unsupported_reason(module: nn.Module) -> str:
    """Why `module` cannot be adapted, for error messages that name the layer."""
    kind = f"{type(module).__module__}.{type(module).__name__}"
    if isinstance(module, nn.Conv2d):
        return f"a {kind} with kernel {module.kernel_size} and {module.groups} group(s); only 1×1 single-group convs"
    return f"a {kind}; ETHER adapts nn.Linear, 1×1 nn.Conv2d and bitsandbytes Linear8bitLt / Linear4bit"


def layer_sizes(module: nn.Module) -> tuple[int, int]:
    """(in, out) features of a Linear or 1×1 Conv2d."""
    if isinstance(module, nn.Conv2d):
        return module.in_channels, module.out_channels
    return module.in_features, module.out_features


def check_blocks(config: AdapterConfig, in_features: int, out_features: int, layer_name: str) -> None:
    """Refuse a layer whose adapted side is not divisible by n_blocks, naming it."""
    for side in config.side_list:
        d = in_features if side == "input" else out_features
        if d % config.n_blocks:
            raise EtherError(f"layer {layer_name}: {side} size {d} is not divisible by n_blocks={config.n_blocks}; "
                             f"choose a divisor of {d} or exclude this layer")


class EtherAdapter(nn.Module):
    """The trainable vectors of one adapter on one layer: u (and v for ETHER+) per side, flat (d,) fp32.

    The vectors are this module's own parameters and the layer gets their unit blocks by calling it, so hooks
    that move weights in just before a module runs (accelerate's CPU / disk offload) load them too.
    """

    def __init__(self, config: AdapterConfig, in_features: int, out_features: int) -> None:
        super().__init__()
        self.config = config
        for side in config.side_list:
            d = in_features if side == "input" else out_features
            u = torch.empty(d, dtype=torch.float32)
            nn.init.uniform_(u, -1.0, 1.0)  # scale is irrelevant: only the direction counts
            self.register_parameter(f"u_{side}", nn.Parameter(u))
            if config.spec.has_v:  # v = u: H⁺ = I exactly, the model starts as the pretrained one
                self.register_parameter(f"v_{side}", nn.Parameter(u.clone()))

    @property
    def vectors(self) -> dict[str, nn.Parameter]:
        """Vector name ('u_input', 'v_input', 'u_output', 'v_output') → parameter."""
        return dict(self._parameters)  # type: ignore[arg-type]

    def forward(self) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """Side → (û, v̂) unit blocks of shape (n, d/n), computed in fp32."""
        n = self.config.n_blocks
        vectors = self.vectors
        return {side: (unit_blocks(vectors[f"u_{side}"], n),
                       unit_blocks(vectors[f"v_{side}"], n) if f"v_{side}" in vectors else None)
                for side in self.config.side_list}

    def _apply(self, fn, recurse: bool = True):
        """Follow device moves, but keep fp32 vectors fp32, never rounded through fp16/bf16, when the base model is
        cast to half precision (`.half()`, `.to(torch.bfloat16)`)."""

        def keep_fp32(t: torch.Tensor) -> torch.Tensor:
            moved = fn(t)
            if t.dtype == torch.float32 and moved.dtype in (torch.float16, torch.bfloat16):
                return t.to(moved.device, copy=moved.device == t.device)
            return moved

        return super()._apply(keep_fp32, recurse)


class EtherLayer(nn.Module):
    """A Linear / 1×1 Conv2d with named ETHER adapters, an active set with strengths, merge and routing."""

    def __init__(self, base: nn.Module, layer_name: str = "") -> None:
        super().__init__()
        if not is_adaptable(base):
            raise EtherError(f"layer {layer_name or '?'} is {unsupported_reason(base)}")
        self.base = base
        self.ether_adapters = nn.ModuleDict()
        self.active: dict[str, float] = {}
        self.enabled = True
        self.merged: dict[str, float] = {}
        self._original_weight: torch.Tensor | None = None
        self.routing: tuple[list[str | None], torch.Tensor] | None = None
        self.low_rank_factors: tuple[torch.Tensor, torch.Tensor] | None = None  # (A, L) built for this forward

    @property
    def is_conv(self) -> bool:
        return isinstance(self.base, nn.Conv2d)

    @property
    def in_features(self) -> int:
        return layer_sizes(self.base)[0]

    @property
    def out_features(self) -> int:
        return layer_sizes(self.base)[1]

    def weight_2d(self) -> torch.Tensor:
        """The base weight as (out, in), for merging and export (a quantised layer's packed weight is refused)."""
        if is_quantised(self.base):
            raise EtherError(f"the weight of a quantised {type(self.base).__name__} is packed; merging and LoRA "
                             "export need the full-precision base model")
        return self.base.weight.view(self.out_features, self.in_features)

    def add_adapter(self, name: str, config: AdapterConfig, layer_name: str = "") -> EtherAdapter:
        check_blocks(config, self.in_features, self.out_features, layer_name or type(self.base).__name__)
        if name in self.ether_adapters:
            raise EtherError(f"an adapter named {name!r} already exists on {layer_name or 'this layer'}")
        adapter = EtherAdapter(config, self.in_features, self.out_features).to(self.base.weight.device)
        self.ether_adapters[name] = adapter
        self.active[name] = 1.0
        return adapter

    def delete_adapter(self, name: str) -> None:
        if name in self.merged:
            raise EtherError(f"adapter {name!r} is merged; unmerge before deleting it")
        del self.ether_adapters[name]
        self.active.pop(name, None)

    def set_active(self, strengths: dict[str, float]) -> None:
        if self.merged:
            raise EtherError("adapters are merged into the weights; unmerge before changing the active set")
        self.active = {n: float(s) for n, s in strengths.items() if n in self.ether_adapters}

    # -- forward ---------------------------------------------------------------------------------------------

    def _planned(self) -> tuple[list, list]:
        """(input-side, output-side) transforms to apply, in order, as (û, v̂, spec, strength) tuples.

        Each adapter is called once, which is when offload hooks bring its vectors in.
        """
        if self.routing is not None:
            return self._routed_plan()
        names = [n for n, s in self.active.items() if s]
        units = {n: self.ether_adapters[n]() for n in names}

        def side_plan(side: str, order: list[str]) -> list:
            return [(*units[n][side], self.ether_adapters[n].config.spec, self.active[n]) for n in order
                    if side in units[n]]

        # W' = H_out,k … H_out,1 · W · H_in,1 … H_in,k: the last adapter's input transform meets x first
        return side_plan("input", names[::-1]), side_plan("output", names)

    def _routed_plan(self) -> tuple[list, list]:
        """Per-sample stacked unit vectors (B, n, k) per side; zero vectors (identity) for samples without."""
        names, strengths = self.routing
        used = [n for n in dict.fromkeys(names) if n is not None and n in self.ether_adapters]
        configs = {(self.ether_adapters[n].config.method, self.ether_adapters[n].config.n_blocks,
                    self.ether_adapters[n].config.sides) for n in used}
        if len(configs) > 1:
            raise EtherError(f"per-sample routing needs adapters of one method, n_blocks and sides; got {sorted(configs)}")
        if not used:
            return [], []
        units = {n: self.ether_adapters[n]() for n in used}
        config = self.ether_adapters[used[0]].config
        plans = []
        for side in ("input", "output"):
            if side not in config.side_list:
                plans.append([])
                continue
            ref_u, ref_v = units[used[0]][side]
            zero = torch.zeros_like(ref_u)
            u = torch.stack([units[n][side][0] if n in units else zero for n in names])
            v = torch.stack([units[n][side][1] if n in units else zero for n in names]) if ref_v is not None else None
            plans.append([(u, v, config.spec, strengths.to(u.device))])
        return plans[0], plans[1]

    def _channels_last(self, x: torch.Tensor, plan: list) -> torch.Tensor:
        """Apply transforms along the feature axis (last for Linear, 1 for a conv's NCHW)."""
        if not plan:
            return x
        if self.is_conv:
            x = x.movedim(1, -1)
        for u, v, spec, strength in plan:
            x = apply_transform(x, u, v, spec, strength)
        return x.movedim(-1, 1) if self.is_conv else x

    def _bias(self, y: torch.Tensor) -> torch.Tensor | None:
        """The base layer's bias, shaped to broadcast over its output; read through the layer itself when an
        offload hook keeps the parameters elsewhere (the output for a zero input is the bias)."""
        bias = getattr(self.base, "bias", None)
        if bias is None:
            return None
        if bias.device.type == "meta":
            zero = y.new_zeros((1, self.in_features, 1, 1) if self.is_conv else (1, self.in_features))
            bias = self.base(zero).reshape(self.out_features, -1)[:, 0]
        bias = bias.to(y.dtype)
        return bias.view(-1, 1, 1) if self.is_conv else bias

    def _low_rank_plan(self, tokens: int | None) -> tuple | None:
        """`low_rank_linear`'s arguments after x and the base (spec, strength, n_blocks, input-side vectors,
        output-side vectors) to train the one active adapter as a low-rank update (`fused.py`), or None for the
        general path.

        It applies to training one adapter on a plain Linear whose weight and vectors are at hand, when it pays:
        the update's rank is small next to the layer and there are enough tokens (`fused.low_rank_pays`; tokens
        None: only where the count does not matter).
        Routing, several adapters, convs, quantised or offloaded weights and a trainable base take the general
        path.
        """
        if not torch.is_grad_enabled() or self.routing is not None or type(self.base) is not nn.Linear:
            return None
        active = [n for n, s in self.active.items() if s]
        weight, bias = self.base.weight, self.base.bias
        if len(active) != 1 or weight.requires_grad or weight.is_meta or (bias is not None and bias.requires_grad):
            return None
        adapter = self.ether_adapters[active[0]]
        config, vectors = adapter.config, adapter.vectors
        rank = config.n_blocks * (1 + config.spec.has_v) * len(config.side_list)
        if not low_rank_pays(rank, tokens, self.in_features, self.out_features) \
                or any(v.is_meta for v in vectors.values()) or not any(v.requires_grad for v in vectors.values()):
            return None
        sides = ([vectors[f"{kind}_{side}"] for kind in ("u", "v") if f"{kind}_{side}" in vectors]
                 for side in ("input", "output"))
        return config.spec, self.active[active[0]], config.n_blocks, *sides

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.merged or (not any(self.active.values()) and self.routing is None):
            return self.base(x)  # strength-0 adapters cost nothing and leave the base output bit for bit
        if self.routing is not None and x.shape[0] != len(self.routing[0]):
            raise EtherError(f"routing names {len(self.routing[0])} samples but the batch has {x.shape[0]}")
        if self.low_rank_factors is not None and torch.is_grad_enabled():  # built with its group (low_rank_groups)
            return apply_low_rank(x, self.base, *self.low_rank_factors)
        low_rank = self._low_rank_plan(x.numel() // max(x.shape[-1], 1))
        if low_rank is not None:
            return low_rank_linear(x, self.base, *low_rank)
        plan_in, plan_out = self._planned()
        y = self.base(self._channels_last(x, plan_in))
        if not plan_out:
            return y
        bias = self._bias(y)
        if bias is None:
            return self._channels_last(y, plan_out)
        return self._channels_last(y - bias, plan_out) + bias  # H_out acts on W·x, not on the bias

    # -- merge -----------------------------------------------------------------------------------------------

    def merged_weight(self, strengths: dict[str, float], dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """H_out,k … H_out,1 · W · H_in,1 … H_in,k for the given adapters in order, computed in `dtype`."""
        weight = self.weight_2d().to(dtype)
        for name, strength in strengths.items():
            adapter = self.ether_adapters[name]
            for side, (u, v) in adapter().items():
                weight = transform_weight(weight, side, u.to(dtype), None if v is None else v.to(dtype),
                                          adapter.config.spec, strength)
        return weight

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the active adapters at their strengths into the base weight (computed in fp64).

        The original weight is kept in CPU memory, not on the accelerator, so fusing saves accelerator memory;
        `unmerge` copies it back bit for bit.
        """
        if self.merged or not self.active:
            return
        if is_quantised(self.base):
            raise EtherError(f"cannot merge into a quantised {type(self.base).__name__}: its weight is packed; "
                             "use the adapter unmerged, or merge on the full-precision model")
        self._original_weight = self.base.weight.detach().to("cpu", copy=True)
        new = self.merged_weight(self.active).to(self.base.weight.dtype)
        self.base.weight.copy_(new.view_as(self.base.weight))
        self.merged = dict(self.active)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact original weight."""
        if not self.merged:
            return
        self.base.weight.copy_(self._original_weight)
        self._original_weight = None
        self.merged = {}

    def extra_repr(self) -> str:
        return f"adapters={list(self.ether_adapters)}, active={self.active}, merged={bool(self.merged)}"
