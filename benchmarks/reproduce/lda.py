"""Task-dependent deep LDA pruning (Tian, Arbel, Clark; ../shared/methods/lda.md) on the shared VGG-16: the task
{cat, dog, horse} against all ten classes under one rule, with torch-pruning's criteria at the size LDA reached.

For each task (all classes, then --classes), in one process, as `python -m benchmarks.lda.task` does:
1. `netslim.workflows.compress.compress(method="lda")`: the iterative LDA prune / fine-tune loop with the same
   stopping rule for both tasks (floor = the unpruned task network's validation accuracy minus --max-drop,
   default 0.01: the paper's "smallest within 1%"); every round fine-tunes --epochs on the task's training
   images. Validation is one stratified half of the task's test split (`--val-from test`: the base was trained
   on the whole training split and has memorised it); the numbers reported come from the other half.
2. tp-l1 / tp-random / tp-taylor on the task network (classifier cut to the task) at the parameter fraction LDA
   reached, through netslim's stages (analyse, run_stages: cut, --repair, fine-tune) with as many epochs as LDA's
   rounds took together (one onecycle; same images, learning rate, batch and augmentation).

    python -m benchmarks.reproduce.lda --threads 16        # GPU: the paper's schedule
    python -m benchmarks.reproduce.lda --epochs 1 --train-images 3000 --test-images 1000 --decide-images 1000 \\
        --max-iters 3 --calib 500 --trace-images 5 --repair bn --repair-images 1000          # CPU
    python -m benchmarks.reproduce.lda --smoke --out /tmp/lda.json
"""

from __future__ import annotations

import copy
from typing import Any

from benchmarks.reproduce import common as rc
from netslim import Plan, Schedule, Target
from netslim.surgery.apply import apply_plan
from netslim.workflows.compress import compress

DIFFERENCES = [
    "networks and tasks: the paper prunes an ImageNet VGG-16 (138M parameters, mostly in its fully connected "
    "layers) for 2-class LFWA attributes and Inception for CIFAR-100; here the CIFAR-10 VGG-16-BN (14.7M, "
    "convolutional) for 3 classes against 10",
    "retraining: 'the same recipe as the original training, shorter is fine'; here every round is --epochs of "
    "onecycle SGD on the task's training images",
    "the peers get LDA's total fine-tuning as one onecycle run instead of one run per round",
]


def compress_row(label: str, res: Any, **extra: Any) -> dict[str, Any]:
    """A row from `netslim.workflows.compress.compress`'s metrics, with the keys common.staged gives."""
    m = res.metrics
    b, a = m["before"], m["after"]
    accuracies = [k for k in a if k.startswith("accuracy")]
    return {"method": label, **extra, "target": m["target"], "init": m["init"], "repair": m["repair"]["mode"],
            **{k: a[k] for k in accuracies}, **{k: a[k] for k in ("params", "macs", "bytes")},
            **{f"{k}_kept": round(a[k] / b[k], 6) for k in ("params", "macs", "bytes")},
            "base_accuracy": b["accuracy"], "analysis_seconds": m["analysis_seconds"],
            "widths": {r["layer"]: r["after"] for r in m["widths"]}, "history": m["history"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = rc.parser(__doc__, epochs=5, lr=0.01, calib=1000)
    ap.add_argument("--classes", default="cat,dog,horse", help="the task compared with all classes")
    ap.add_argument("--max-drop", type=float, default=0.01, help="floor: unpruned validation accuracy minus this")
    ap.add_argument("--max-iters", type=int, default=8)
    ap.add_argument("--patience", type=int, default=1, help="iterations below the floor tolerated in a row")
    ap.add_argument("--eta-start", type=float, default=0.2)
    ap.add_argument("--eta-step", type=float, default=0.2)
    ap.add_argument("--trace-images", type=int, default=10, help="per class")
    ap.set_defaults(label_smoothing=0.0)  # the LDA loop's rounds use none; the peers' fine-tuning matches them
    args = rc.parse(ap, argv, max_iters=1, trace_images=1, train_images=10, calib=10)
    run = rc.setup(args, "lda")
    options = {"max_drop": args.max_drop, "max_iters": args.max_iters, "patience": args.patience,
               "eta_start": args.eta_start, "eta_step": args.eta_step, "trace_images": args.trace_images,
               "ft_epochs": args.epochs, "ft_lr": args.lr, "ft_batch": args.batch_size, "ft_images": 0,
               "bn_recal": args.repair_images}
    peers, rows, ours, model, arch = run.peers(), [], {}, None, ""
    for classes in (None, args.classes.split(",")):
        tag = "all" if classes is None else ",".join(classes)
        train, test, idx, val = run.data(classes, decide=True)
        if model is None:
            model, arch = run.trained(len(train.classes))
        rc.common.log(f"lda: {tag}: the LDA loop…")
        lda = compress(copy.deepcopy(model), arch, train, test, method="lda", options=options,
                       schedule=Schedule(epochs=0), device=run.device, calib_size=args.calib, classes=idx,
                       measure_latency=False, val=val)
        meta, row = lda.plan.meta, compress_row("lda", lda, experiment=tag)
        row |= {"floor": meta["floor"], "selected_iteration": meta["selected_iteration"], "stop": meta["stop"],
                "finetune_rounds": meta["finetune_rounds"], "iterations": meta["iterations"]}
        task = model if idx is None else apply_plan(copy.deepcopy(model), Plan(
            arch=arch, num_classes=10, input_size=tuple(train.images.shape[1:]), classes=idx)).eval()
        sched = run.schedule(epochs=meta["finetune_rounds"] * args.epochs)
        fraction = row["params_kept"]
        peer_rows = rc.rows(run, task, arch, train, test, sched, dict.fromkeys(peers, Target("params", fraction)),
                            rc.size(task, train), val=val, experiment=tag)
        rows += [row, *peer_rows]
        top = rc.best(peer_rows, peers)
        ours[tag] = {"base_accuracy": row["base_accuracy"], "lda_accuracy": row["accuracy"],
                     "accuracy_change_points": rc.points(row["accuracy"], row["base_accuracy"]),
                     "params_removed_percent": round(100 * (1 - row["params_kept"]), 2),
                     "macs_removed_percent": round(100 * (1 - row["macs_kept"]), 2),
                     "params": row["params"], "floor": meta["floor"], "best_peer": rc.change(top, row["base_accuracy"]),
                     "lda_minus_best_peer_points": rc.points(row["accuracy"], top["accuracy"]),
                     "validation_images": len(val), "test_images": len(test), "train_images": len(train),
                     "peer_schedule": {"epochs": sched.epochs, "lr": sched.lr, "batch_size": sched.batch_size}}
    task_tag = args.classes
    ours["all_params_over_task_params"] = round(ours["all"]["params"] / ours[task_tag]["params"], 2)
    paper = {"headline": rc.paper(run, "lda.md", "Headlines: 98–99% of VGG-16's parameters removed and 83% of its "
                                  "FLOPs", params_removed_percent=[98, 99], flops_removed_percent=83),
             "task_dependence": rc.paper(run, "lda.md", "Task dependence is the point: a 2-class task keeps far "
                                         "fewer filters than a 100-class one", task_keeps_fewer=True),
             "rule": rc.paper(run, "lda.md", "| task / model | baseline | best-accuracy pruned | smallest within "
                              "1% |", max_drop_points=1)}
    return run.finish({
        "paper": paper, "ours": ours, "peers": peers, "rule": {k: v for k, v in options.items() if "ft_" not in k},
        "schedule": run.record(run.schedule(epochs=args.epochs), train, test, per_round=True, val_from="test",
                               max_iters=args.max_iters),
        "differences": DIFFERENCES, "rows": rows})


if __name__ == "__main__":
    main()
