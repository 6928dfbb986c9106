"""One-shot repair: test accuracy right after a cut, after BatchNorm repair alone, after the least-squares refit
(+ BN), and after each fine-tuning epoch, with the CPU seconds each stage cost — netslim's methods and
torch-pruning's criteria side by side at the same budgets, on a shared CIFAR-10 network.

Every (target, method) is analysed once; the same Plan is then repaired several ways from the same cut (bn:
BatchNorm repair alone; lsq: least-squares refit with residual-sum targets, then BN repair kept only if it does
not lower accuracy on the refit's held-out training images; lsq-layer: the same with every layer fitted to its
own output; lsq-thinet: lsq on the channels ThiNet's greedy keeps at the method's widths), so the table
separates what the criterion does from what the repair does. `--epochs E` (optional, costly on a CPU) fine-tunes
the repaired network (`--finetune-from`) of `--finetune-methods` once per `--distill` weight with the same
onecycle schedule and records test accuracy and CPU seconds after each epoch.
Results are written after every row, so a killed run keeps what it finished.

    python -m benchmarks.repair.oneshot --arch vgg16_bn --targets flops=0.5,params=0.125 \
        --methods tp-l1,tp-random,tp-taylor,pfa-en --calib 2000 --test-images 5000
    python -m benchmarks.repair.oneshot --arch resnet56 --targets flops=0.42 --epochs 3 --train-images 10000 \
        --finetune-methods tp-l1,pfa-en --distill 0,0.5
"""

from __future__ import annotations

import copy
import time
from typing import Any

from benchmarks import _common as common
from netslim import Schedule, parse_target
from netslim.data import calibration_subset
from netslim.methods import AnalysisCache
from netslim.repair import Repair
from netslim.train import fit
from netslim.workflows.stages import accuracy, analyse, run_stages


def _cpu() -> float:
    return time.process_time()


def _row(model: Any, arch: str, train: Any, test: Any, method: str, target: Any, args: Any,
         cache: AnalysisCache) -> dict[str, Any]:
    c0 = _cpu()
    found, _, seconds = analyse(model, arch, train, method, target, {}, "cpu", calib_size=args.calib, cache=cache)
    row: dict[str, Any] = {"method": method, "target": str(target), "analysis_seconds": round(seconds, 1),
                           "analysis_cpu_seconds": round(_cpu() - c0, 1), "widths": found.plan.widths()}
    none = Schedule(epochs=0, bn_recal=args.bn_images)
    for mode in args.repairs.split(","):
        c0 = _cpu()
        parts = mode.split("-")
        fix = Repair(mode=parts[0], images=args.calib, holdout=args.holdout, target="layer" if "layer" in parts
                     else "block", select="thinet" if "thinet" in parts else "method")
        rec = run_stages(model, found, train, test, schedule=none, device="cpu", repair=fix)
        row[mode] = {**rec.accuracies(), "repair_seconds": round(rec.repair_seconds, 1),
                     "repair_cpu_seconds": round(_cpu() - c0, 1), "bn_after_refit": rec.bn_after_refit,
                     "selection": rec.selection}
        if rec.refit is not None:
            row[mode]["refit"] = {"walked": rec.refit.walked, "refitted": len(rec.refit.refitted),
                                  "block_targets": sum(r.target == "block" for r in rec.refit.layers),
                                  "skipped": rec.refit.skipped, "seconds": round(rec.refit.seconds, 1),
                                  "layers": [vars(r) for r in rec.refit.layers]}
        start = args.finetune_from or args.repairs.split(",")[-1]
        if mode == start and args.epochs > 0 and method in args.finetune_methods.split(","):
            row["finetune"] = [{**_finetune(rec.model, model, train, test, args, float(d)), "from": mode}
                               for d in args.distill.split(",")]
    row["params"] = sum(p.numel() for p in rec.model.parameters())
    return row


def _finetune(small: Any, teacher: Any, train: Any, test: Any, args: Any, distill: float) -> dict[str, Any]:
    """Epochs of the given schedule; test accuracy and cumulative CPU seconds after each (one onecycle run)."""
    from netslim.data import batches

    tune = calibration_subset(train, min(args.train_images, len(train.labels)), seed=1)
    sched = Schedule(epochs=args.epochs, lr=args.lr, batch_size=128, distill=distill)
    net = copy.deepcopy(small)
    c0, curve = _cpu(), []

    def after_epoch(record: dict[str, Any]) -> None:
        curve.append({"epoch": record["epoch"], "accuracy": accuracy(net, test, "cpu"),
                      "cpu_seconds": round(_cpu() - c0, 1), "train_loss": record["train_loss"]})
        common.log(f"  distill {distill} epoch {record['epoch']}: {curve[-1]['accuracy']:.4f}")

    fit(net, batches(tune, 128, shuffle=True, augment=True, drop_last=True), sched, teacher=teacher,
        on_epoch=after_epoch, progress=False)
    return {"schedule": vars(sched), "train_images": len(tune.labels), "curve": curve}


def main() -> None:
    ap = common.parser(__doc__, out=None)
    ap.add_argument("--arch", default="vgg16_bn", choices=sorted(common.TRAINED))
    ap.add_argument("--targets", default="flops=0.5,params=0.125")
    ap.add_argument("--methods", default="tp-l1,tp-random,tp-taylor,pfa-en")
    ap.add_argument("--calib", type=int, default=2000, help="training images the methods and the refit see")
    ap.add_argument("--holdout", type=int, default=256, help="training images each refitted layer is checked on")
    ap.add_argument("--bn-images", type=int, default=2000, help="training images for BatchNorm re-estimation")
    ap.add_argument("--test-images", type=int, default=5000)
    ap.add_argument("--epochs", type=int, default=0, help="fine-tuning epochs after the lsq repair (0: none)")
    ap.add_argument("--train-images", type=int, default=10000, help="training images per fine-tuning epoch")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--distill", default="0", help="comma-separated distillation weights, one fine-tune each")
    ap.add_argument("--finetune-methods", default="tp-l1,tp-random,tp-taylor,pfa-en")
    ap.add_argument("--finetune-from", default=None, help="the repair whose network is fine-tuned (default: the "
                    "last of --repairs)")
    ap.add_argument("--repairs", default="bn,lsq,lsq-layer,lsq-thinet",
                    help="repairs of each cut: bn, lsq, lsq-layer (own-output targets), lsq-thinet (ThiNet's channels)")
    ap.add_argument("--out", default=None, help="result JSON (default: results/repair_<arch>_cpu.json)")
    args = ap.parse_args()
    common.start(args)
    out = args.out or common.RESULTS / f"repair_{args.arch}_cpu.json"
    train, test, _, n = common.cifar10()
    model, arch, _ = common.trained(args.arch, n)
    test = calibration_subset(test, min(args.test_images, len(test.labels)), seed=2)
    result = {**common.stamp(args), "arch": arch, "test_images": len(test.labels),
              "base_accuracy": accuracy(model, test, "cpu"), "rows": []}
    cache = AnalysisCache()
    for text in args.targets.split(","):
        target = parse_target(text)
        for method in args.methods.split(","):
            common.log(f"{target} {method}…")
            row = _row(model, arch, train, test, method, target, args, cache)
            result["rows"].append(row)
            common.log(f"{target} {method}: " + ", ".join(f"{m} {row[m].get('accuracy')}"
                                                          for m in args.repairs.split(",")))
            common.write(out, result)


if __name__ == "__main__":
    main()
