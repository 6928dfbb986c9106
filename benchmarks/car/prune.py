"""CAR on the shared VGG-16 (CIFAR-10): the paper's half-a-layer experiment and the ablation throughput.

For one layer (features.0 = conv1 or features.3 = conv2), in one process:
1. CAR greedy halving through `netslim.workflows.stages.analyse(method="car")` on a fixed subset of the training
   split (default 2,000 images): the same code path as `netslim compress --method car --layers L`.
   Its first step is the full ranking of all filters; its whole run is the greedy halving.
2. The naive reference: the full network per ablation, one ablation per forward (mask by a hook), timed
   on a few ablations and extrapolated to the full ranking and to the greedy run (the JSON says so).
   Its correct counts are checked against the fast engine's for the same filters.
3. Test accuracy without retraining after removing half of the layer's filters by CAR, by L1 magnitude
   of the filter (sum |w|, Li et al.) and at random (several seeds), through real surgery (apply_plan).

    python -m benchmarks.car.prune --layer features.0 --eval-size 500 --test-images 5000
    python -m benchmarks.car.prune --layer features.3 --eval-size 500 --test-images 5000

On a shared two-core CPU, small settings (256-500 evaluation images, re-ranking every 8 removals) keep
a layer near half an hour of CPU time; `--eval-size 2000 --per-step 1` is the paper's exact reading
(about 1,550 evaluations of 2,000 images per layer: a GPU job for VGG-16).
Timings are wall clock and process CPU time (the machine is shared, so CPU time is the fairer figure).

Results are merged into benchmarks/results/car_prune_cpu.json under the layer's name.
"""

from __future__ import annotations

import copy
import fcntl
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._common import cifar10, parser, stamp, start, trained, write
from benchmarks.car.common import cpu_per_eval, images_lost, layer_engine


def merge_result(path: Path, key: str, value: dict) -> None:
    """Read-modify-write the shared results file under a lock (runs for two layers may finish together)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(Path(tempfile.gettempdir()) / f"{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(path.read_text()) if path.exists() else {}
        data[key] = value
        write(path, data)


def main() -> None:
    ap = parser(__doc__, out="car_prune_cpu.json")
    ap.add_argument("--layer", default="features.0")
    ap.add_argument("--eval-size", type=int, default=500)
    ap.add_argument("--fixed-blocks", action="store_true", help="re-rank every K removals exactly (not adaptive)")
    ap.add_argument("--per-step", type=int, default=8)
    ap.add_argument("--keep-fraction", type=float, default=0.5)
    ap.add_argument("--naive-ablations", type=int, default=3, help="ablations timed on the naive path")
    ap.add_argument("--random-seeds", type=int, default=3)
    ap.add_argument("--test-images", type=int, default=0, help="0: the whole test split")
    ap.add_argument("--precision", default="fp32")
    args = ap.parse_args()
    start(args)

    from netslim import Plan
    from netslim.data import calibration_subset
    from netslim.methods.car import eval_set
    from netslim.surgery.apply import apply_plan
    from netslim.workflows.stages import accuracy, analyse

    train, test, _, n_classes = cifar10()
    if args.test_images:
        test = calibration_subset(test, args.test_images, seed=0)
    model, arch, _ = trained(num_classes=n_classes)
    options = {"layers": args.layer, "eval_size": args.eval_size, "per_step": args.per_step,
               "keep_fraction": args.keep_fraction, "precision": args.precision, "adaptive": not args.fixed_blocks}
    t0 = time.perf_counter()
    found, ctx, seconds = analyse(model, arch, train, "car", None, options, "cpu")
    plan, run = found.plan, found.evidence["car_runs"][0]
    print(f"CAR {args.layer}: {run.mode}, {run.engine['evaluations']} evaluations in {run.engine['seconds']:.0f} s; "
          f"ranking {run.ranking}", flush=True)

    # naive reference on the same evaluation images
    x, y, _ = eval_set(ctx)
    naive = layer_engine(model, args.layer, x, y, n_classes, 1, fast=False, precision=args.precision)
    probe = list(range(min(args.naive_ablations, run.width)))
    got = naive.ablate(naive.full_mask(), probe)
    fast_counts = images_lost(run, probe)
    naive_per_eval = cpu_per_eval(naive)
    fast_ranking_per_eval = run.ranking["cpu_seconds"] / run.ranking["evaluations"]
    fast_per_eval = run.engine["cpu_seconds"] / run.engine["evaluations"]
    width, removed = run.width, len(run.removed)
    exact_evals = 1 + sum(width - k for k in range(removed))  # base + every remaining filter at every step
    throughput = {
        "eval_images": run.eval_images,
        "engine_path": run.path,
        "fast_full_ranking": {"evaluations": run.ranking["evaluations"], "seconds": run.ranking["seconds"],
                              "cache_seconds": run.ranking["cache_seconds"],
                              "cpu_seconds": run.ranking["cpu_seconds"],
                              "evals_per_cpu_second": round(1 / fast_ranking_per_eval, 4)},
        "fast_greedy_halving": {"mode": run.mode, **run.engine},
        "timing": "process CPU seconds",
        "naive": {"ablations_timed": len(probe), "cpu_seconds_per_evaluation": round(naive_per_eval, 3),
                  "evals_per_cpu_second": round(1 / naive_per_eval, 4),
                  "full_ranking_cpu_seconds_estimated": round(naive_per_eval * run.ranking["evaluations"], 1),
                  "greedy_halving_cpu_seconds_estimated": round(naive_per_eval * run.engine["evaluations"], 1),
                  "counts_match_fast_engine": [int(a) for a in got.tolist()] == fast_counts,
                  "note": "estimated from the timed ablations (full network, one ablation per forward pass)"},
        "speedup_full_ranking": round(naive_per_eval / fast_ranking_per_eval, 3),
        "speedup_greedy": round(naive_per_eval / fast_per_eval, 3),
        "exact_greedy_estimate": {"evaluations": exact_evals,
                                  "fast_cpu_seconds_estimated": round(exact_evals * fast_per_eval, 1),
                                  "naive_cpu_seconds_estimated": round(exact_evals * naive_per_eval, 1),
                                  "note": "per_step=1 needs every remaining filter ranked after every removal"},
    }
    print(json.dumps(throughput, indent=1), flush=True)

    # accuracy without retraining: CAR vs L1 vs random, real surgery
    base_acc = accuracy(model, test, "cpu")
    k = len(run.kept)
    layer = model.get_submodule(args.layer)
    l1 = layer.weight.detach().abs().flatten(1).sum(1)
    l1_keep = sorted(torch.argsort(l1, descending=True)[:k].tolist())

    def test_acc(keep: list[int]) -> float:
        p = Plan(arch=arch, num_classes=n_classes, input_size=(3, 32, 32), keep={args.layer: keep})
        return accuracy(apply_plan(copy.deepcopy(model), p), test, "cpu")

    car_acc = test_acc(run.kept)
    l1_acc = test_acc(l1_keep)
    rand, rand_keeps = [], []
    for seed in range(args.random_seeds):
        g = torch.Generator().manual_seed(seed)
        rand_keeps.append(sorted(torch.randperm(width, generator=g)[:k].tolist()))
        rand.append(test_acc(rand_keeps[-1]))
    # the same kept sets on CAR's own objective: accuracy on the evaluation images
    masks = torch.zeros(2 + len(rand_keeps), width)
    for row, keep in enumerate([run.kept, l1_keep, *rand_keeps]):
        masks[row, keep] = 1
    on_eval = (naive.correct(masks) / len(y)).tolist()
    acc = {"test_images": len(test), "base": base_acc, "car": car_acc, "l1": l1_acc, "random": rand,
           "random_mean": sum(rand) / len(rand), "kept": k, "width": width,
           "car_kept": run.kept, "l1_kept": l1_keep, "car_removed_in_order": run.removed,
           "car_of_removal": run.car, "eval_accuracy_curve": [run.base_accuracy, *run.accuracy],
           "overlap_car_l1": len(set(run.kept) & set(l1_keep)),
           "eval_set_accuracy": {"car": on_eval[0], "l1": on_eval[1], "random": on_eval[2:]},
           "rankings": run.rankings, "mode": run.mode}
    print(json.dumps({k: v for k, v in acc.items() if not isinstance(v, list) or k == "random"}, indent=1))
    merge_result(args.out, args.layer, {
        **stamp(args), "precision": args.precision, "options": options,
        "analysis_seconds": round(seconds, 1), "wall_seconds": round(time.perf_counter() - t0, 1),
        "throughput": throughput, "accuracy_without_retraining": acc, "plan_meta": plan.meta})


if __name__ == "__main__":
    main()
