"""How big and how fast a model is: parameters, MACs/FLOPs, measured latency, storage bytes.

FLOPs come from torch.utils.flop_counter.FlopCounterMode, which counts a multiply-add as 2 FLOPs
(convolutions and matmuls only); MACs are reported beside them because the papers quote MACs.
Factorized or sparse layers are ordinary modules, so they are counted as the dense ops they run.
"""

from __future__ import annotations

import copy
import math
import platform
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from netslim.errors import NetslimError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class FlopCount(NamedTuple):
    """(flops, macs); also indexable by name, so `count_flops(...)["macs"]` works as well as unpacking."""

    flops: int
    macs: int

    def __getitem__(self, key: Any) -> Any:  # type: ignore[override]
        return getattr(self, key) if isinstance(key, str) else tuple.__getitem__(self, key)

    def as_dict(self) -> dict[str, int]:
        return {"flops": self.flops, "macs": self.macs}


def _shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s < 1 for s in shape):
        raise NetslimError(f"input shape must be positive sizes without the batch, e.g. (3, 32, 32); got {input_shape}")
    return shape


def _placement(model: nn.Module) -> tuple[torch.device, torch.dtype]:
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
    shape = _shape(input_shape)
    try:
        net = copy.deepcopy(model)
    except Exception:  # some modules refuse deepcopy; fall back to the original and restore its mode
        net = model
    was_training = net.training
    device, dtype = _placement(net)
    net.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            net(torch.zeros((1, *shape), device=device, dtype=dtype))
    except (RuntimeError, ValueError, TypeError) as exc:
        raise NetslimError(f"the model does not accept an input of shape {shape}: {exc}") from exc
    finally:
        net.train(was_training)
    flops = int(counter.get_total_flops())
    return FlopCount(flops=flops, macs=flops // 2)


def storage_bytes(model: nn.Module, bits: int = 32, *, buffers: bool = True, sparse: bool = False) -> int:
    """Bytes to store the weights at `bits` per value.

    Dense by default: every parameter, plus floating buffers (BatchNorm statistics) since inference
    needs them. sparse=True stores only non-zero values plus a 1-bit occupancy mask per entry, and
    never more than the dense size.
    """
    tensors = list(model.parameters())
    if buffers:
        tensors += [b for b in model.buffers() if b.is_floating_point()]
    total = 0
    for t in tensors:
        dense = t.numel() * bits
        if sparse and not t.is_meta:
            dense = min(dense, int(torch.count_nonzero(t.detach())) * bits + t.numel())
        total += dense
    return math.ceil(total / 8)


def _time_one(net: nn.Module, x: torch.Tensor, warmup: int, repeats: int, max_seconds: float) -> list[float]:
    """Seconds per forward pass; stops early once `max_seconds` (warm-up included) is spent."""
    cuda = x.device.type == "cuda"
    began = time.perf_counter()
    for _ in range(warmup):  # first calls allocate memory and, on CUDA, pick kernels
        net(x)
        if time.perf_counter() - began > max_seconds:
            break
    if cuda:
        torch.cuda.synchronize(x.device)
    times: list[float] = []
    while len(times) < repeats:
        start = time.perf_counter()
        net(x)
        if cuda:
            torch.cuda.synchronize(x.device)
        times.append(time.perf_counter() - start)
        if time.perf_counter() - began > max_seconds:
            break
    return times


def measure_latency(
    model: nn.Module,
    input_shape: Sequence[int],
    batch_sizes: Sequence[int] | None = None,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    warmup: int = 5,
    repeats: int = 20,
    *,
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
    shape = _shape(input_shape)
    from netslim.train.distributed import resolve_device

    dev = resolve_device(device)
    if _placement(model)[0].type == "meta":
        raise NetslimError("cannot time a model without weights (it lives on the meta device)")
    cuda = dev.type == "cuda"
    batch_sizes = tuple(batch_sizes or ((1, 1024) if cuda else (1, 64)))
    dtypes = tuple(dtypes or (("float32", "bfloat16") if cuda else ("float32",)))
    unknown = [d for d in dtypes if d not in _DTYPES]
    if unknown:
        raise NetslimError(f"unknown dtype {unknown[0]}; choose from {', '.join(_DTYPES)}")
    saved_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    name = torch.cuda.get_device_name(dev) if cuda else (platform.processor() or platform.machine())
    results: list[dict[str, Any]] = []
    gen = torch.Generator().manual_seed(0)
    try:
        for dtype_name in dtypes:
            dtype = _DTYPES[dtype_name]
            fmt = torch.channels_last if cuda and len(shape) == 3 else torch.contiguous_format
            net = copy.deepcopy(model).to(dev, dtype).eval().to(memory_format=fmt)
            for batch in batch_sizes:
                row: dict[str, Any] = {
                    "batch": int(batch),
                    "device": str(dev),
                    "device_name": name,
                    "threads": torch.get_num_threads(),
                    "dtype": dtype_name,
                }
                try:
                    x = torch.randn((batch, *shape), generator=gen).to(dev, dtype)
                    if x.dim() == 4:
                        x = x.contiguous(memory_format=fmt)
                    with torch.inference_mode():
                        times = _time_one(net, x, warmup, max(repeats, 1), max_seconds)
                except torch.cuda.OutOfMemoryError:
                    row |= {
                        "error": "out of memory",
                        "median_ms": None,
                        "p10": None,
                        "p90": None,
                        "throughput": None,
                        "repeats": 0,
                    }
                    torch.cuda.empty_cache()
                else:
                    p10, median, p90 = (float(v) * 1e3 for v in np.percentile(times, [10, 50, 90]))
                    row |= {
                        "median_ms": median,
                        "p10": p10,
                        "p90": p90,
                        "throughput": batch / (median / 1e3),
                        "repeats": len(times),
                    }
                results.append(row)
            del net
            if cuda:
                torch.cuda.empty_cache()
    finally:
        torch.set_num_threads(saved_threads)
    return results


latency = measure_latency


def summary(
    model: nn.Module,
    input_shape: Sequence[int],
    latency: bool = True,
    device: str | torch.device = "cpu",
    **latency_kwargs: Any,
) -> dict[str, Any]:
    """Everything a run reports about a model's cost: params (total and non-zero), MACs, FLOPs,
    dense fp32 storage bytes and, when `latency` is true, the measure_latency rows."""
    count = count_flops(model, input_shape)
    return {
        "params": count_params(model),
        "nonzero_params": count_params(model, nonzero=True),
        "macs": count.macs,
        "flops": count.flops,
        "storage_bytes": storage_bytes(model),
        "latency": measure_latency(model, input_shape, device=device, **latency_kwargs) if latency else [],
    }
