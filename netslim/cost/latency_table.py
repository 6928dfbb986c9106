"""Predicted latency: a per-unit table per device, kept on disk, and the predictions made from it.

A network's latency is predicted as the sum of its units (netslim.cost.units) plus what the base
spends outside them (pooling, adds, Python). Entries are exact widths, measured the first time they
are needed and cached on disk, one file per device / torch version / threads / batch / dtype, so a
device's table is built once and shared by every model, method and run. The prediction aims the
latency-target search (netslim.cost.targets); the clock (netslim.cost.timing) decides. The table is of
eager PyTorch whatever the target's runtime: for onnxruntime it only aims the first guess, and every
network the search keeps or rejects is timed on the target's own runtime, next to the base on it.
"""

from __future__ import annotations

import copy
import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from netslim.cost.timing import (
    Conditions,
    calls_per_timing,
    cpu_threads,
    interleaved_times,
    prepare_for,
    random_input,
    ratio_of,
)
from netslim.cost.units import REFERENCE, Unit, network_units
from netslim.plan import Plan
from netslim.runtime.forms import as_runtime

TABLE_VERSION = 2  # in the cache file's name: entries of another version are not comparable
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

    def __init__(self, cond: Conditions, cache_dir: Path | None = None, *, budget_s: float = 2.0) -> None:
        self.cond = cond
        self.path = Path(cache_dir or default_table_dir()) / f"{cond.key()}-v{TABLE_VERSION}.json"
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
        load of a shared machine, stay comparable with the earlier ones. Each timing repeats a unit for
        about 2 ms, so timer noise stays small.
        """
        cond = self.cond
        units = [REFERENCE, *units]
        with cpu_threads(cond.threads):
            mods = [prepare_for(u.build(), cond) for u in units]
            xs = [random_input(u.input_shape(cond.batch), cond) for u in units]
            samples = interleaved_times(mods, xs, min_rounds=5, max_rounds=15, max_seconds=self.budget_s, warmup=0,
                                        calls=calls_per_timing(mods, xs))
        ref = self.entries.setdefault(REFERENCE_KEY, statistics.median(samples[0]) * 1e3)
        return [ref * statistics.median(a / b for a, b in zip(t, samples[0], strict=True)) for t in samples[1:]]

    def predict(self, units: Sequence[Unit]) -> float:
        """Sum of the units' latencies (ms): the layer work of one forward pass."""
        self.ensure(units)
        return sum(self.entries[self.key(u)] for u in units)


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


def shape_key(plan: Plan) -> str:
    """What a Plan's latency depends on (its layer shapes), not which filters it keeps."""
    return json.dumps([sorted(plan.widths().items()), sorted(plan.drop), plan.factorize, plan.classes],
                      sort_keys=True, default=str)


class LatencyModel:
    """Predicted (eager PyTorch's table) and measured (on the conditions' runtime) latency of Plans of one base
    network under one set of Conditions."""

    def __init__(self, template: nn.Module, base_plan: Plan, cond: Conditions, *, cache_dir: Path | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.template, self.cond, self.base_plan = template, cond, base_plan
        eager = replace(cond, runtime="torch")
        self.table = LatencyTable(eager, cache_dir)
        self.log = log or (lambda _msg: None)
        self._units: dict[str, list[Unit]] = {}
        self.base_model = timing_model(template, None, eager)
        x = self._x()
        self.base_ms = statistics.median(interleaved_times([self.base_model], x, min_rounds=5,
                                                           max_seconds=5.0)[0]) * 1e3  # eager, the table's scale
        self.base_units_ms = self.table.predict(self.units(base_plan))
        self.table.save()
        self.rest_ms = max(0.0, self.base_ms - self.base_units_ms)  # pooling, adds, the Python between layers
        self.base_run = self._on_runtime(self.base_model)

    def _x(self) -> torch.Tensor:
        return random_input((self.cond.batch, *self.base_plan.input_size), self.cond)

    def units(self, plan: Plan) -> list[Unit]:
        from netslim.surgery.apply import apply_plan

        key = shape_key(plan)
        if key not in self._units:
            model = copy.deepcopy(self.template).to("meta")
            apply_plan(model, plan)
            self._units[key] = network_units(model, plan.input_size)
        return self._units[key]

    def predicted_ratio(self, plan: Plan) -> float:
        return (self.rest_ms + self.table.predict(self.units(plan))) / (self.rest_ms + self.base_units_ms)

    def _on_runtime(self, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        with cpu_threads(self.cond.threads):
            return as_runtime(model, self.cond.runtime, self.base_plan.input_size, self.cond.threads)

    def measured_ratio(self, plan: Plan, max_seconds: float = 10.0) -> tuple[float, float, float]:
        """(candidate/base latency ratio, candidate ms, base ms) on the conditions' runtime: the two timed in
        turns, the ratio the median of per-round ratios."""
        small = self._on_runtime(timing_model(self.template, plan, self.cond))
        with cpu_threads(self.cond.threads):
            times = interleaved_times([self.base_run, small], self._x(), min_rounds=7, max_seconds=max_seconds)
        return ratio_of(times, 1), statistics.median(times[1]) * 1e3, statistics.median(times[0]) * 1e3


def round_to_default(device: str) -> int:
    """Width rounding when the user gives none: multiples of 8 on CUDA (tensor-core tiles); none on CPU.

    On CPU budgets stay exact by default. Rounding does pay there too on AVX-512 (oneDNN blocks channels
    by 16: benchmarks/results/speed_rounding_cpu.json), so `--round-to 16` is worth passing for speed.
    """
    return 8 if torch.device(device).type == "cuda" else 1
