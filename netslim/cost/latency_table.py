"""Measured latency: a per-layer table per device, interleaved timings, and the `--target latency=F` search.

FLOPs are not time: a layer's latency depends on the kernel the runtime picks for its exact widths.
So every conv/linear unit (the layer with the BatchNorm and activation that directly follow it) is
timed alone on this device at its exact widths, and a network's latency is predicted as the sum of its
units plus what the base spends outside them (pooling, adds, Python). Entries are measured the first
time they are needed and cached on disk, one file per device / torch version / threads / batch /
dtype, so a device's table is built once and shared by every model, method and run.

A latency target bisects the method's own knob (PFA-En's energy, a uniform ratio, ...) on the
predicted latency, then times the compressed network against the base, in turns (the machine may be
shared), and corrects the knob on those measurements until the measured ratio is within 5%: layers
timed alone do not add up exactly to a network (layout changes between layers, caches), so the
table aims and the clock decides.
"""

from __future__ import annotations

import copy
import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from netslim.errors import NetslimError
from netslim.plan import Plan

TABLE_VERSION = 2  # in the cache file's name: entries of another version are not comparable
TOLERANCE = 0.05  # measured/target latency ratio accepted without another round of refinement
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------- conditions and timing


@dataclass(frozen=True)
class Conditions:
    """What a latency depends on besides the network: device, dtype, threads (CPU) and batch size."""

    device: str = "cpu"
    batch: int = 1
    threads: int = 1
    dtype: str = "float32"

    @classmethod
    def make(cls, device: str = "cpu", batch: int = 1, threads: int | None = None,
             dtype: str | None = None) -> Conditions:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise NetslimError(f"device {device!r} was requested but no CUDA GPU is available")
        if batch < 1:
            raise NetslimError(f"batch size must be at least 1, not {batch}")
        dtype = dtype or ("bfloat16" if dev.type == "cuda" else "float32")
        if dtype not in _DTYPES:
            raise NetslimError(f"unknown dtype {dtype}; choose from {', '.join(_DTYPES)}")
        return cls(str(dev), int(batch), int(threads or torch.get_num_threads()), dtype)

    @property
    def cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"

    def device_name(self) -> str:
        if self.cuda:
            return torch.cuda.get_device_name(torch.device(self.device))
        return platform.processor() or platform.machine()

    def key(self) -> str:
        """File-name-safe identity of the table: device model, torch version, threads, batch, dtype."""
        name = "".join(c if c.isalnum() else "-" for c in self.device_name()).strip("-") or "cpu"
        kind = "cuda" if self.cuda else "cpu"
        torch_version = torch.__version__.split("+")[0]
        return f"{kind}-{name}-torch{torch_version}-t{self.threads}-b{self.batch}-{self.dtype}-v{TABLE_VERSION}"

    def describe(self) -> dict[str, Any]:
        return {"device": self.device, "device_name": self.device_name(), "batch": self.batch,
                "threads": self.threads if not self.cuda else None, "dtype": self.dtype}


class _threads:
    """Set torch's CPU thread count for a block and restore it afterwards."""

    def __init__(self, n: int) -> None:
        self.n, self.saved = n, torch.get_num_threads()

    def __enter__(self) -> None:
        torch.set_num_threads(self.n)

    def __exit__(self, *exc: Any) -> None:
        torch.set_num_threads(self.saved)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare_for(model: nn.Module, cond: Conditions) -> nn.Module:
    fmt = torch.channels_last if cond.cuda else torch.contiguous_format
    return model.to(torch.device(cond.device), _DTYPES[cond.dtype]).eval().to(memory_format=fmt)


def random_input(shape: Sequence[int], cond: Conditions, seed: int = 0) -> torch.Tensor:
    x = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))
    x = x.to(torch.device(cond.device), _DTYPES[cond.dtype])
    return x.contiguous(memory_format=torch.channels_last) if cond.cuda and x.dim() == 4 else x


def interleaved_times(models: Sequence[nn.Module], x: torch.Tensor, *, min_rounds: int = 5, max_rounds: int = 1000,
                      max_seconds: float = 20.0, warmup: int = 2) -> list[list[float]]:
    """Seconds per forward of each model, timed in turns (rotating order) so load changes hit all alike.

    Rounds go on until `max_seconds` have passed (at least `min_rounds`): fast models get hundreds of
    rounds, which a busy machine's bursts need before their median settles.
    """
    dev = x.device
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for m in models:
            for _ in range(warmup):
                m(x)
        _sync(dev)
        began = time.perf_counter()
        for r in range(max_rounds):
            for k in range(len(models)):
                i = (k + r) % len(models)
                t0 = time.perf_counter()
                models[i](x)
                _sync(dev)
                times[i].append(time.perf_counter() - t0)
            if r + 1 >= min_rounds and time.perf_counter() - began > max_seconds:
                break
    return times


def ratio_of(times: list[list[float]], i: int, base: int = 0) -> float:
    """Median over rounds of time[i] / time[base]: each ratio pairs timings taken moments apart."""
    return statistics.median(a / b for a, b in zip(times[i], times[base], strict=True))


def compare_speed(base: nn.Module, small: nn.Module, input_size: Sequence[int], device: str = "cpu",
                  batches: Sequence[int] | None = None, threads: int | None = None,
                  dtypes: Sequence[str] | None = None, max_seconds: float = 8.0) -> list[dict[str, Any]]:
    """Latency and throughput of `small` next to `base`, timed interleaved in this process.

    One row per (dtype, batch): medians in ms, images/s, and speedup = median of per-round
    base/small ratios. Defaults: CPU fp32 at batch 1 and 64; on CUDA, batch 1 and 1024 in fp32 and
    bf16 (channels-last). A batch that does not fit in GPU memory gets an `error` instead of times.
    """
    cuda = torch.device(device).type == "cuda"
    batches = tuple(batches or ((1, 1024) if cuda else (1, 64)))
    dtypes = tuple(dtypes or (("float32", "bfloat16") if cuda else ("float32",)))
    rows: list[dict[str, Any]] = []
    for dtype in dtypes:
        cond = Conditions.make(device, 1, threads, dtype)
        with _threads(cond.threads):
            pair = [prepare_for(copy.deepcopy(m), cond) for m in (base, small)]
            for b in batches:
                row: dict[str, Any] = {**cond.describe(), "batch": int(b)}
                try:
                    times = interleaved_times(pair, random_input((b, *input_size), cond), max_seconds=max_seconds)
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    rows.append(row | {"error": "out of memory"})
                    continue
                base_ms, ms = (statistics.median(t) * 1e3 for t in times)
                rows.append(row | {"base_ms": base_ms, "ms": ms, "speedup": 1 / ratio_of(times, 1),
                                   "base_throughput": b / base_ms * 1e3, "throughput": b / ms * 1e3,
                                   "rounds": len(times[0])})
        del pair
        if cuda:
            torch.cuda.empty_cache()
    return rows


def latency_rows(speed: list[dict[str, Any]], which: str) -> list[dict[str, Any]]:
    """compare_speed rows in measure_latency's format, for the base ("base") or the small model ("small")."""
    out = []
    for r in speed:
        if "error" in r:
            out.append(dict(r) | {"median_ms": None, "throughput": None})
            continue
        ms = r["base_ms"] if which == "base" else r["ms"]
        out.append({"batch": r["batch"], "device": r["device"], "device_name": r["device_name"],
                    "threads": r["threads"], "dtype": r["dtype"], "median_ms": ms,
                    "throughput": r["batch"] / ms * 1e3, "repeats": r["rounds"], "interleaved": True})
    return out


# ---------------------------------------------------------------- the units of a network


@dataclass(frozen=True)
class Unit:
    """One conv/linear layer with the BatchNorm and activation that directly follow it."""

    kind: str  # "conv" | "linear"
    cin: int
    cout: int
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    spatial: tuple[int, ...] = ()  # input H, W per sample (conv) or the leading dims (linear)
    bias: bool = False
    bn: bool = False
    act: str | None = None

    @property
    def depthwise(self) -> bool:
        return self.kind == "conv" and self.groups > 1 and self.groups == self.cin == self.cout

    def signature(self) -> str:
        g = "dw" if self.depthwise else f"g{self.groups}"
        return (f"{self.kind}|k{self.kernel}|s{self.stride}|p{self.padding}|d{self.dilation}|{g}|in{self.spatial}"
                f"|b{int(self.bias)}|bn{int(self.bn)}|{self.act}").replace(" ", "")

    def build(self) -> nn.Module:
        if self.kind == "conv":
            layer: nn.Module = nn.Conv2d(self.cin, self.cout, self.kernel, self.stride, self.padding, self.dilation,
                                         self.groups, self.bias)
        else:
            layer = nn.Linear(self.cin, self.cout, self.bias)
        mods = [layer]
        if self.bn:
            mods.append(nn.BatchNorm2d(self.cout) if self.kind == "conv" else nn.BatchNorm1d(self.cout))
        if self.act:
            mods.append(getattr(nn, self.act)())
        return nn.Sequential(*mods)


def network_units(model: nn.Module, input_size: Sequence[int]) -> list[Unit]:
    """The conv/linear units of `model` in call order, found by tracing one forward (works on meta)."""
    from netslim.probe.points import ACT_TYPES, trace_calls

    p = next(model.parameters())
    calls = trace_calls(model, torch.zeros((1, *input_size), device=p.device, dtype=p.dtype))

    def consumer(i: int, types: tuple) -> int | None:
        out = calls[i].out
        for j in range(i + 1, len(calls)):
            if calls[j].inp is out and calls[j].inp_version == calls[i].out_version:
                return j if isinstance(calls[j].module, types) else None
        return None

    units = []
    for i, call in enumerate(calls):
        m = call.module
        if not isinstance(m, (nn.Conv2d, nn.Linear)) or call.inp is None or call.out is None:
            continue
        j = consumer(i, (_BatchNorm,))
        last = j if j is not None else i
        k = consumer(last, ACT_TYPES)
        act = type(calls[k].module).__name__ if k is not None else None
        if isinstance(m, nn.Conv2d):
            if not isinstance(m.padding, tuple):
                raise NetslimError(f"latency table: padding {m.padding!r} of {call.name!r} is not supported")
            units.append(Unit("conv", m.in_channels, m.out_channels, tuple(m.kernel_size), tuple(m.stride),
                              tuple(m.padding), tuple(m.dilation), m.groups, tuple(call.inp.shape[2:]),
                              m.bias is not None, j is not None, act))
        else:
            units.append(Unit("linear", m.in_features, m.out_features, spatial=tuple(call.inp.shape[1:-1]),
                              bias=m.bias is not None, bn=j is not None, act=act))
    return units


# ---------------------------------------------------------------- the table


REFERENCE = Unit("conv", 32, 32, (3, 3), (1, 1), (1, 1), (1, 1), 1, (16, 16), False, True, "ReLU")
REFERENCE_KEY = "reference"  # ms of REFERENCE when the table was started: the scale of every entry


def default_table_dir() -> Path:
    from netslim.data import default_cache_dir

    return default_cache_dir() / "latency"


class LatencyTable:
    """Per-unit latencies (ms) under one set of Conditions, measured on demand and cached on disk.

    Entries are exact widths, not interpolated: a runtime's kernels make latency a staircase in the
    width (blocked channel layouts, tensor-core tiles), which no smooth fit between widths can see.
    Missing entries are timed together, in turns, so a change of machine load hits them alike.
    """

    def __init__(self, cond: Conditions, cache_dir: Path | None = None, budget_s: float = 2.0) -> None:
        self.cond = cond
        self.path = Path(cache_dir or default_table_dir()) / f"{cond.key()}.json"
        self.budget_s = budget_s  # timing budget per group of new entries
        self.entries: dict[str, float] = self._read()
        self.measured = 0  # entries measured by this instance (the rest came from the cache)

    def _read(self) -> dict[str, float]:
        if not self.path.is_file():
            return {}
        try:
            return {str(k): float(v) for k, v in json.loads(self.path.read_text()).get("entries", {}).items()}
        except (json.JSONDecodeError, OSError, AttributeError, TypeError, ValueError):
            return {}  # a broken cache is rebuilt, not fatal

    def save(self) -> None:
        """Merge this instance's entries into the file (another process may have added some meanwhile)."""
        from netslim.io import atomic_write_text

        self.entries = self._read() | self.entries
        doc = {"conditions": self.cond.describe(), "torch": torch.__version__,
               "entries": dict(sorted(self.entries.items()))}
        atomic_write_text(self.path, json.dumps(doc, indent=0))

    @staticmethod
    def key(unit: Unit) -> str:
        return f"{unit.signature()}|{unit.cin}|{unit.cout}"

    def ensure(self, units: Sequence[Unit], chunk: int = 12) -> None:
        """Time every unit that has no entry yet (in chunks, to bound memory)."""
        missing = list({self.key(u): u for u in units if self.key(u) not in self.entries}.items())
        for i in range(0, len(missing), chunk):
            part = missing[i:i + chunk]
            for (k, _), ms in zip(part, self._time([u for _, u in part]), strict=True):
                self.entries[k] = ms
                self.measured += 1

    def _time(self, units: list[Unit]) -> list[float]:
        """Milliseconds per unit, each round's timing scaled by a reference unit timed in the same round.

        The first reference timing of a table fixes its scale: entries measured later, under another
        load of a shared machine, stay comparable with the earlier ones.
        """
        cond = self.cond
        units = [REFERENCE, *units]
        with _threads(cond.threads), torch.inference_mode():
            mods = [prepare_for(u.build(), cond) for u in units]
            xs = [random_input((cond.batch, u.cin, *u.spatial) if u.kind == "conv" else (cond.batch, *u.spatial, u.cin),
                               cond) for u in units]
            dev = xs[0].device
            inner = []
            for m, x in zip(mods, xs, strict=True):
                m(x)
                _sync(dev)
                t0 = time.perf_counter()
                m(x)
                _sync(dev)
                once = max(time.perf_counter() - t0, 1e-7)
                inner.append(max(1, min(1000, int(2e-3 / once))))  # >= ~2 ms per sample: timer noise is small
            samples: list[list[float]] = [[] for _ in units]
            began = time.perf_counter()
            for r in range(15):
                for k in range(len(units)):
                    i = (k + r) % len(units)
                    t0 = time.perf_counter()
                    for _ in range(inner[i]):
                        mods[i](xs[i])
                    _sync(dev)
                    samples[i].append((time.perf_counter() - t0) / inner[i])
                if r >= 4 and time.perf_counter() - began > self.budget_s:
                    break
        ref = self.entries.setdefault(REFERENCE_KEY, statistics.median(samples[0]) * 1e3)
        return [ref * statistics.median(a / b for a, b in zip(t, samples[0], strict=True)) for t in samples[1:]]

    def unit_ms(self, unit: Unit) -> float:
        self.ensure([unit])
        return self.entries[self.key(unit)]

    def predict(self, units: Sequence[Unit]) -> float:
        """Sum of the units' latencies (ms): the layer work of one forward pass."""
        self.ensure(units)
        return sum(self.entries[self.key(u)] for u in units)


# ---------------------------------------------------------------- the latency target


def timing_model(template: nn.Module, plan: Plan | None, cond: Conditions) -> nn.Module:
    """The planned network with fresh (random) weights on the device: latency does not depend on values."""
    from netslim.surgery.apply import apply_plan

    model = copy.deepcopy(template).to("meta")
    if plan is not None:
        apply_plan(model, plan)
    model = model.to_empty(device=torch.device(cond.device))
    with torch.no_grad():
        for m in model.modules():
            if m is not model and hasattr(m, "reset_parameters"):
                m.reset_parameters()  # Kaiming init and BN stats (mean 0, var 1): no NaN or denormals
    return prepare_for(model, cond)


def _shape_key(plan: Plan) -> str:
    return json.dumps([sorted(plan.widths().items()), sorted(plan.drop), plan.factorize, plan.classes],
                      sort_keys=True, default=str)


class LatencyModel:
    """Predicted and measured latency of Plans of one base network under one set of Conditions."""

    def __init__(self, template: nn.Module, base_plan: Plan, cond: Conditions, cache_dir: Path | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.template, self.cond, self.base_plan = template, cond, base_plan
        self.table = LatencyTable(cond, cache_dir)
        self.log = log or (lambda _msg: None)
        self._units: dict[str, list[Unit]] = {}
        self.base_model = timing_model(template, None, cond)
        x = self._x()
        self.base_ms = statistics.median(interleaved_times([self.base_model], x, min_rounds=5,
                                                           max_seconds=5.0)[0]) * 1e3
        self.base_units_ms = self.table.predict(self.units(base_plan))
        self.table.save()
        self.rest_ms = max(0.0, self.base_ms - self.base_units_ms)  # pooling, adds, the Python between layers

    def _x(self) -> torch.Tensor:
        return random_input((self.cond.batch, *self.base_plan.input_size), self.cond)

    def units(self, plan: Plan) -> list[Unit]:
        from netslim.surgery.apply import apply_plan

        key = _shape_key(plan)
        if key not in self._units:
            model = copy.deepcopy(self.template).to("meta")
            apply_plan(model, plan)
            self._units[key] = network_units(model, plan.input_size)
        return self._units[key]

    def predicted_ratio(self, plan: Plan) -> float:
        return (self.rest_ms + self.table.predict(self.units(plan))) / (self.rest_ms + self.base_units_ms)

    def measured_ratio(self, plan: Plan, max_seconds: float = 10.0) -> tuple[float, float]:
        """(candidate/base latency ratio, candidate ms): interleaved with the base, median of per-round ratios."""
        with _threads(self.cond.threads):
            small = timing_model(self.template, plan, self.cond)
            times = interleaved_times([self.base_model, small], self._x(), min_rounds=7, max_seconds=max_seconds)
        return ratio_of(times, 1), statistics.median(times[1]) * 1e3


def latency_bisect(make_plan: Callable[[float], Plan], target: Any, template: nn.Module | None,
                   lo: float, hi: float, iters: int = 24, timings: int = 8,
                   cache_dir: Path | None = None, seconds_per_timing: float = 10.0) -> Plan:
    """Largest knob whose Plan runs at `target.fraction` of the base's latency, measured on this device.

    First guess: bisect the knob on the table's predicted latency. Then every candidate is timed
    against the base (interleaved) and the knob is corrected on those measurements: regula falsi
    (Illinois) between the closest timings on either side of the target, or, before there are both
    sides, the table's prediction aimed off by the error seen so far (at most 1.5x per step). At most
    `timings` candidates are timed; the one closest to the target wins, and its `meta["latency"]`
    records conditions and measurements.
    """
    if template is None:
        raise NetslimError("a latency target needs the base model (its meta template) to time")
    fraction = float(target.fraction)
    cond = Conditions.make(getattr(target, "device", "cpu") or "cpu", getattr(target, "batch", 1) or 1,
                           getattr(target, "threads", None))
    top = make_plan(hi)
    lat = LatencyModel(template, replace(top, keep={}, drop=[], factorize={}, meta={}), cond, cache_dir)

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
        key = _shape_key(plan)
        if key in plans:
            break  # the correction leads back to a network already timed: the knob cannot resolve finer
        measured, ms = lat.measured_ratio(plan, seconds_per_timing)
        lat.table.save()
        plans[key] = plan
        tried.append({"knob": round(knob, 6), "goal": round(goal, 4),
                      "predicted_ratio": round(lat.predicted_ratio(plan), 4), "measured_ratio": round(measured, 4),
                      "ms": round(ms, 4), "key": key})
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
        elif (knob <= lo and measured > fraction) or (knob >= hi and measured < fraction):
            break  # the knob's range ends here
        else:  # one side only: aim the prediction off by the error measured so far (damped)
            goal = min(1.0, max(1e-3, goal * min(1.5, max(2 / 3, fraction / measured))))
            new = predicted(goal)
            if _shape_key(make_plan(new)) in plans:  # the prediction cannot tell them apart: step the knob
                step = (hi - lo) / 16
                new = min(hi, knob + step) if measured < fraction else max(lo, knob - step)
            knob = new
    final = min(tried, key=lambda t: abs(t["measured_ratio"] - fraction))
    if final["measured_ratio"] > fraction * (1 + 2 * TOLERANCE) and final["knob"] <= lo:
        raise NetslimError(f"target {target} is unreachable on {cond.device_name()}: the smallest network this "
                           f"method builds runs at {final['measured_ratio']:.3f} of the base's latency "
                           f"(batch {cond.batch})")
    plan = copy.deepcopy(plans[final["key"]])
    plan.meta["latency"] = {**cond.describe(), "target": fraction, "base_ms": round(lat.base_ms, 4),
                            "measured_ratio": final["measured_ratio"], "predicted_ratio": final["predicted_ratio"],
                            "table": str(lat.table.path), "table_entries_measured": lat.table.measured,
                            "attempts": [{k: v for k, v in t.items() if k != "key"} for t in tried]}
    return plan


def predicted_vs_measured(template: nn.Module, plans: Sequence[Plan], cond: Conditions,
                          cache_dir: Path | None = None) -> list[dict[str, float]]:
    """How well the table predicts: for each Plan, predicted and measured latency ratios to the base."""
    base_plan = replace(plans[0], keep={}, drop=[], factorize={}, meta={})
    lat = LatencyModel(template, base_plan, cond, cache_dir)
    rows = []
    for p in plans:
        measured, ms = lat.measured_ratio(p)
        rows.append({"predicted": lat.predicted_ratio(p), "measured": measured, "ms": ms})
    lat.table.save()
    return rows


def round_to_default(device: str) -> int:
    """Width rounding when the user gives none: multiples of 8 on CUDA (tensor-core tiles); none on CPU.

    On CPU budgets stay exact by default. Rounding does pay there too on AVX-512 (oneDNN blocks channels
    by 16: benchmarks/results/speed_rounding_cpu.json), so `--round-to 16` is worth passing for speed.
    """
    return 8 if torch.device(device).type == "cuda" else 1


__all__ = ["Conditions", "LatencyTable", "LatencyModel", "Unit", "compare_speed", "interleaved_times",
           "latency_bisect", "latency_rows", "network_units", "round_to_default"]
