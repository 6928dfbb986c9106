"""CAR ablation throughput on the shared VGG-16: fast engine against the naive full-network evaluation.

One 64-filter layer, a fixed subset of the training split (default 2,000 images), in one process:
1. fast: the full ranking (the unpruned network + every filter ablated), through the same greedy code
   as `netslim compress --method car` (cached tail input, many masks per forward pass);
2. the same engine with one mask per forward pass, on a few ablations (the effect of batching alone);
3. naive: the full network per ablation, one per forward pass, on a few ablations (estimated for the
   rest; the JSON says so), with its correct counts checked against the fast engine's.
Step 1 runs once per --precisions entry: bf16 autocast (the engine's `precision=bf16`) is compared with
fp32 on speed and on agreement (per-filter correct counts, and the lowest-CAR half of the filters).
With --halving P the whole greedy halving (re-ranked every 8 removals, adaptive) is run and timed with
the fast engine at precision P. Without it, or for the other readings, the halving is estimated from the
measured time per evaluation for re-ranking every K removals (its evaluation count is fixed by K) and for
the exact reading (K = 1); the measured greedy halvings on fewer images are in car_prune_cpu.json.
Times are process CPU seconds, all threads summed (the machine is shared, so wall clock, also recorded,
mostly measures the other users).

    python -m benchmarks.car.throughput --layer features.0 --threads 2 --halving bf16
"""

from __future__ import annotations

import json
import time
from typing import Any

from benchmarks._common import parser, stamp, start, write
from benchmarks.car.common import cpu_per_eval, eval_images, images_lost, layer_engine


def greedy_evaluations(width: int, remove: int, per_step: int) -> int:
    """Evaluations the greedy loop makes: base + candidates at each re-ranking + the in-between removals."""
    total, removed = 1 + width, 0
    while removed < remove:
        take = min(per_step, remove - removed)
        if removed > 0:
            total += width - removed
        total += take if take > 1 else 0
        removed += take
    return total


def ranking_summary(r: Any, ref: Any, naive_eval: float, half: int) -> dict[str, Any]:
    """Speed of one precision's full ranking and its agreement with the reference (fp32) ranking."""
    def lowest(run: Any) -> set[int]:  # the half of the filters with the lowest CAR
        return set(sorted(range(run.width), key=lambda f: (run.first_car[f], f))[:half])

    per_eval = r.ranking["cpu_seconds"] / r.ranking["evaluations"]
    diff = [abs(a - b) for a, b in zip(images_lost(r), images_lost(ref), strict=True)]
    return {"evaluations": r.ranking["evaluations"], "cpu_seconds": r.ranking["cpu_seconds"],
            "seconds_wall": r.ranking["seconds"], "evals_per_cpu_second": round(1 / per_eval, 4),
            "speedup_vs_naive_fp32": round(naive_eval / per_eval, 3),
            "base_correct": round(r.base_accuracy * r.eval_images), "reference_base_correct":
                round(ref.base_accuracy * ref.eval_images),
            "filters_with_other_counts": sum(d > 0 for d in diff), "max_count_difference_images": max(diff),
            "lowest_half_overlap": len(lowest(r) & lowest(ref)), "half": half}


def main() -> None:
    ap = parser(__doc__, out="car_throughput_cpu.json", threads=1)
    ap.add_argument("--layer", default="features.0")
    ap.add_argument("--eval-size", type=int, default=2000)
    ap.add_argument("--naive-ablations", type=int, default=3)
    ap.add_argument("--unbatched-ablations", type=int, default=4)
    ap.add_argument("--precisions", default="fp32,bf16", help="fast-engine precisions for the full ranking")
    ap.add_argument("--halving", default="", help="also run and time the whole greedy halving at this precision")
    args = ap.parse_args()
    start(args)

    from netslim.methods.car import greedy

    model, n_classes, x, y = eval_images(args.eval_size)
    t0 = time.perf_counter()
    rankings = {}
    for precision in args.precisions.split(","):
        engine = layer_engine(model, args.layer, x, y, n_classes, 32, precision=precision)
        rankings[precision] = (engine, greedy(engine, 0, 0, root=args.layer))  # the first step: full ranking
        print(f"fast ranking, {precision}: {rankings[precision][1].ranking}", flush=True)
    fast, run = rankings.get("fp32", next(iter(rankings.values())))
    width = run.width

    probe = list(range(min(args.naive_ablations, width)))
    unbatched = layer_engine(model, args.layer, x, y, n_classes, 1)
    unbatched.ablate(unbatched.full_mask(), list(range(min(args.unbatched_ablations, width))))
    naive = layer_engine(model, args.layer, x, y, n_classes, 1, fast=False)
    got = naive.ablate(naive.full_mask(), probe)
    expected = images_lost(run, probe)

    fast_eval = run.ranking["cpu_seconds"] / run.ranking["evaluations"]
    unbatched_eval = cpu_per_eval(unbatched)
    naive_eval = cpu_per_eval(naive)
    half = width // 2
    by_precision = {p: ranking_summary(r, run, naive_eval, half) for p, (_, r) in rankings.items()}
    halving = None
    if args.halving:
        engine = layer_engine(model, args.layer, x, y, n_classes, 32, precision=args.halving)
        h = greedy(engine, 0, half, per_step=8, root=args.layer)
        halving = {"precision": args.halving, "mode": h.mode, "evaluations": h.engine["evaluations"],
                   "rankings": h.rankings, "cpu_seconds": h.engine["cpu_seconds"],
                   "seconds_wall": h.engine["seconds"], "kept": h.kept, "removed": h.removed,
                   "eval_accuracy_after": h.accuracy[-1] if h.accuracy else None,
                   "naive_fp32_cpu_seconds_estimated": round(h.engine["evaluations"] * naive_eval, 1),
                   "speedup_vs_naive_fp32": round(h.engine["evaluations"] * naive_eval / h.engine["cpu_seconds"], 3)}
        print(f"greedy halving ({args.halving}): {halving}", flush=True)
    estimates = {}
    for k in (1, 8):
        n = greedy_evaluations(width, half, k)
        estimates[f"per_step_{k}"] = {"evaluations": n, "fast_cpu_seconds": round(n * fast_eval, 1),
                                      "naive_cpu_seconds": round(n * naive_eval, 1)}
    result = {
        **stamp(args),
        "layer": args.layer, "filters": width, "eval_images": run.eval_images, "engine_path": fast.path,
        "timing": f"process CPU seconds, {args.threads} thread(s) summed (wall clock in seconds_wall)",
        "fast_full_ranking": {"evaluations": run.ranking["evaluations"], "cpu_seconds": run.ranking["cpu_seconds"],
                              "seconds_wall": run.ranking["seconds"],
                              "cache_seconds_wall": run.ranking["cache_seconds"],
                              "evals_per_cpu_second": round(1 / fast_eval, 4),
                              "images_per_cpu_second": round(run.eval_images / fast_eval, 1),
                              "masks_per_pass": fast.masks_per_pass, "batch": fast.batch_size},
        "fast_one_mask_per_pass": {"evaluations": unbatched.stats.evaluations,
                                   "cpu_seconds": round(unbatched.stats.cpu_seconds, 2),
                                   "evals_per_cpu_second": round(1 / unbatched_eval, 4)},
        "naive": {"evaluations": naive.stats.evaluations, "cpu_seconds": round(naive.stats.cpu_seconds, 2),
                  "evals_per_cpu_second": round(1 / naive_eval, 4),
                  "full_ranking_cpu_seconds_estimated": round(naive_eval * run.ranking["evaluations"], 1),
                  "counts_match_fast_engine": [int(a) for a in got.tolist()] == expected,
                  "note": "full network per ablation, one ablation per forward pass; timed on these "
                          "ablations and extrapolated"},
        "speedup_full_ranking": round(naive_eval / fast_eval, 3),
        "speedup_from_batching": round(unbatched_eval / fast_eval, 3),
        "fast_full_ranking_by_precision": by_precision,
        "greedy_halving_measured": halving,
        "greedy_halving_estimated": estimates,
        "base_accuracy_eval": run.base_accuracy, "first_car": run.first_car,
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "first_car"}, indent=1))
    write(args.out, result)


if __name__ == "__main__":
    main()
