"""How big a model is: parameters, MACs/FLOPs and stored bytes, also of a Plan sized without weights.

FLOPs come from torch.utils.flop_counter.FlopCounterMode, which counts a multiply-add as 2 FLOPs
(convolutions and matmuls only); MACs are reported beside them because the papers quote MACs.
Attention is counted the same on every device: nn.MultiheadAttention's fused fast path (which the counter
does not see) is switched off while counting, and the CPU kernel of scaled_dot_product_attention gets the
formula the counter has for the GPU ones, so a model weighs on a CPU what its meta copy weighs.
Factorized or sparse layers are ordinary modules, so they are counted as the dense ops they run;
their storage is what they report themselves (`stored_params()`, and CSR indices through
`storage_bytes()`), since their dense masked weight is not what a deployment keeps.

Plans are sized by building the planned network on the meta device, so a search over dozens of
candidate Plans costs no memory for weights and stays exact (real layer shapes, real coupling).
"""

from __future__ import annotations

import copy
import math
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from netslim.errors import NetslimError
from netslim.plan import Plan
from netslim.surgery.clone import clone

PLAN_SIZES_KEPT = 256  # sizes cached per template (least recently used go first)
# FlopCounterMode has a formula for the GPU attention kernels only; the CPU one does the same matmuls
_CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
                  lambda q, k, v, *_, out_shape=None, **__: flop_counter.sdpa_flop_count(q, k, v)}


class FlopCount(NamedTuple):
    """(flops, macs); also indexable by name, so `count_flops(...)["macs"]` works as well as unpacking."""

    flops: int
    macs: int

    def __getitem__(self, key: Any) -> Any:  # type: ignore[override]
        return getattr(self, key) if isinstance(key, str) else tuple.__getitem__(self, key)

    def as_dict(self) -> dict[str, int]:
        return {"flops": self.flops, "macs": self.macs}


def sample_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    """`input_shape` as a tuple of positive ints (one sample, no batch axis), or a NetslimError."""
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s < 1 for s in shape):
        raise NetslimError(f"input shape must be positive sizes without the batch, e.g. (3, 32, 32); got {input_shape}")
    return shape


def placement(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of the model's first floating tensor (CPU float32 when it has none)."""
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.float32


def count_params(model: nn.Module, nonzero: bool = False) -> int:
    """All parameters (shared ones once); with nonzero=True only the entries that are not exactly 0."""
    params = list(model.parameters())
    if not nonzero:
        return sum(p.numel() for p in params)
    return sum(p.numel() if p.is_meta else int(torch.count_nonzero(p.detach())) for p in params)


def count_flops(model: nn.Module, input_shape: Sequence[int]) -> FlopCount:
    """FLOPs and MACs of one forward pass at batch 1, on an eval-mode copy (works on the meta device)."""
    shape = sample_shape(input_shape)
    try:
        net = copy.deepcopy(model)
    except Exception:  # some modules refuse deepcopy; fall back to the original and restore its mode
        net = model
    was_training = net.training
    device, dtype = placement(net)
    net.eval()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION) as counter:
            net(torch.zeros((1, *shape), device=device, dtype=dtype))
    except (RuntimeError, ValueError, TypeError) as exc:
        raise NetslimError(f"the model does not accept an input of shape {shape}: {exc}") from exc
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        net.train(was_training)
    flops = int(counter.get_total_flops())
    return FlopCount(flops=flops, macs=flops // 2)


def _self_counted(model: nn.Module) -> list[nn.Module]:
    """The outermost modules that count their own storage (they have `stored_params()`), `model` included."""
    found: list[nn.Module] = []
    seen: set[int] = set()

    def walk(m: nn.Module) -> None:
        if id(m) in seen:
            return
        seen.add(id(m))
        if callable(getattr(m, "stored_params", None)):
            found.append(m)
            return
        for child in m.children():
            walk(child)

    walk(model)
    return found


def _owned(modules: Sequence[nn.Module]) -> set[int]:
    """ids of the parameters and buffers of `modules`, which their own counts already cover."""
    return {id(t) for m in modules for t in (*m.parameters(), *m.buffers())}


def stored_params(model: nn.Module) -> int:
    """Values a deployment stores: every parameter, except that sparse/factorized modules report their own."""
    own = _self_counted(model)
    owned = _owned(own)
    return sum(m.stored_params() for m in own) + sum(p.numel() for p in model.parameters() if id(p) not in owned)


def storage_bytes(model: nn.Module, bits: int = 32, *, buffers: bool = True, sparse: bool = False) -> int:
    """Bytes to store the model with `bits` per value: what a deployment really keeps.

    Dense by default: every parameter, plus floating buffers (BatchNorm statistics) since inference
    needs them. Sparse/factorized modules count their `stored_params()` values and the index bytes
    their `storage_bytes()` reports (S in CSR), the same values `stored_params` counts. sparse=True
    stores the other tensors as non-zero values plus a 1-bit occupancy mask per entry, never more
    than dense.
    """
    own = _self_counted(model)
    owned = _owned(own)
    tensors = [p for p in model.parameters() if id(p) not in owned]
    if buffers:
        tensors += [b for b in model.buffers() if b.is_floating_point() and id(b) not in owned]
    total = 0
    for t in tensors:
        dense = t.numel() * bits
        if sparse and not t.is_meta:
            dense = min(dense, int(torch.count_nonzero(t.detach())) * bits + t.numel())
        total += dense
    for m in own:
        index_bytes = m.storage_bytes(0)["total"] if callable(getattr(m, "storage_bytes", None)) else 0
        total += m.stored_params() * bits + 8 * index_bytes
    return math.ceil(total / 8)


def model_size(model: nn.Module, input_size: Sequence[int]) -> dict[str, int]:
    """Stored parameters, MACs, FLOPs (batch 1) and `bytes` (storage_bytes at float32) of `model`."""
    fl = count_flops(model, tuple(input_size))
    return {"params": stored_params(model), "macs": int(fl["macs"]), "flops": int(fl["flops"]),
            "bytes": storage_bytes(model)}


def meta_template(model: nn.Module) -> nn.Module:
    """A weightless copy of `model` on the meta device: the cheap thing to size Plans with."""
    return clone(model).to("meta")


# Sizes of Plans, per template and forgotten with it (a weak key: an id reused after garbage collection
# cannot hit another template's entry); Plans sized from the zoo (no template) share one table.
_SIZES: weakref.WeakKeyDictionary[nn.Module, OrderedDict[str, dict[str, int]]] = weakref.WeakKeyDictionary()
_ZOO_SIZES: OrderedDict[str, dict[str, int]] = OrderedDict()


def _size_cache(template: nn.Module | None) -> OrderedDict[str, dict[str, int]] | None:
    if template is None:
        return _ZOO_SIZES
    try:
        return _SIZES.setdefault(template, OrderedDict())
    except TypeError:  # not weakly referenceable: sized every time
        return None


def plan_size(plan: Plan, template: nn.Module | None = None) -> dict[str, int]:
    """model_size of the planned network (params, MACs, FLOPs, bytes), computed on the meta device.

    `template` is the (meta) model the Plan applies to; without one the base is rebuilt from the zoo.
    """
    from netslim.surgery.apply import apply_plan
    from netslim.zoo import build

    cache = _size_cache(template)
    key = plan.to_json()
    if cache is not None and key in cache:
        cache.move_to_end(key)
        return dict(cache[key])
    if template is None:
        with torch.device("meta"):
            model = build(plan.arch, num_classes=plan.num_classes, in_channels=plan.input_size[0],
                          image_size=tuple(plan.input_size[1:]), allow_code=False)  # a Plan may come from a file
    else:
        model = copy.deepcopy(template).to("meta")
    # Surgery runs outside a meta device context: torch-pruning builds index tensors on the default device
    # and moves them to the weights' (a default of meta breaks its LayerNorm cut).
    apply_plan(model, plan)
    size = model_size(model, plan.input_size)
    if cache is not None:
        cache[key] = size
        while len(cache) > PLAN_SIZES_KEPT:
            cache.popitem(last=False)
    return dict(size)
