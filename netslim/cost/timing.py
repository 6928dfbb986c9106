"""How fast a model is: the one timing engine behind every latency netslim reports.

Every clock reading goes through `interleaved_times`: models are timed in turns, rotating the order
each round, so a shared machine's changes of load hit them alike; CUDA is synchronised around every
timed call. Thread counts are set for a block and restored by `cpu_threads`, and models and inputs
are placed by `prepare_for` / `random_input`, so the per-layer table, the latency-target search,
`compare_speed`, `measure_latency` and the export check all measure under the same rules.
"""

from __future__ import annotations

import copy
import platform
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from netslim.cost.size import placement, sample_shape
from netslim.errors import NetslimError
from netslim.runtime.forms import as_runtime, check_runtime

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Conditions:
    """What a latency depends on besides the network: device, dtype, threads (CPU), batch size and the runtime
    that runs it (netslim.runtime.forms: eager PyTorch, or onnxruntime fp32 or int8 on the CPU)."""

    device: str = "cpu"
    batch: int = 1
    threads: int = 1
    dtype: str = "float32"
    runtime: str = "torch"

    @classmethod
    def make(cls, device: str = "cpu", batch: int = 1, threads: int | None = None,
             dtype: str | None = None, runtime: str = "torch") -> Conditions:
        dev = torch.device(device)
        check_runtime(runtime, str(dev))
        if runtime != "torch" and dtype not in (None, "float32"):
            raise NetslimError(f"runtime {runtime} takes float32 inputs, not {dtype}")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise NetslimError(f"device {device!r} was requested but no CUDA GPU is available")
        if batch < 1:
            raise NetslimError(f"batch size must be at least 1, not {batch}")
        dtype = dtype or ("bfloat16" if dev.type == "cuda" else "float32")
        if dtype not in DTYPES:
            raise NetslimError(f"unknown dtype {dtype}; choose from {', '.join(DTYPES)}")
        return cls(str(dev), int(batch), int(threads or torch.get_num_threads()), dtype, runtime)

    @property
    def cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"

    def device_name(self) -> str:
        if self.cuda:
            return torch.cuda.get_device_name(torch.device(self.device))
        return platform.processor() or platform.machine()

    def key(self) -> str:
        """File-name-safe identity of these conditions: device model, torch version, threads, batch, dtype (and the
        runtime when it is not eager PyTorch: the names of existing tables stay as they were)."""
        name = "".join(c if c.isalnum() else "-" for c in self.device_name()).strip("-") or "cpu"
        kind = "cuda" if self.cuda else "cpu"
        torch_version = torch.__version__.split("+")[0]
        runtime = "" if self.runtime == "torch" else f"-{self.runtime}"
        return f"{kind}-{name}-torch{torch_version}-t{self.threads}-b{self.batch}-{self.dtype}{runtime}"

    def describe(self) -> dict[str, Any]:
        return {"device": self.device, "device_name": self.device_name(), "batch": self.batch,
                "threads": self.threads if not self.cuda else None, "dtype": self.dtype, "runtime": self.runtime}


@contextmanager
def cpu_threads(n: int | None) -> Iterator[int]:
    """Run a block with torch on `n` CPU threads (None: as it is), restoring the count afterwards."""
    saved = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(saved)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that the clock reads finished work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare_for(model: nn.Module, cond: Conditions, *, channels_last: bool | None = None) -> nn.Module:
    """`model` itself, moved to the conditions' device and dtype, in eval mode; channels-last on CUDA
    (`channels_last` decides otherwise)."""
    fmt = torch.channels_last if (cond.cuda if channels_last is None else channels_last) else torch.contiguous_format
    return model.to(torch.device(cond.device), DTYPES[cond.dtype]).eval().to(memory_format=fmt)


def random_input(shape: Sequence[int], cond: Conditions, seed: int = 0) -> torch.Tensor:
    """A seeded standard-normal batch of `shape` placed like `prepare_for` places models."""
    x = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))
    x = x.to(torch.device(cond.device), DTYPES[cond.dtype])
    return x.contiguous(memory_format=torch.channels_last) if cond.cuda and x.dim() == 4 else x


def interleaved_times(models: Sequence[nn.Module], x: torch.Tensor | Sequence[torch.Tensor], *, min_rounds: int = 5,
                      max_rounds: int = 1000, max_seconds: float = 20.0, warmup: int = 2,
                      calls: Sequence[int] | None = None, warmup_in_budget: bool = False) -> list[list[float]]:
    """Seconds per forward of each model, timed in turns (rotating order) so load changes hit all alike.

    Rounds go on until `max_seconds` have passed (at least `min_rounds`): fast models get hundreds of
    rounds, which a busy machine's bursts need before their median settles. `x` is one input for all
    models or one per model; `calls[i]` forward calls make one timing of model i (default 1), so that
    fast layers are timed well above the clock's resolution. With `warmup_in_budget` the warm-up
    counts against `max_seconds` and stops once it is spent.
    """
    if not models:
        return []
    xs = list(x) if isinstance(x, Sequence) else [x] * len(models)
    reps = list(calls) if calls is not None else [1] * len(models)
    dev = xs[0].device
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        began = time.perf_counter()
        for m, xi in zip(models, xs, strict=True):
            for _ in range(warmup):  # first calls allocate memory and, on CUDA, pick kernels
                m(xi)
                if warmup_in_budget and time.perf_counter() - began > max_seconds:
                    break
        sync(dev)
        if not warmup_in_budget:
            began = time.perf_counter()
        for r in range(max_rounds):
            for k in range(len(models)):
                i = (k + r) % len(models)
                t0 = time.perf_counter()
                for _ in range(reps[i]):
                    models[i](xs[i])
                sync(dev)
                times[i].append((time.perf_counter() - t0) / reps[i])
            if r + 1 >= min_rounds and time.perf_counter() - began > max_seconds:
                break
    return times


def calls_per_timing(models: Sequence[nn.Module], xs: Sequence[torch.Tensor], *, seconds: float = 2e-3,
                     most: int = 1000) -> list[int]:
    """Forward calls that make a timing of about `seconds` for each model (after one warm-up call each)."""
    dev = xs[0].device
    calls = []
    with torch.inference_mode():
        for m, x in zip(models, xs, strict=True):
            m(x)
            sync(dev)
            t0 = time.perf_counter()
            m(x)
            sync(dev)
            once = max(time.perf_counter() - t0, 1e-7)
            calls.append(max(1, min(most, int(seconds / once))))
    return calls


def ratio_of(times: list[list[float]], i: int, base: int = 0) -> float:
    """Median over rounds of time[i] / time[base]: each ratio pairs timings taken moments apart."""
    return statistics.median(a / b for a, b in zip(times[i], times[base], strict=True))


def _defaults(cuda: bool, batches: Sequence[int] | None,
              dtypes: Sequence[str] | None) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Batches (1, 64) in float32 on CPU; (1, 1024) in float32 and bfloat16 on CUDA."""
    return (tuple(batches or ((1, 1024) if cuda else (1, 64))),
            tuple(dtypes or (("float32", "bfloat16") if cuda else ("float32",))))


def compare_speed(base: nn.Module, small: nn.Module, input_size: Sequence[int], device: str = "cpu",
                  batches: Sequence[int] | None = None, threads: int | None = None, *,
                  dtypes: Sequence[str] | None = None, max_seconds: float = 8.0,
                  runtime: str = "torch") -> list[dict[str, Any]]:
    """Latency and throughput of `small` next to `base`, timed interleaved in this process.

    One row per (dtype, batch): medians in ms, images/s, and speedup = median of per-round
    base/small ratios. Defaults: CPU fp32 at batch 1 and 64; on CUDA, batch 1 and 1024 in fp32 and
    bf16 (channels-last). A batch that does not fit in GPU memory gets an `error` instead of times.
    `runtime` onnx or onnx-int8: both networks as onnxruntime runs them (netslim.runtime.forms; fp32 inputs).
    """
    cuda = torch.device(device).type == "cuda"
    batches, dtypes = _defaults(cuda, batches, None if runtime != "torch" else dtypes)
    rows: list[dict[str, Any]] = []
    for dtype in dtypes:
        cond = Conditions.make(device, 1, threads, dtype, runtime)
        with cpu_threads(cond.threads):
            pair = [as_runtime(prepare_for(copy.deepcopy(m), cond), runtime, input_size, cond.threads)
                    for m in (base, small)]
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
                    "threads": r["threads"], "dtype": r["dtype"], "runtime": r.get("runtime", "torch"), "median_ms": ms,
                    "throughput": r["batch"] / ms * 1e3, "repeats": r["rounds"], "interleaved": True})
    return out


def measure_latency(
    model: nn.Module,
    input_shape: Sequence[int],
    batch_sizes: Sequence[int] | None = None,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    *,
    warmup: int = 5,
    repeats: int = 20,
    dtypes: Sequence[str] | None = None,
    max_seconds: float = 20.0,
) -> list[dict[str, Any]]:
    """Median forward time per (dtype, batch size) of an eval-mode copy under inference_mode.

    Defaults: batches (1, 64) in float32 on CPU; (1, 1024) in float32 and bfloat16 (channels-last) on
    CUDA, synchronising around every call. Each setting gets at most `max_seconds`, warm-up included;
    `repeats` in the result says how many timings were taken. Times are in milliseconds, p10/p90 are
    percentiles, throughput is images per second at the median. A batch that does not fit in GPU
    memory is reported with `error` instead of times.
    """
    from netslim.train.distributed import resolve_device

    shape = sample_shape(input_shape)
    dev = resolve_device(device)
    if placement(model)[0].type == "meta":
        raise NetslimError("cannot time a model without weights (it lives on the meta device)")
    cuda = dev.type == "cuda"
    batch_sizes, dtypes = _defaults(cuda, batch_sizes, dtypes)
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        raise NetslimError(f"unknown dtype {unknown[0]}; choose from {', '.join(DTYPES)}")
    name = Conditions(str(dev)).device_name()
    results: list[dict[str, Any]] = []
    with cpu_threads(threads) as n_threads:
        for dtype in dtypes:
            cond = Conditions(str(dev), 1, n_threads, dtype)
            net = prepare_for(copy.deepcopy(model), cond, channels_last=cuda and len(shape) == 3)
            for batch in batch_sizes:
                row: dict[str, Any] = {"batch": int(batch), "device": str(dev), "device_name": name,
                                       "threads": n_threads, "dtype": dtype}
                try:
                    (times,) = interleaved_times([net], random_input((batch, *shape), cond), min_rounds=1,
                                                 max_rounds=max(repeats, 1), max_seconds=max_seconds, warmup=warmup,
                                                 warmup_in_budget=True)
                except torch.cuda.OutOfMemoryError:
                    row |= {"error": "out of memory", "median_ms": None, "p10": None, "p90": None,
                            "throughput": None, "repeats": 0}
                    torch.cuda.empty_cache()
                else:
                    p10, median, p90 = (float(v) * 1e3 for v in np.percentile(times, [10, 50, 90]))
                    row |= {"median_ms": median, "p10": p10, "p90": p90, "throughput": batch / (median / 1e3),
                            "repeats": len(times)}
                results.append(row)
            del net
            if cuda:
                torch.cuda.empty_cache()
    return results
