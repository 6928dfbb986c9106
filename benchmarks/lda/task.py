"""Task-dependent deep LDA on the shared VGG-16 (CIFAR-10), against torch-pruning L1 at the same size.

One task per run (all ten classes, or a subset such as cat,dog,horse). In one process:
1. `netslim.workflows.compress.compress(method="lda")`: iterative LDA prune / fine-tune under an accuracy floor on
   validation data: with --val-from train, images held out of the training split; with --val-from test
   (the default), one stratified half of the test split, while the numbers reported here come from the
   other half. The shared checkpoint was trained on all 50,000 training images and scores 0.998-1.0 on any
   part of them, so only images it has not seen make the floor judge generalisation;
2. `tp-l1` (uniform ratio, L1 filter magnitude) at the parameter fraction LDA reached, given the same
   post-cut repair (BatchNorm re-estimation, classifier bias reset to the mean logits) and fine-tuned with
   the same rounds (same images, epochs, learning rate, schedule and seeds) as the LDA network it is
   compared with, so the two differ only in which channels they keep.
Reported test images are never used for decisions. A reduced CPU schedule (subsets of the
training split, one-epoch rounds) keeps a run near ten minutes on two threads; the JSON records it.

    python -m benchmarks.lda.task --classes all
    python -m benchmarks.lda.task --classes cat,dog,horse
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

from benchmarks._common import RESULTS, cifar10, parser, stamp, start, trained, write


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--classes", default="all", help="all | comma-separated CIFAR-10 class names")
    ap.add_argument("--train-per-class", type=int, default=1000, help="training images per class (before the "
                    "10%% validation hold-out)")
    ap.add_argument("--test-per-class", type=int, default=200, help="test images per class (reporting only)")
    ap.add_argument("--calib", type=int, default=1000, help="images for the Fisher statistics")
    ap.add_argument("--val-images", type=int, default=0, help="cap on the validation images (0: all held out)")
    ap.add_argument("--val-from", choices=("train", "test"), default="test",
                    help="validation images: 10%% held out of train, or a stratified half of the test split")
    ap.add_argument("--min-accuracy", type=float, default=None, help="validation accuracy floor (default: the "
                    "unpruned task network's validation accuracy minus --max-drop)")
    ap.add_argument("--max-drop", type=float, default=0.03, help="floor below the unpruned validation accuracy")
    ap.add_argument("--max-iters", type=int, default=5)
    ap.add_argument("--patience", type=int, default=1, help="iterations below the floor tolerated in a row")
    ap.add_argument("--eta-start", type=float, default=0.2)
    ap.add_argument("--eta-step", type=float, default=0.2)
    ap.add_argument("--ft-images", type=int, default=2000, help="training images per fine-tuning round")
    ap.add_argument("--ft-epochs", type=int, default=1)
    ap.add_argument("--ft-lr", type=float, default=0.01)
    ap.add_argument("--ft-distill", type=float, default=0.0, help="weight of the unpruned task network's softened "
                    "outputs in every round (both networks; 0: labels only)")
    ap.add_argument("--trace-images", type=int, default=10, help="per class")
    ap.add_argument("--out", type=Path, default=None, help="result JSON (default: results/lda_<classes>_cpu.json)")
    ap.add_argument("--run-dir", type=Path, default=None, help="also write the LDA run directory here")
    args = ap.parse_args()
    start(args)

    from netslim import Plan, Schedule, Target
    from netslim.cost.size import model_size
    from netslim.data import batches, calibration_subset, split_holdout
    from netslim.methods.lda import LoopOptions, finetune_round, predecision_moments, recalibrate
    from netslim.surgery.apply import apply_plan, find_classifier
    from netslim.surgery.graph import PRUNABLE, out_width
    from netslim.workflows.compress import compress
    from netslim.workflows.stages import accuracy, analyse

    classes = None if args.classes == "all" else [c.strip() for c in args.classes.split(",")]
    tag = "all" if classes is None else "-".join(classes)
    out = args.out or RESULTS / f"lda_{tag}_cpu.json"
    began = time.perf_counter()
    train, test, idx, _ = cifar10(classes)
    k = len(train.classes)
    train = calibration_subset(train, min(args.train_per_class * k, len(train)), seed=0)
    from_test = args.val_from == "test"
    if from_test:
        (val, test), fit_part = split_holdout(test, 0.5, seed=0), train
    else:
        fit_part, val = split_holdout(train, 0.1, seed=0)  # the split compress() makes
    if 0 < args.val_images < len(val):
        val = calibration_subset(val, args.val_images, seed=1)
    test = calibration_subset(test, min(args.test_per_class * k, len(test)), seed=0)
    base, arch, _ = trained()
    options = {"min_accuracy": args.min_accuracy, "max_drop": args.max_drop, "max_iters": args.max_iters,
               "patience": args.patience, "eta_start": args.eta_start,
               "eta_step": args.eta_step, "ft_images": args.ft_images, "ft_epochs": args.ft_epochs,
               "ft_lr": args.ft_lr, "ft_distill": args.ft_distill, "trace_images": args.trace_images,
               "val_images": 0 if from_test else args.val_images}  # compress caps its own hold-out

    t0 = time.perf_counter()
    lda = compress(copy.deepcopy(base), arch, train, test, method="lda", options=options,
                   schedule=Schedule(epochs=0), device="cpu", calib_size=args.calib, classes=idx, out=args.run_dir,
                   overwrite=True, measure_latency=False,
                   val=val if from_test else None)
    lda_seconds = time.perf_counter() - t0
    before, after, meta = lda.metrics["before"], lda.metrics["after"], lda.plan.meta
    fraction = after["params"] / before["params"]
    rounds = int(meta["finetune_rounds"])

    # the peer: same parameter fraction, same fine-tuning rounds on the same training part
    t0 = time.perf_counter()
    task_model = copy.deepcopy(base)
    if idx is not None:
        task_model = apply_plan(task_model, Plan(arch=arch, num_classes=10, input_size=(3, 32, 32), classes=idx))
    l1_plan = analyse(task_model, arch, train, "tp-l1", Target("params", fraction), {}, "cpu", args.calib)[0].plan
    l1_model = apply_plan(copy.deepcopy(task_model), l1_plan).eval()
    l1_cut = accuracy(l1_model, test, "cpu")
    calib = calibration_subset(fit_part, min(args.calib, len(fit_part)), seed=0)  # LDA's calibration images
    ft = LoopOptions(ft_images=args.ft_images, ft_epochs=args.ft_epochs, ft_lr=args.ft_lr, ft_distill=args.ft_distill)
    head = find_classifier(task_model)
    mean = predecision_moments(task_model, batches(calib, 256), head, k).mean
    recalibrate(l1_model, task_model, head, mean, calib, ft, "cpu", 256)  # the repair LDA gives its cuts
    l1_recal = accuracy(l1_model, test, "cpu")
    for r in range(1, rounds + 1):
        finetune_round(l1_model, fit_part, ft, r, "cpu", teacher=task_model)
    l1_model.eval()
    l1_size = model_size(l1_model, (3, 32, 32))
    l1_seconds = time.perf_counter() - t0

    def summary(size: dict, cut: float | None, test_after: float | None, val_after: float | None,
                widths: dict, seconds: float) -> dict:
        return {"params": size["params"], "macs": size["macs"], "params_fraction": size["params"] / before["params"],
                "macs_fraction": size["macs"] / before["macs"], "test_accuracy_after_surgery": cut,
                "test_accuracy_after_finetune": test_after, "val_accuracy_after_finetune": val_after,
                "widths": widths, "seconds": round(seconds, 1)}

    chosen = next(r for r in meta["iterations"] if r["index"] == meta["selected_iteration"])
    report = {
        "benchmark": "lda_task", **stamp(args),
        "task": {"classes": train.classes, "base_class_indices": idx},
        "data": {"train_images": len(train), "fine_tune_part": len(fit_part), "validation": len(val),
                 "test_images": len(test), "calibration": args.calib},
        "schedule": {"val_from": args.val_from, "min_accuracy": args.min_accuracy, "max_drop": args.max_drop,
                     "floor": meta["floor"], "max_iters": args.max_iters, "patience": args.patience,
                     "eta_start": args.eta_start,
                     "eta_step": args.eta_step, "ft_rounds_used": rounds, "ft_images_per_round": args.ft_images,
                     "ft_epochs_per_round": args.ft_epochs, "ft_lr": args.ft_lr, "ft_schedule": ft.ft_schedule,
                     "ft_distill": args.ft_distill, "ft_temperature": ft.ft_temperature},
        "base": {"params": before["params"], "macs": before["macs"], "test_accuracy": before["accuracy"],
                 "val_accuracy": meta["iterations"][0]["val"]},
        "lda": {**summary(after, after["accuracy_after_surgery"], after["accuracy"], chosen["val"],
                          {r["layer"]: r["after"] for r in lda.metrics["widths"]}, lda_seconds),
                "selected_iteration": meta["selected_iteration"], "stop": meta["stop"],
                "mprime_first_iteration": meta["iterations"][1]["mprime"] if len(meta["iterations"]) > 1 else None,
                "iterations": meta["iterations"]},
        "tp_l1": {"test_accuracy_after_recalibration": l1_recal, **summary(
            l1_size, l1_cut, accuracy(l1_model, test, "cpu"), accuracy(l1_model, val, "cpu"),
            {n: out_width(m) for n, m in l1_model.named_modules() if isinstance(m, PRUNABLE)}, l1_seconds)},
        "total_seconds": round(time.perf_counter() - began, 1),
    }
    write(out, report)
    b, lo, pe = report["base"], report["lda"], report["tp_l1"]
    print(f"{tag}: base {b['params']:,} params, test {b['test_accuracy']:.4f} | lda {lo['params']:,} params "
          f"({lo['params_fraction']:.4f}), {lo['macs']:,} MACs, test {lo['test_accuracy_after_surgery']:.4f} cut -> "
          f"{lo['test_accuracy_after_finetune']:.4f} | tp-l1 {pe['params']:,} params, test "
          f"{pe['test_accuracy_after_surgery']:.4f} -> {pe['test_accuracy_after_finetune']:.4f} | "
          f"{report['total_seconds']:.0f} s -> {out}")


if __name__ == "__main__":
    main()
