"""Targets: parse `--target params=F|flops=F|latency=F`, and find the largest knob whose Plan meets one.

Counted targets (params, FLOPs) bisect the method's knob on the Plan's size, computed by the model's
per-layer size model (netslim.cost.sizemodel; by meta-device surgery where it cannot say). A latency
target is measured, not counted: the knob is first bisected on the latency table's prediction, then
the compressed network is timed against the base, in turns (the machine may be shared), and the knob
is corrected on those measurements until the measured ratio is within 5%: layers timed alone do not
add up exactly to a network (layout changes between layers, caches), so the table aims and the clock
decides. The clock runs on the target's `runtime`: with onnx or onnx-int8, base and candidates are timed
as onnxruntime runs them (netslim.runtime.forms), so "latency=0.5" halves the latency the user deploys.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn

from netslim.cost.latency_table import LatencyModel, shape_key
from netslim.cost.sizemodel import fast_plan_size
from netslim.cost.timing import Conditions
from netslim.errors import NetslimError
from netslim.plan import Plan
from netslim.runtime.forms import RUNTIMES, check_runtime

KINDS = ("params", "flops", "latency")
TOLERANCE = 0.05  # measured/target latency ratio accepted without another round of refinement


@dataclass(frozen=True)
class Target:
    """Keep `fraction` of the base network's `kind` (params, flops or measured latency).

    A latency target is measured under its own conditions: `batch`, `device`, CPU `threads` (None: torch's
    current setting) and the `runtime` it is timed on: torch (eager PyTorch), onnx or onnx-int8 (onnxruntime
    fp32 or int8, on the CPU).
    """

    kind: str
    fraction: float
    batch: int = 1
    device: str = "cpu"
    threads: int | None = None
    runtime: str = "torch"

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            check_runtime(self.runtime)  # the error naming the runtimes
        if self.runtime != "torch" and self.kind != "latency":
            raise NetslimError(f"a runtime ({self.runtime}) only concerns a latency target, not {self}")
        if self.runtime != "torch" and str(self.device).startswith("cuda"):
            check_runtime(self.runtime, self.device)  # the error saying onnxruntime is timed on the CPU

    def __str__(self) -> str:
        return f"{self.kind}={self.fraction:g}"


def parse_target(text: str) -> Target:
    """`params=0.125`, `flops=0.3` or `latency=0.5` as a Target (latency conditions at their defaults)."""
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


def fits(plan: Plan, target: Target, base: dict[str, int], template: nn.Module | None = None) -> bool:
    """Whether the Plan keeps at most `target.fraction` of the base's counted `target.kind`."""
    return fast_plan_size(plan, template)[target.kind] <= target.fraction * base[target.kind]


def bisect(make_plan: Callable[[float], Plan], target: Target, template: nn.Module | None,
           lo: float, hi: float, *, iters: int = 40, why: Callable[[Plan], str] | None = None) -> Plan:
    """Largest knob in [lo, hi] whose Plan fits the target; size must grow with the knob.

    `why(smallest_plan)` words what keeps the method's smallest network above an unreachable target (which
    layers it keeps whole and why, the floor options) for an unreachable target's message."""
    if target.kind == "latency":  # measured, not counted
        return latency_bisect(make_plan, target, template, lo, hi)
    if target.kind not in ("params", "flops"):
        raise NetslimError(f"target {target} cannot be met by bisection on a Plan's size")
    top = make_plan(hi)
    base = fast_plan_size(replace(top, keep={}, drop=[], factorize={}, heads={}), template)
    best = make_plan(lo)
    if not fits(best, target, base, template):
        got = fast_plan_size(best, template)[target.kind] / base[target.kind]
        reason = why(best) if why is not None else ""
        raise NetslimError(f"target {target} is unreachable: the smallest network this method builds keeps "
                           f"{got:.4f} of the {target.kind}" + (f"; {reason}" if reason else ""))
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


def latency_bisect(make_plan: Callable[[float], Plan], target: Target, template: nn.Module | None,
                   lo: float, hi: float, *, iters: int = 24, timings: int = 8,
                   cache_dir: Path | None = None, seconds_per_timing: float = 10.0) -> Plan:
    """Largest knob whose Plan runs at `target.fraction` of the base's latency, measured on this device and
    the target's runtime.

    First guess: bisect the knob on the table's predicted latency. Then every candidate is timed
    against the base (interleaved) and the knob is corrected on those measurements: regula falsi
    (Illinois) between the closest timings on either side of the target, or, before there are both
    sides, the table's prediction aimed off by the error seen so far (at most 1.5x per step). At most
    `timings` candidates are timed; the one closest to the target wins, and its `meta["latency"]`
    records conditions and measurements. A target even the smallest network misses by more than 10% is refused
    in one line (unreachable). When the closest is more than 10% off otherwise (a step in the runtime's kernels:
    two 3x3 convolutions of 33 channels measured 1.7x slower than of 31, or the timings ran out), it still wins,
    and `meta["latency"]["missed"]` gives the nearest measured ratios on either side of the target, so that the
    report says so and the user can ask for one of them.
    """
    if template is None:
        raise NetslimError("a latency target needs the base model (its meta template) to time")
    fraction = float(target.fraction)
    cond = Conditions.make(getattr(target, "device", "cpu") or "cpu", getattr(target, "batch", 1) or 1,
                           getattr(target, "threads", None), runtime=getattr(target, "runtime", "torch"))
    top = make_plan(hi)
    lat = LatencyModel(template, replace(top, keep={}, drop=[], factorize={}, heads={}, meta={}), cond,
                       cache_dir=cache_dir)

    def predicted(goal: float) -> float:
        """Largest knob whose predicted latency ratio is at most `goal` (lo when none is)."""
        if lat.predicted_ratio(top) <= goal:
            return hi
        a, b = lo, hi
        for _ in range(iters):
            mid = (a + b) / 2
            if lat.predicted_ratio(make_plan(mid)) <= goal:
                a = mid
            else:
                b = mid
        return a

    tried: list[dict[str, Any]] = []
    plans: dict[str, Plan] = {}
    knob, goal = predicted(fraction), fraction
    for _ in range(timings):
        plan = make_plan(knob)
        key = shape_key(plan)
        if key in plans:
            break  # the correction leads back to a network already timed: the knob cannot resolve finer
        measured, ms, base_ms = lat.measured_ratio(plan, seconds_per_timing)
        lat.table.save()
        plans[key] = plan
        tried.append({"knob": round(knob, 6), "goal": round(goal, 4),
                      "predicted_ratio": round(lat.predicted_ratio(plan), 4), "measured_ratio": round(measured, 4),
                      "ms": round(ms, 4), "base_ms": round(base_ms, 4), "key": key})
        if abs(measured - fraction) <= TOLERANCE * fraction:
            break
        below = [t for t in tried if t["measured_ratio"] < fraction]
        above = [t for t in tried if t["measured_ratio"] >= fraction]
        if below and above:  # bracketed: regula falsi on the knob between the closest timings
            a = max(below, key=lambda t: t["measured_ratio"])
            b = min(above, key=lambda t: t["measured_ratio"])
            if abs(b["knob"] - a["knob"]) < 1e-3 * (hi - lo):
                break  # neighbours in the knob: what is left between them is timing noise
            fa, fb = fraction - a["measured_ratio"], b["measured_ratio"] - fraction
            # Illinois: while new timings keep landing on one side, halve the pull of the other, stuck end
            side = [t["measured_ratio"] < fraction for t in tried]
            same = next((i for i, s_ in enumerate(reversed(side)) if s_ != side[-1]), len(side))
            if side[-1]:
                fb *= 0.5 ** max(0, same - 1)
            else:
                fa *= 0.5 ** max(0, same - 1)
            w = fa / (fa + fb) if fa + fb > 0 else 0.5
            knob = a["knob"] + (b["knob"] - a["knob"]) * min(0.9, max(0.1, w))
            if shape_key(make_plan(knob)) in plans:  # a network already timed: bisect the bracket instead
                knob = (a["knob"] + b["knob"]) / 2
        elif (knob <= lo and measured > fraction) or (knob >= hi and measured < fraction):
            break  # the knob's range ends here
        else:  # one side only: aim the prediction off by the error measured so far (damped)
            goal = min(1.0, max(1e-3, goal * min(1.5, max(2 / 3, fraction / measured))))
            new = predicted(goal)
            if shape_key(make_plan(new)) in plans:  # the prediction cannot tell them apart: step the knob
                step = (hi - lo) / 16
                new = min(hi, knob + step) if measured < fraction else max(lo, knob - step)
            knob = new
    final = min(tried, key=lambda t: abs(t["measured_ratio"] - fraction))
    if final["measured_ratio"] > fraction * (1 + 2 * TOLERANCE) and final["knob"] <= lo:
        raise NetslimError(f"target {target} is unreachable on {cond.device_name()} ({RUNTIMES[cond.runtime]}, "
                           f"batch {cond.batch}): the smallest network this method builds runs at "
                           f"{final['measured_ratio']:.3f} of the base's latency")
    plan = copy.deepcopy(plans[final["key"]])
    plan.meta["latency"] = {**cond.describe(), "target": fraction, "base_ms": final["base_ms"], "ms": final["ms"],
                            "measured_ratio": final["measured_ratio"], "predicted_ratio": final["predicted_ratio"],
                            "predicted_by": "eager PyTorch's latency table", "eager_base_ms": round(lat.base_ms, 4),
                            "table": str(lat.table.path), "table_entries_measured": lat.table.measured,
                            "attempts": [{k: v for k, v in t.items() if k != "key"} for t in tried]}
    if abs(final["measured_ratio"] - fraction) > 2 * TOLERANCE * fraction:
        ratios = [t["measured_ratio"] for t in tried]
        plan.meta["latency"]["missed"] = {"below": max((r for r in ratios if r < fraction), default=None),
                                          "above": min((r for r in ratios if r >= fraction), default=None)}
    return plan

