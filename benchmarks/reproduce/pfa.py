"""PFA (Suau, Zappella, Apostoloff; ../shared/methods/pfa.md): the paper's CIFAR-10 VGG-16 row (8x smaller,
+0.4 points) and its domain adaptation, with torch-pruning's criteria at the same budget and schedule.

1. What `netslim bench` does, row by row (netslim.workflows.stages: analyse, then run_stages), on the shared
   VGG-16: PFA-En at --target (params=0.125, the paper's 8x) and PFA-KL at its own, parameter-free size, each
   with tp-l1 / tp-random / tp-taylor at its size; every row cut, repaired (--repair) and fine-tuned alike
   (--epochs, default 30, onecycle, lr 0.05, batch 256, label smoothing 0.1, crop+flip).
2. Domain adaptation to --classes (cat,dog,horse), on the network with its classifier cut to the task (what
   `compress --classes` does): PFA-KL analysed on the task's images, the peers at the size PFA-KL reached, and
   the full network fine-tuned on the task, all with the same schedule on the task's training images.

    python -m benchmarks.reproduce.pfa --threads 16        # GPU: the paper's schedule
    python -m benchmarks.reproduce.pfa --epochs 1 --train-images 5000 --test-images 1000 --calib 1000 \\
        --repair bn --repair-images 1000                   # CPU: a reduced schedule, stated in the JSON
    python -m benchmarks.reproduce.pfa --smoke --out /tmp/pfa.json
"""

from __future__ import annotations

import copy
import time
from typing import Any

from benchmarks.reproduce import common as rc
from netslim import Plan, Target, parse_target
from netslim.methods import AnalysisCache
from netslim.surgery.apply import apply_plan
from netslim.train import finetune
from netslim.workflows.stages import accuracy

DIFFERENCES = [
    "base: the shared VGG-16-BN at 90.6% on a JPEG copy of CIFAR-10; the paper's CIFAR-10 VGG-16 is its own",
    "fine-tuning: the spec gives no recipe; every row here gets --epochs of onecycle SGD at the peers' reference "
    "recipe (../shared/methods/baselines.md: lr 0.05, batch 256, label smoothing 0.1, crop+flip)",
    "PFA-En keeps at least min_fraction (netslim's default 1/8) of every layer; the paper has no floor "
    "(--min-fraction 0)",
    "every row is repaired (--repair, netslim's default lsq) between the cut and fine-tuning; the paper fine-tunes "
    "the cut network as it is",
    "domain adaptation: the paper adapts a CIFAR-100 VGG-16 to 10- and 2-class subsets; here the CIFAR-10 network "
    "is adapted to a 3-class subset",
]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = rc.parser(__doc__, epochs=30)
    ap.add_argument("--target", default="params=0.125", help="PFA-En's and the peers' budget (the paper: 8x)")
    ap.add_argument("--classes", default="cat,dog,horse", help="the domain-adaptation task")
    ap.add_argument("--min-fraction", type=float, default=None, help="PFA's per-layer floor (default: netslim's; "
                    "0: the paper's rule)")
    # PFA cuts no layer with fewer calibration images than channels: the smoke's budget is the whole network
    args = rc.parse(ap, argv, target="params=1.0")
    run = rc.setup(args, "pfa")
    train, test, _, _ = run.data()
    n = len(train.classes)
    model, arch = run.trained(n)
    sched, target, peers = run.schedule(), parse_target(args.target), run.peers()
    floor = {} if args.min_fraction is None else {"min_fraction": args.min_fraction}
    floor = {"pfa-en": floor, "pfa-kl": floor}
    base_size, base, cache = rc.size(model, train), accuracy(model, test, run.device), AnalysisCache()
    rows = rc.rows(run, model, arch, train, test, sched, {"pfa-en": target} | dict.fromkeys(peers, target), base_size,
                   cache, options=floor, experiment=f"cifar10 at {target}")
    kl = rc.rows(run, model, arch, train, test, sched, {"pfa-kl": None}, base_size, cache, options=floor,
                 experiment="cifar10 at pfa-kl's size")
    rows += kl + rc.rows(run, model, arch, train, test, sched, dict.fromkeys(peers, Target(
        "params", kl[0]["params_kept"])), base_size, cache, experiment="cifar10 at pfa-kl's size")

    # domain adaptation: the task's images only, the network's classifier cut to the task's classes
    classes = args.classes.split(",")
    ttrain, ttest, idx, _ = run.data(classes)
    net = apply_plan(copy.deepcopy(model), Plan(arch=arch, num_classes=n, input_size=tuple(ttrain.images.shape[1:]),
                                                classes=idx)).eval()
    task_size, task_base = rc.size(net, ttrain), accuracy(net, ttest, run.device)
    task = rc.rows(run, net, arch, ttrain, ttest, sched, {"pfa-kl": None}, task_size, experiment="task",
                   options=floor)
    fraction = task[0]["params_kept"]
    task += rc.rows(run, net, arch, ttrain, ttest, sched, dict.fromkeys(peers, Target("params", fraction)),
                    task_size, experiment="task")
    t0 = time.perf_counter()
    teacher = copy.deepcopy(net).eval() if sched.distill else None  # distilled from itself as it was, as the rows
    history = finetune(net, ttrain, sched, run.device, teacher=teacher)  # the full network, fine-tuned alike
    task.append({"method": "full network fine-tuned", "experiment": "task", "accuracy_before_finetune": task_base,
                 "accuracy": accuracy(net, ttest, run.device), "params": task_size["params"], "params_kept": 1.0,
                 "finetune_seconds": round(time.perf_counter() - t0, 1), "history": history})

    top, ktop, ttop, tfull = rc.best(rows[:len(peers) + 1], peers), rc.best(rows[-len(peers) - 1:], peers), \
        rc.best(task, peers), task[-1]
    en, kl, tkl = rows[0], rows[len(peers) + 1], task[0]
    ours = {"base_accuracy": base, "pfa-en": rc.change(en, base), "pfa-kl": rc.change(kl, base),
            "best_peer_at_target": rc.change(top, base), "best_peer_at_pfa_kl_size": rc.change(ktop, base),
            "pfa_en_minus_best_peer_points": rc.points(en["accuracy"], top["accuracy"]),
            "pfa_kl_minus_best_peer_points": rc.points(kl["accuracy"], ktop["accuracy"]),
            "domain": {"task": classes, "task_base_accuracy": task_base, "pfa-kl": rc.change(tkl, task_base),
                       "full_finetuned_accuracy": tfull["accuracy"],
                       "pfa_kl_minus_full_finetuned_points": rc.points(tkl["accuracy"], tfull["accuracy"]),
                       "best_peer": rc.change(ttop, task_base),
                       "pfa_kl_minus_best_peer_points": rc.points(tkl["accuracy"], ttop["accuracy"])}}
    paper = {"cifar10": rc.paper(run, "pfa.md", "| CIFAR-10 | VGG-16 | 8× | +0.4 points |", size_reduction=8,
                                 accuracy_change_points=0.4),
             "domain": rc.paper(run, "pfa.md", '"PFA fine" matches plain fine-tuning at more than 4× smaller size',
                                size_reduction_more_than=4, accuracy_change_points_vs_full_finetuned=0.0)}
    return run.finish({
        "paper": paper, "ours": ours, "target": args.target, "peers": peers,
        "schedule": run.record(sched, train, test, task_train_images=len(ttrain), task_test_images=len(ttest)),
        "differences": DIFFERENCES,
        "rows": rows + task})


if __name__ == "__main__":
    main()
