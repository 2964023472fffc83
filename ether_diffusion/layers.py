"""`EtherLayer`: wraps an `nn.Linear` (or 1×1 `nn.Conv2d`) and applies any number of named ETHER adapters.

The base weights are never touched except by `merge`, which remembers the original weight so that `unmerge`
restores it bit for bit. Adapter vectors are fp32 parameters and stay fp32 when the model is cast to half.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .ether import METHOD_SPECS, MethodSpec, apply_transform, check_method, default_sides, transform_weight, unit_blocks
from .errors import EtherError


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


def is_adaptable(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1 and module.stride == (1, 1)


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
    """The trainable vectors of one adapter on one layer: u (and v for ETHER+) per side, flat (d,) fp32."""

    def __init__(self, config: AdapterConfig, in_features: int, out_features: int) -> None:
        super().__init__()
        self.config = config
        self.vectors = nn.ParameterDict()
        for side in config.side_list:
            d = in_features if side == "input" else out_features
            u = torch.empty(d, dtype=torch.float32)
            nn.init.uniform_(u, -1.0, 1.0)  # scale is irrelevant: only the direction counts
            self.vectors[f"u_{side}"] = nn.Parameter(u)
            if config.spec.has_v:  # v = u: H⁺ = I exactly, the model starts as the pretrained one
                self.vectors[f"v_{side}"] = nn.Parameter(u.clone())

    def unit(self, side: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        n = self.config.n_blocks
        u = unit_blocks(self.vectors[f"u_{side}"], n)
        v = unit_blocks(self.vectors[f"v_{side}"], n) if f"v_{side}" in self.vectors else None
        return u, v

    def _apply(self, fn, recurse: bool = True):
        """Follow device moves, but keep the vectors fp32 when the base model is cast to fp16/bf16."""
        super()._apply(fn, recurse)
        for p in self.vectors.values():
            if p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
        return self


class EtherLayer(nn.Module):
    """A Linear / 1×1 Conv2d with named ETHER adapters, an active set with strengths, merge and routing."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        if not is_adaptable(base):
            raise EtherError(f"ETHER wraps nn.Linear or 1×1 nn.Conv2d, not {type(base).__name__}")
        self.base = base
        self.ether_adapters = nn.ModuleDict()
        self.active: dict[str, float] = {}
        self.enabled = True
        self.merged: dict[str, float] = {}
        self._original_weight: torch.Tensor | None = None
        self.routing: tuple[list[str | None], torch.Tensor] | None = None

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

    def _transform(self, x: torch.Tensor, names: list[str], side: str) -> torch.Tensor:
        for name in names:
            adapter = self.ether_adapters[name]
            if side in adapter.config.side_list:
                u, v = adapter.unit(side)
                x = apply_transform(x, u, v, adapter.config.spec, self.active[name])
        return x

    def _routed(self, side: str) -> tuple[torch.Tensor, torch.Tensor | None, MethodSpec] | None:
        """Per-sample stacked unit vectors (B, n, k) for one side; zero vectors (identity) for samples without."""
        names, _ = self.routing
        used = [self.ether_adapters[n] for n in dict.fromkeys(names) if n is not None and n in self.ether_adapters]
        configs = {(a.config.method, a.config.n_blocks, a.config.sides) for a in used}
        if len(configs) > 1:
            raise EtherError(f"per-sample routing needs adapters of one method, n_blocks and sides; got {sorted(configs)}")
        if not used or side not in used[0].config.side_list:
            return None
        units = {n: self.ether_adapters[n].unit(side) for n in dict.fromkeys(names) if n in self.ether_adapters}
        ref_u, ref_v = next(iter(units.values()))
        zero = torch.zeros_like(ref_u)
        u = torch.stack([units[n][0] if n in units else zero for n in names])
        v = torch.stack([units[n][1] if n in units else zero for n in names]) if ref_v is not None else None
        return u, v, used[0].config.spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.merged or (not any(self.active.values()) and self.routing is None):
            return self.base(x)  # strength-0 adapters cost nothing and leave the base output bit for bit
        if self.is_conv:
            return self._forward_2d(x.movedim(1, -1)).movedim(-1, 1)
        return self._forward_2d(x)

    def _forward_2d(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight_2d(), self.base.bias
        if self.routing is not None:
            names, strengths = self.routing
            if x.shape[0] != len(names):
                raise EtherError(f"routing names {len(names)} samples but the batch has {x.shape[0]}")
            strengths = strengths.to(x.device)
            routed_in = self._routed("input")
            if routed_in:
                x = apply_transform(x, *routed_in[:2], routed_in[2], strengths)
            y = F.linear(x, weight)
            routed_out = self._routed("output")
            if routed_out:
                y = apply_transform(y, *routed_out[:2], routed_out[2], strengths)
        else:
            names = [n for n, s in self.active.items() if s]
            y = F.linear(self._transform(x, names[::-1], "input"), weight)
            y = self._transform(y, names, "output")
        return y + bias if bias is not None else y

    # -- merge -----------------------------------------------------------------------------------------------

    def merged_weight(self, strengths: dict[str, float], dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """H_out,k … H_out,1 · W · H_in,1 … H_in,k for the given adapters in order, computed in `dtype`."""
        weight = self.weight_2d().to(dtype)
        for name, strength in strengths.items():
            adapter = self.ether_adapters[name]
            for side in adapter.config.side_list:
                u, v = adapter.unit(side)
                weight = transform_weight(weight, side, u.to(dtype), None if v is None else v.to(dtype),
                                          adapter.config.spec, strength)
        return weight

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the active adapters at their strengths into the base weight (computed in fp64)."""
        if self.merged or not self.active:
            return
        self._original_weight = self.base.weight.detach().clone()
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
