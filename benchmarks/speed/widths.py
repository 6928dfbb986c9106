"""Is latency a staircase in the channel count on this CPU? Times conv-BN-ReLU units at every width.

Decides the CPU default of `--round-to`: if widths just past a multiple of N cost as much as the
next multiple, rounding kept widths up to N buys filters (accuracy) for free. Units of all widths are
timed in turns (the machine is shared), median of the rounds, one thread.

    python -m benchmarks.speed.widths [--quick]
"""

from __future__ import annotations

import statistics

import torch
from torch import nn

from benchmarks._common import log, parser, stamp, start, write
from netslim.cost.timing import calls_per_timing, interleaved_times


def scan(widths: list[int], batch: int, hw: int, cin: int | None, rounds: int) -> dict[int, float]:
    mods = {w: nn.Sequential(nn.Conv2d(cin or w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()).eval()
            for w in widths}
    xs = [torch.randn(batch, cin or w, hw, hw) for w in widths]
    models = [mods[w] for w in widths]
    calls = calls_per_timing(models, xs, seconds=3e-3, most=10**6)
    times = interleaved_times(models, xs, min_rounds=rounds, max_rounds=rounds, warmup=0, calls=calls)
    return {w: statistics.median(t) * 1e3 for w, t in zip(widths, times, strict=True)}


def block_summary(ms: dict[int, float], block: int) -> dict[str, float]:
    """Mean over widths w of ms(w) / ms(next multiple of `block` >= w): near 1 means a staircase of that step."""
    ratios = [ms[w] / ms[-(-w // block) * block] for w in ms if -(-w // block) * block in ms and w % block]
    return {"block": block, "mean_ratio_to_next_multiple": statistics.mean(ratios) if ratios else float("nan")}


def main() -> None:
    ap = parser(__doc__, out="speed_widths_cpu.json", threads=1)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    start(args)
    widths = list(range(8, 65, 4 if args.quick else 1))
    settings = [(1, 32, None), (1, 16, 64), (32, 16, None)]
    rows = []
    for batch, hw, cin in settings:
        ms = scan(widths, batch, hw, cin, 5 if args.quick else 9)
        rows.append({"batch": batch, "hw": hw, "cin": cin or "= width", "ms": ms,
                     "staircase": [block_summary(ms, b) for b in (4, 8, 16)]})
        log(f"batch {batch} {hw}x{hw} cin {cin or 'w'}: " + " ".join(f"{w}:{v:.3f}" for w, v in ms.items()))
    write(args.out, {**stamp(args), "cpu_capability": torch.backends.cpu.get_cpu_capability(), "rows": rows})


if __name__ == "__main__":
    main()
