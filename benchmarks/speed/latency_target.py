"""`--target latency=0.5` on CPU: does the compressed network run in half the base's time, and how accurate is it?

Runs the whole pipeline (PFA-En, knob bisected on the per-layer latency table, verified by timing)
on a shared network, fine-tunes briefly on a training subset, then times base and result in turns
once more at the target's batch size. Reports the latency ratio (target: within 10% of 0.5) and
accuracy on a test subset before compression, right after surgery and after fine-tuning.

    python -m benchmarks.speed.latency_target [--arch resnet56] [--batch 64] [--threads 1] [--epochs 3]
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

from benchmarks._common import RESULTS, RUNS, TRAINED, cifar10, command, log, parser, stamp, start, trained, write
from netslim import Schedule, parse_target
from netslim.cost.timing import Conditions, interleaved_times, prepare_for, random_input, ratio_of
from netslim.data import calibration_subset
from netslim.workflows.compress import compress


def main() -> None:
    ap = parser(__doc__, threads=1)
    ap.add_argument("--arch", default="resnet56", choices=sorted(TRAINED))
    ap.add_argument("--method", default="pfa-en")
    ap.add_argument("--fraction", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--round-to", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--train-subset", type=int, default=10000)
    ap.add_argument("--test-subset", type=int, default=2000)
    ap.add_argument("--calib", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=None, help="run directory (default: runs/latency_<arch>_b<batch>)")
    ap.add_argument("--json", type=Path, default=None,
                    help="result JSON (default: results/speed_latency_target_<arch>_b<batch>_cpu.json)")
    ap.add_argument("--repair", default="bn", choices=["none", "bn", "lsq"],
                    help="repair after the cut (bn: as in the committed results, made before lsq existed)")
    args = ap.parse_args()
    start(args)
    out_json = args.json or RESULTS / f"speed_latency_target_{args.arch}_b{args.batch}_cpu.json"
    run_dir = args.out or RUNS / f"latency_{args.arch}_b{args.batch}"
    train, test, _, _ = cifar10()
    test = calibration_subset(test, args.test_subset, seed=2)
    tune = calibration_subset(train, args.train_subset, seed=1)
    base, arch, _ = trained(args.arch)
    target = replace(parse_target(f"latency={args.fraction}"), batch=args.batch, device="cpu", threads=args.threads)
    t0 = time.perf_counter()
    res = compress(base, arch, tune, test, method=args.method, target=target, options={"round_to": args.round_to},
                   schedule=Schedule(epochs=args.epochs, lr=args.lr, batch_size=128), device="cpu",
                   calib_size=args.calib, out=run_dir,
                   overwrite=True, command=command())
    seconds = time.perf_counter() - t0
    # one more check, at the target's batch: base and result in turns, many rounds
    cond = Conditions.make("cpu", args.batch, args.threads)
    pair = [prepare_for(base, cond), prepare_for(res.model, cond)]
    start(args)  # compress may have left another thread count
    times = interleaved_times(pair, random_input((args.batch, 3, 32, 32), cond), min_rounds=9, max_seconds=60)
    ratio = ratio_of(times, 1)
    m = res.metrics
    lat = res.plan.meta.get("latency", {})
    summary = {
        "arch": arch, "method": args.method, "target": str(target), "batch": args.batch, "threads": args.threads,
        "round_to": args.round_to, "knob": {k: v for k, v in res.plan.meta.items() if k != "latency"},
        "search": lat, "final_check": {"base_ms": statistics.median(times[0]) * 1e3,
                                       "ms": statistics.median(times[1]) * 1e3, "ratio": ratio,
                                       "rounds": len(times[0]),
                                       "within_10_percent": abs(ratio - args.fraction) <= 0.1 * args.fraction},
        "accuracy": {"base": m["before"]["accuracy"], "after_surgery": m["after"]["accuracy_after_surgery"],
                     "after_finetune": m["after"]["accuracy"], "test_images": len(test.labels)},
        "finetune": {"epochs": args.epochs, "train_images": len(tune.labels), "lr": args.lr,
                     "history": m["history"]},
        "flops_kept": m["after"]["flops"] / m["before"]["flops"], "params_kept": m["after"]["params"] /
        m["before"]["params"], "speed_rows": m["speed"], "seconds": seconds, "run_dir": str(run_dir)}
    log(json.dumps({k: summary[k] for k in ("final_check", "accuracy", "flops_kept")}, indent=1))
    write(out_json, {**stamp(args), **summary})


if __name__ == "__main__":
    main()
