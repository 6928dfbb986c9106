"""Is latency a staircase in the channel count on this CPU? Times conv-BN-ReLU units at every width.

Decides the CPU default of `--round-to`: if widths just past a multiple of N cost as much as the
next multiple, rounding kept widths up to N buys filters (accuracy) for free. Units of all widths are
timed in turns (the machine is shared), median of the rounds, one thread.

    python benchmarks/speed_widths.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from netslim.workflows.compress import machine

OUT = Path(__file__).parent / "results" / "speed_widths_cpu.json"


def scan(widths: list[int], batch: int, hw: int, cin: int | None, rounds: int) -> dict[int, float]:
    mods = {w: nn.Sequential(nn.Conv2d(cin or w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()).eval()
            for w in widths}
    xs = {w: torch.randn(batch, cin or w, hw, hw) for w in widths}
    times: dict[int, list[float]] = {w: [] for w in widths}
    with torch.inference_mode():
        for w in widths:
            mods[w](xs[w])
        inner = {}
        for w in widths:
            t0 = time.perf_counter()
            mods[w](xs[w])
            inner[w] = max(1, int(3e-3 / max(time.perf_counter() - t0, 1e-6)))
        for r in range(rounds):
            for w in widths[r % len(widths):] + widths[: r % len(widths)]:
                t0 = time.perf_counter()
                for _ in range(inner[w]):
                    mods[w](xs[w])
                times[w].append((time.perf_counter() - t0) / inner[w] * 1e3)
    return {w: statistics.median(t) for w, t in times.items()}


def block_summary(ms: dict[int, float], block: int) -> dict[str, float]:
    """Mean over widths w of ms(w) / ms(next multiple of `block` >= w): near 1 means a staircase of that step."""
    ratios = [ms[w] / ms[-(-w // block) * block] for w in ms if -(-w // block) * block in ms and w % block]
    return {"block": block, "mean_ratio_to_next_multiple": statistics.mean(ratios) if ratios else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    widths = list(range(8, 65, 4 if args.quick else 1))
    settings = [(1, 32, None), (1, 16, 64), (32, 16, None)]
    rows = []
    for batch, hw, cin in settings:
        ms = scan(widths, batch, hw, cin, 5 if args.quick else 9)
        rows.append({"batch": batch, "hw": hw, "cin": cin or "= width", "ms": ms,
                     "staircase": [block_summary(ms, b) for b in (4, 8, 16)]})
        print(f"batch {batch} {hw}x{hw} cin {cin or 'w'}: " + " ".join(f"{w}:{v:.3f}" for w, v in ms.items()),
              file=sys.stderr)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                               "machine": machine(), "torch": torch.__version__,
                               "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": args.threads,
                               "command": " ".join(["python", *sys.argv]), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
