"""Build the low-rank factors of all small adapted layers of a model at once, before each training forward.

Why: on small layers (the embedded model's), per-operation overhead, not arithmetic, sets the step time. Each
layer building its own A and L (`fused.py`) costs some forty small operations forward and backward; layers of
one shape and setting built together cost those forty once (batched over the group; only the products with
each weight are taken layer by layer, so no weight is copied), and each layer keeps only its own thin products
with the activations (five operations, as a LoRA). `add_adapter` puts the two hooks below on
the model it adapts; `unload_adapters` and `fuse_and_unload` take them off.

Only weights ≤ `fused.SMALL_WEIGHT` are grouped (for those the low-rank path pays whatever the token count);
larger ones build their factors in their own forward, as before. Nothing is grouped without gradients, under
`torch.compile` (whose graph fuses the small operations anyway), or while gradient checkpointing is on (a block
recomputed during the backward pass must rebuild what it used, after this forward has ended).
"""

from __future__ import annotations

import weakref
from collections import defaultdict

import torch
from torch import nn

from .fused import low_rank_factors
from .layers import EtherLayer


_built: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model → the layers given factors


def prepare_factors(model: nn.Module, args) -> None:
    """Forward pre-hook: give each small single-adapter training layer its (A, L), built per group."""
    drop_factors(model, args, None)
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():  # inference passes skip the module scan
        return
    layers = []
    for module in model.modules():
        if isinstance(module, EtherLayer):
            layers.append(module)
        elif module.__dict__.get("gradient_checkpointing") is True:  # diffusers' and transformers' flag
            return
    groups = defaultdict(list)
    for layer in layers:
        plan = layer._low_rank_plan(None)
        if plan is not None:
            w = layer.base.weight
            spec, strength, n_blocks, input_vectors, output_vectors = plan
            key = (tuple(w.shape), w.dtype, w.device, spec, strength, n_blocks, len(input_vectors), len(output_vectors))
            groups[key].append((layer, plan))
    built = []
    for members in groups.values():
        if len(members) < 2:  # a lone layer builds its own in its forward
            continue
        spec, strength, n_blocks = members[0][1][:3]
        a, l = low_rank_factors([layer.base.weight for layer, _ in members], spec, strength, n_blocks,
                                [v for _, plan in members for v in plan[3]], [v for _, plan in members for v in plan[4]])
        for (layer, _), a_layer, l_layer in zip(members, a.unbind(0), l.unbind(0)):
            layer.low_rank_factors = (a_layer, l_layer)
            built.append(layer)
    _built[model] = built


def drop_factors(model: nn.Module, args, output) -> None:
    """Forward hook (also after an exception): no layer keeps factors beyond the forward they were built for."""
    for layer in _built.pop(model, ()):
        layer.low_rank_factors = None


def install(model: nn.Module) -> None:
    """Put the two hooks on `model`, once."""
    if prepare_factors not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(prepare_factors)
        model.register_forward_hook(drop_factors, always_call=True)


def uninstall(model: nn.Module) -> None:
    """Take the two hooks off `model` (nothing happens if they are not there)."""
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for key in [key for key, hook in hooks.items() if hook in (prepare_factors, drop_factors)]:
            del hooks[key]
            model._forward_hooks_always_called.pop(key, None)
