"""Does pruning make the shared networks faster for real? PFA with width rounding vs torch-pruning's L1.

ResNet-56 at 2.36x fewer FLOPs (flops=0.42) and VGG-16 at 1/8 of the parameters (params=0.125):
PFA-En meeting the budget with kept widths rounded to multiples of 1, 8 and 16, and torch-pruning's
uniform L1 (tp-l1, widths as they fall). The base and every result are timed in turns in one
process (the machine is shared), CPU fp32 at batch 1 and 64 with the thread count stated; speedup is
the median of per-round base/result ratios, and speedup ÷ FLOP reduction says how much of the FLOP
saving turns into time. Accuracy right after surgery (no fine-tuning) on a test subset is reported.

    python -m benchmarks.speed.rounding [--threads 1] [--models resnet56,vgg16_bn]
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from benchmarks._common import cifar10, log, parser, stamp, start, trained, write
from netslim import parse_target
from netslim.cost.size import count_flops, count_params
from netslim.cost.timing import cpu_threads, interleaved_times, ratio_of
from netslim.data import calibration_subset
from netslim.errors import NetslimError
from netslim.methods import AnalysisCache
from netslim.surgery.apply import apply_plan
from netslim.workflows.stages import accuracy, analyse

TARGETS = {"resnet56": "flops=0.42", "vgg16_bn": "params=0.125"}  # the shared networks and their budgets
VARIANTS = [("pfa-en", 1), ("pfa-en", 8), ("pfa-en", 16), ("tp-l1", 1)]


def run_model(arch: str, train, test, threads: int, calib: int, max_seconds: float) -> dict:  # noqa: ANN001
    target_text = TARGETS[arch]
    target = parse_target(target_text)
    base, _, _ = trained(arch)
    base.eval()
    size = (3, 32, 32)
    base_flops, base_params = count_flops(base, size).flops, count_params(base)
    cache = AnalysisCache()  # shared analysis: one statistics pass for every variant
    rows, models, skipped = [], [base], []
    for method, step in VARIANTS:
        t0 = time.perf_counter()
        try:
            plan = analyse(base, arch, train, method, target, {"round_to": step}, "cpu", calib, cache=cache)[0].plan
        except NetslimError as e:  # e.g. every width a multiple of 16 cannot go that small
            log(f"{arch} {method} round_to={step}: {e}")
            skipped.append({"method": method, "round_to": step, "error": str(e)})
            continue
        small = apply_plan(copy.deepcopy(base), plan).eval()
        widths = sorted(plan.widths().values())
        row = {"method": method, "round_to": step, "flops": count_flops(small, size).flops,
               "params": count_params(small), "plan_meta": plan.meta,
               "widths_multiple_of_8": sum(w % 8 == 0 for w in widths), "pruned_layers": len(widths),
               "accuracy_after_surgery": accuracy(small, test, "cpu"), "analysis_seconds": time.perf_counter() - t0}
        row["flop_reduction"] = base_flops / row["flops"]
        log(f"{arch} {method} round_to={step}: {row['flop_reduction']:.2f}x fewer FLOPs, "
            f"params {row['params'] / base_params:.3f}, acc after surgery {row['accuracy_after_surgery']:.4f}")
        rows.append(row)
        models.append(small)
    timings = []
    with cpu_threads(threads):
        for batch in (1, 64):
            x = torch.randn(batch, *size, generator=torch.Generator().manual_seed(0))
            times = interleaved_times(models, x, min_rounds=7, max_rounds=60, max_seconds=max_seconds)
            base_ms = statistics.median(times[0]) * 1e3
            for i, row in enumerate(rows, start=1):
                speedup = 1 / ratio_of(times, i)
                row[f"batch{batch}"] = {"base_ms": base_ms, "ms": statistics.median(times[i]) * 1e3,
                                        "speedup": speedup, "rounds": len(times[i]),
                                        "speedup_per_flop_reduction": speedup / row["flop_reduction"]}
                log(f"  batch {batch}: {row['method']} round_to={row['round_to']}: base {base_ms:.2f} ms, "
                    f"{row[f'batch{batch}']['ms']:.2f} ms, speedup {speedup:.2f}x "
                    f"(÷ FLOP reduction {speedup / row['flop_reduction']:.2f})")
            timings.append({"batch": batch, "base_ms": base_ms, "rounds": len(times[0])})
    return {"arch": arch, "target": target_text, "base_flops": base_flops, "base_params": base_params,
            "base_accuracy": accuracy(base, test, "cpu"), "timings": timings, "rows": rows, "not_met": skipped}


def main() -> None:
    ap = parser(__doc__, out="speed_rounding_cpu.json", threads=1)
    ap.add_argument("--models", default="resnet56,vgg16_bn")
    ap.add_argument("--calib", type=int, default=2000, help="calibration images for PFA's statistics")
    ap.add_argument("--test", type=int, default=2000, help="test images for accuracy after surgery")
    ap.add_argument("--max-seconds", type=float, default=40.0, help="timing budget per batch size")
    args = ap.parse_args()
    start(args)
    train, test, _, _ = cifar10()
    test = calibration_subset(test, args.test, seed=2)
    results = [run_model(a.strip(), train, test, args.threads, args.calib, args.max_seconds)
               for a in args.models.split(",") if a.strip()]
    write(args.out, {
        **stamp(args), "cpu_capability": torch.backends.cpu.get_cpu_capability(), "device": "cpu", "dtype": "float32",
        "note": "latency: medians of interleaved timings; speedup: median of per-round base/result ratios",
        "results": results})


if __name__ == "__main__":
    main()
