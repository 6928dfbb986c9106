"""PFA-En at 1/8 of VGG-16's parameters: how the per-layer floor (option min_fraction) changes the result.

One τ shared by all layers leaves the last three VGG-16 layers ~10 filters at this budget (their
responses span about as many directions as there are classes). Same budget, same statistics, same
BN recalibration and fine-tuning for every row, with torch-pruning's uniform L1 alongside.

    python -m benchmarks.pfa.floor [--fractions 0,0.125,0.25] [--train-images 20000] [--epochs 1]
"""

from __future__ import annotations

import copy
import json
import time

from benchmarks._common import cifar10, parser, stamp, start, trained, write
from netslim import Schedule, parse_target
from netslim.cost.size import count_params
from netslim.data import calibration_subset
from netslim.methods import AnalysisCache
from netslim.surgery.apply import apply_plan
from netslim.train import finetune
from netslim.workflows.stages import accuracy, analyse, recalibrated_accuracy


def main() -> None:
    ap = parser(__doc__, out="pfa_floor_cpu.json")
    ap.add_argument("--fractions", default="0,0.125,0.25")
    ap.add_argument("--target", default="params=0.125")
    ap.add_argument("--calib", type=int, default=2000)
    ap.add_argument("--train-images", type=int, default=20000)
    ap.add_argument("--test-images", type=int, default=5000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.02)
    args = ap.parse_args()
    start(args)
    model, arch, _ = trained()
    train, test, _, _ = cifar10()
    test = calibration_subset(test, args.test_images, seed=2)
    tune = calibration_subset(train, args.train_images, seed=1)
    sched = Schedule(args.epochs, args.lr, 128)
    target = parse_target(args.target)
    cache = AnalysisCache()
    rows = []
    runs = [("pfa-en", {"min_fraction": float(f)}) for f in args.fractions.split(",")] + [("tp-l1", {})]
    for method, opts in runs:
        cache.derived.clear()  # PFA's spectra are recomputed in every run (only the statistics pass is shared)
        found, _, seconds = analyse(model, arch, tune, method, target, opts, "cpu", args.calib, cache=cache)
        plan = found.plan
        net = apply_plan(copy.deepcopy(model), plan)
        cut = accuracy(net, test, "cpu")
        recal = recalibrated_accuracy(net, tune, test, sched, "cpu")
        t0 = time.perf_counter()
        finetune(net, tune, sched, "cpu")
        row = {"method": method, "options": opts, "params": count_params(net),
               "params_kept": count_params(net) / count_params(model), "widths": plan.widths(),
               "accuracy_after_surgery": cut, "accuracy_after_bn_recalibration": recal,
               "accuracy_after_finetune": accuracy(net, test, "cpu"), "analysis_seconds": round(seconds, 1),
               "finetune_seconds": round(time.perf_counter() - t0, 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    out = {"benchmark": "pfa_floor", **stamp(args), "target": args.target,
           "schedule": {"epochs": args.epochs, "lr": args.lr, "train_images": len(tune.labels), "batch": 128,
                        "bn_recalibration_images": sched.bn_recal},
           "test_images": len(test.labels), "calibration_images": args.calib,
           "base_accuracy": accuracy(model, test, "cpu"),
           "rows": rows}
    write(args.out, out)


if __name__ == "__main__":
    main()
