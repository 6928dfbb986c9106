"""PFA domain adaptation: CIFAR-10 VGG-16 -> the 3-class task {cat, dog, horse}.

PFA-KL on the task's data (classifier cut to the task) against plain fine-tuning of the full network on
the same task with the same schedule, in one run; plus the size PFA-KL plans for all 10 classes.

    python -m benchmarks.pfa.domain [--train-images 3000] [--epochs 1] [--lr 0.01]
"""

from __future__ import annotations

import copy
import json

from benchmarks._common import cifar10, parser, stamp, start, trained, write
from netslim import Plan, Schedule
from netslim.cost.size import plan_size
from netslim.data import calibration_subset
from netslim.repair import Repair
from netslim.surgery.apply import apply_plan
from netslim.train import finetune
from netslim.workflows.compress import compress
from netslim.workflows.stages import accuracy, analyse


def main() -> None:
    ap = parser(__doc__, out="pfa_domain_cpu.json")
    ap.add_argument("--classes", default="cat,dog,horse")
    ap.add_argument("--train-images", type=int, default=3000)
    ap.add_argument("--calib-images", type=int, default=3000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--repair", default="bn", choices=["none", "bn", "lsq"],
                    help="repair after the cut (bn: as in the committed results, made before lsq existed)")
    args = ap.parse_args()
    start(args)
    classes = args.classes.split(",")
    full_train, _, _, n = cifar10()
    train, test, idx, _ = cifar10(classes)
    model, arch, _ = trained(num_classes=n)
    sched = Schedule(args.epochs, args.lr, 128, label_smoothing=0.1)
    tune = calibration_subset(train, args.train_images, seed=1)

    found10, ctx10, secs10 = analyse(model, arch, full_train, "pfa-kl", None, {}, "cpu", args.calib_images)
    plan10 = found10.plan
    size10 = plan_size(plan10, ctx10.template())
    base_size = plan_size(ctx10.base_plan("pfa-kl"), ctx10.template())

    res = compress(model, arch, tune, test, method="pfa-kl", schedule=sched, device="cpu",
                   calib_size=args.calib_images, init="fine", classes=idx,
                   measure_latency=False, repair=Repair(mode=args.repair))
    task_full = apply_plan(copy.deepcopy(model), Plan(arch=arch, num_classes=n, classes=idx))
    acc_full_before = accuracy(task_full, test, "cpu")
    finetune(task_full, tune, sched, "cpu")
    acc_full_after = accuracy(task_full, test, "cpu")
    task_params = sum(p.numel() for p in task_full.parameters())
    out = {
        "benchmark": "pfa_domain", **stamp(args),
        "note": f"reduced CPU schedule: {args.epochs} epoch(s) on {args.train_images} task training images",
        "task": classes, "test_images": len(test.labels),
        "pfa_kl_all_classes": {"params": size10["params"], "macs": size10["macs"],
                               "params_kept": size10["params"] / base_size["params"], "analysis_seconds": secs10,
                               "widths": plan10.widths()},
        "pfa_kl_task": {"params": res.metrics["after"]["params"], "macs": res.metrics["after"]["macs"],
                        "params_kept": res.metrics["after"]["params"] / task_params,
                        "accuracy_after_surgery": res.metrics["after"]["accuracy_after_surgery"],
                        "accuracy_after_bn_recalibration": res.metrics["after"].get("accuracy_after_bn_recalibration"),
                        "accuracy": res.metrics["after"]["accuracy"],
                        "analysis_seconds": res.metrics["analysis_seconds"],
                        "widths": res.plan.widths()},
        "full_finetuned_on_task": {"params": task_params, "accuracy_before": acc_full_before,
                                   "accuracy": acc_full_after},
    }
    write(args.out, out)
    print(json.dumps({k: v for k, v in out.items() if k.startswith(("pfa", "full"))}, indent=1, default=str))


if __name__ == "__main__":
    main()
