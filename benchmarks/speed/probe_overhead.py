"""Cost of collecting response statistics compared with plain inference (VGG-16-BN, CIFAR-10, CPU).

Times plain inference and collect() over all conv layers on the same pre-built batches, repeats
interleaved, medians reported. Peak memory is measured in a fresh subprocess per image count: the
kernel's RSS high-water mark (VmHWM, reset through /proc/self/clear_refs after loading the data) during
a plain pass and during collect(); if collect() kept activations, its extra peak would grow with the
number of images. Linux only (the reset needs /proc).

    python -m benchmarks.speed.probe_overhead [--weights ...] [--data ...] [--threads 1]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks._common import REPO, parser, stamp, start, trained, write


def load_images(data: Path, n: int):
    from netslim.data import calibration_subset, load_dataset

    return calibration_subset(load_dataset(str(data), "train"), n, seed=0)


def conv_layers(model: torch.nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]


def plain_pass(model: torch.nn.Module, batches) -> None:
    with torch.no_grad():
        for x, _ in batches:
            model(x)


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): on a shared machine the CPU time is the steadier one."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def proc_status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0  # kB
    raise RuntimeError(f"{field} missing from /proc/self/status")


def peak_rss_mb(fn) -> tuple[float, float]:
    """(RSS before, RSS high-water mark while fn runs), in MiB."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = proc_status_mb("VmRSS")
    fn()
    return before, proc_status_mb("VmHWM")


def memory_child(args: argparse.Namespace) -> None:
    """One setting in a fresh process: peak RSS of a plain pass, then of collect() in each mode."""
    from netslim.data import batches
    from netslim.probe import collect

    start(args)
    model = trained(weights=args.weights)[0]
    data = batches(load_images(args.data, args.memory_child), args.batch)
    layers = conv_layers(model)
    plain_pass(model, data)  # warm-up: allocator pools, lazily built kernels
    before, plain = peak_rss_mb(lambda: plain_pass(model, data))
    out = {"images": args.memory_child, "rss_before_mb": round(before, 1), "peak_plain_mb": round(plain, 1)}
    for mode in ("max", "spatial"):
        _, peak = peak_rss_mb(lambda mode=mode: collect(model, data, layers=layers, reduce=mode))
        out[f"peak_collect_{mode}_mb"] = round(peak, 1)
        out[f"extra_{mode}_mb"] = round(peak - plain, 1)
    print(json.dumps(out))


def measure_memory(args: argparse.Namespace, n: int) -> dict:
    cmd = [
        sys.executable,
        "-m",
        __spec__.name,  # this module, run from the repository root
        "--memory-child",
        str(n),
        "--weights",
        str(args.weights),
        "--data",
        str(args.data),
        "--batch",
        str(args.batch),
        "--threads",
        str(args.threads),
    ]
    # Every allocation above 64 KiB gets its own mapping, returned on free: RSS then tracks live memory
    # instead of whatever glibc's heap happened to retain from earlier passes.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env, cwd=REPO)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = parser(__doc__, out="probe_overhead_cpu.json", threads=1, inputs=True)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory-child", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        memory_child(args)
        return

    from netslim.data import batches
    from netslim.probe import collect

    start(args)
    model = trained(weights=args.weights)[0]
    ds = load_images(args.data, args.images)
    data = list(batches(ds, args.batch))  # decoded and normalised once, outside every timed region
    layers = conv_layers(model)
    plain_pass(model, data[:1])
    collect(model, data[:1], layers=layers)

    runs = {
        "plain": lambda: plain_pass(model, data),
        "collect_max": lambda: collect(model, data, layers=layers, reduce="max"),
        "collect_spatial": lambda: collect(model, data, layers=layers, reduce="spatial"),
    }
    wall: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            w, c = timed(fn)
            wall[name].append(w)
            cpu[name].append(c)
    med_wall = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}

    memory = [measure_memory(args, n) for n in (500, args.images)]
    result = {
        "benchmark": "probe_overhead",
        **stamp(args),
        "setup": {
            "model": "vgg16_bn",
            "weights": args.weights.name,
            "data": args.data.name,
            "images": len(ds),
            "batch": args.batch,
            "repeats": args.repeats,
            "threads": args.threads,
            "layers": len(layers),
            "device": "cpu",
        },
        "wall_seconds": {k: [round(t, 3) for t in v] for k, v in wall.items()},
        "cpu_seconds": {k: [round(t, 3) for t in v] for k, v in cpu.items()},
        "median_wall_seconds": {k: round(v, 3) for k, v in med_wall.items()},
        "median_cpu_seconds": {k: round(v, 3) for k, v in med_cpu.items()},
        "ratio_max": round(med_wall["collect_max"] / med_wall["plain"], 3),
        "ratio_spatial": round(med_wall["collect_spatial"] / med_wall["plain"], 3),
        "ratio_max_cpu_time": round(med_cpu["collect_max"] / med_cpu["plain"], 3),
        "ratio_spatial_cpu_time": round(med_cpu["collect_spatial"] / med_cpu["plain"], 3),
        "goal_ratio_max": 1.3,
        "memory_mb": memory,
        "memory_note": "peak RSS (VmHWM) per pass in a fresh process, MALLOC_MMAP_THRESHOLD_=65536; "
        "extra_* = collect peak minus plain-inference peak",
    }
    write(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
