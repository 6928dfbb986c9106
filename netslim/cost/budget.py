"""Budgets: parse `--target params=F|flops=F|latency=F`, size a Plan without weights, bisect a knob to fit.

Sizes come from building the planned network on the meta device, so a search over dozens of
candidate Plans costs no memory for weights and stays exact (real layer shapes, real coupling).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from netslim.errors import NetslimError
from netslim.plan import Plan

KINDS = ("params", "flops", "latency")


@dataclass(frozen=True)
class Target:
    """Keep `fraction` of the base network's `kind` (params, flops or measured latency).

    A latency target is measured under its own conditions: `batch`, `device` and CPU `threads`
    (None: torch's current setting).
    """

    kind: str
    fraction: float
    batch: int = 1
    device: str = "cpu"
    threads: int | None = None

    def __str__(self) -> str:
        return f"{self.kind}={self.fraction:g}"


def parse_target(text: str) -> Target:
    kind, sep, value = text.partition("=")
    if not sep or kind not in KINDS:
        raise NetslimError(f"target {text!r} must look like params=0.125, flops=0.3 or latency=0.5")
    try:
        fraction = float(value)
    except ValueError:
        raise NetslimError(f"target {text!r}: {value!r} is not a number") from None
    if not 0.0 < fraction <= 1.0:
        raise NetslimError(f"target {text!r}: the fraction kept must be in (0, 1]; {fraction:g} is impossible")
    return Target(kind, fraction)


def stored_params(model: nn.Module) -> int:
    """Parameters a deployment stores: sparse modules report their own count via `stored_params()`."""
    total, seen = 0, set()
    for m in model.modules():
        if hasattr(m, "stored_params") and m is not model:
            total += m.stored_params()
            seen.update(id(p) for p in m.parameters())
    return total + sum(p.numel() for p in model.parameters() if id(p) not in seen)


def model_size(model: nn.Module, input_size: tuple[int, ...]) -> dict[str, int]:
    from netslim.cost.measure import count_flops

    fl = count_flops(model, tuple(input_size))
    return {"params": stored_params(model), "macs": int(fl["macs"]), "flops": int(fl["flops"])}


def meta_template(model: nn.Module) -> nn.Module:
    """A weightless copy of `model` on the meta device: the cheap thing to size Plans with."""
    return copy.deepcopy(model).to("meta")


_SIZES: dict[tuple[int, str], dict[str, int]] = {}


def plan_size(plan: Plan, template: nn.Module | None = None) -> dict[str, int]:
    """Parameters, MACs and FLOPs of the planned network, computed on the meta device.

    `template` is the (meta) model the Plan applies to; without one the base is rebuilt from the zoo.
    """
    from netslim.surgery.apply import apply_plan
    from netslim.zoo import build

    key = (id(template), plan.to_json())
    if key not in _SIZES:
        with torch.device("meta"):
            if template is None:
                model = build(plan.arch, num_classes=plan.num_classes, in_channels=plan.input_size[0])
            else:
                model = copy.deepcopy(template).to("meta")
            apply_plan(model, plan)
            _SIZES[key] = model_size(model, plan.input_size)
    return dict(_SIZES[key])


def fits(plan: Plan, target: Target, base: dict[str, int], template: nn.Module | None = None) -> bool:
    return plan_size(plan, template)[target.kind] <= target.fraction * base[target.kind]


def bisect(make_plan: Callable[[float], Plan], target: Target, template: nn.Module | None,
           lo: float, hi: float, iters: int = 40) -> Plan:
    """Largest knob in [lo, hi] whose Plan fits the target; size must grow with the knob."""
    if target.kind == "latency":  # measured, not counted: netslim.cost.latency_table times the candidates
        from netslim.cost.latency_table import latency_bisect

        return latency_bisect(make_plan, target, template, lo, hi)
    if target.kind not in ("params", "flops"):
        raise NetslimError(f"target {target} cannot be met by bisection on a Plan's size")
    top = make_plan(hi)
    base = plan_size(replace(top, keep={}, drop=[], factorize={}), template)
    best = make_plan(lo)
    if not fits(best, target, base, template):
        got = plan_size(best, template)[target.kind] / base[target.kind]
        raise NetslimError(f"target {target} is unreachable: the smallest network this method builds keeps "
                           f"{got:.4f} of the {target.kind}")
    if fits(top, target, base, template):
        return top
    for _ in range(iters):
        mid = (lo + hi) / 2
        plan = make_plan(mid)
        if fits(plan, target, base, template):
            lo, best = mid, plan
        else:
            hi = mid
    return best
