"""vit_tiny on the shared CIFAR-10: every netslim method against torch-pruning's criteria at params=0.5 and
flops=0.5, heads and MLP widths cut, with the same repair and the same fine-tune for every row.

1. The base: `--base FILE` (a `netslim train` model.safetensors), or trained here first with `netslim train`
   (`--train-epochs`, AdamW + cosine with warmup, label smoothing, crop+flip; the run directory is `runs/`,
   out of git). The base's test accuracy and the command that made it are recorded; the comparison means
   little below 75%, and the file says so (`base_below_75`).
2. Per target, per method, `netslim.workflows.bench.run_bench` (analyse, cut, --repair, fine-tune, measure;
   the rows a `netslim bench` table has). A method that cannot meet a target (lrs has no latency model) is
   recorded as refused with its one-line reason, not dropped.
3. Per target: netslim's best and the best peer after the refit and after the fine-tune.

    python -m benchmarks.vit.compare --train-epochs 100 --device cuda --threads 16      # GPU: base, then compare
    python -m benchmarks.vit.compare --base runs/vit_tiny_base/model.safetensors --epochs 1 \\
        --train-images 10000 --test-images 2000                                          # CPU, on a trained base
    python -m benchmarks.vit.compare --smoke --out /tmp/vit.json                          # the code path, seconds
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from benchmarks import _common as common
from benchmarks.reproduce.common import subset

METHODS = ("pfa-kl", "pfa-en", "pca", "lda", "car", "lrs")
PEERS = ("tp-l1", "tp-random", "tp-taylor")
TRAIN = ("--optimizer", "adamw", "--lr", "0.001", "--weight-decay", "0.05", "--schedule", "cosine",
         "--warmup-epochs", "5", "--label-smoothing", "0.1", "--batch-size", "256")
# small enough to finish: CAR scores on 64 images, LDA runs a few rounds
OPTIONS = {"car.eval_size": 64, "car.per_step": 100000, "car.adaptive": False, "lda.max_iters": 4,
           "lda.eta_start": 0.3, "lda.eta_step": 0.3}


def parse(argv: list[str] | None) -> Any:
    ap = common.parser(__doc__, out="vit_tiny_compare_cpu.json", threads=2)
    a = ap.add_argument
    a("--data", type=Path, default=common.CIFAR10)
    a("--base", type=Path, default=None, help="trained vit_tiny (model.safetensors); default: train one here")
    a("--base-command", default="", help="the command that trained --base (recorded with its metrics.json)")
    a("--train-epochs", type=int, default=100, help="epochs of the base's training, when there is no --base")
    a("--device", default="auto")
    a("--targets", default="params=0.5,flops=0.5")
    a("--methods", default=",".join(METHODS + PEERS))
    a("--epochs", type=int, default=5, help="fine-tuning epochs of every row")
    a("--lr", type=float, default=5e-4)
    a("--optimizer", default="adamw")
    a("--train-images", type=int, default=0, help="training images of every row (0: all)")
    a("--test-images", type=int, default=0, help="test images reported on (0: all)")
    a("--calib", type=int, default=2000)
    a("--repair", default="lsq", choices=("none", "bn", "lsq"))
    a("--runs", type=Path, default=common.RUNS / "vit_compare", help="bench run directories (resumed per row)")
    a("--opt", action="append", default=[], metavar="METHOD.KEY=VALUE",
      help="a method option on top of the defaults (repeatable), e.g. lda.threshold_origin=min")
    a("--smoke", action="store_true", help="random base, a few images, one step: for tests")
    args = ap.parse_args(argv)
    if args.smoke:
        args.epochs, args.train_images, args.test_images, args.calib, args.threads = 1, 32, 8, 32, 1
    return args


def base_model(args: Any, device: str) -> tuple[Any, dict[str, Any]]:
    """The trained base and how it was made (trained here when no --base is given; random under --smoke)."""
    from netslim import load_trained
    from netslim.zoo import build

    if args.smoke:
        torch.manual_seed(0)
        return build("vit_tiny", num_classes=10), {"weights": None, "note": "random init (smoke)"}
    made: dict[str, Any] = {"weights": str(args.base) if args.base else None}
    if args.base is not None:
        made.update(_trained(args.base, args.base_command))
    if args.base is None:
        out = common.RUNS / "vit_tiny_base"
        cmd = ["netslim", "train", "--model", "vit_tiny", "--data", str(args.data), "--out", str(out),
               "--epochs", str(args.train_epochs), *TRAIN, "--device", device, "--overwrite"]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=sys.stderr)
        made = {"weights": str(out / "model.safetensors"), "train_command": " ".join(cmd),
                "train_seconds": round(time.perf_counter() - t0, 1)}
        args.base = out / "model.safetensors"
    model, _, _ = load_trained(args.base, "vit_tiny", 10)
    return model, made


def _trained(weights: Path, command: str) -> dict[str, Any]:
    """How a given base was made: its command, and the test accuracy and per-epoch history `netslim train` wrote
    beside it (metrics.json), where there is one."""
    out: dict[str, Any] = {"train_command": command} if command else {}
    metrics = weights.parent / "metrics.json"
    if metrics.is_file():
        m = json.loads(metrics.read_text())
        out.update({"train_test_accuracy": m.get("accuracy"), "train_history": m.get("history")})
        out["train_seconds"] = round(sum(h.get("seconds") or 0 for h in m.get("history") or []), 1)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from netslim.cost.targets import parse_target
    from netslim.errors import NetslimError
    from netslim.repair import Repair
    from netslim.train import Schedule
    from netslim.workflows.api import pick_device
    from netslim.workflows.bench import run_bench

    args = parse(argv)
    common.start(args)
    began, device = time.perf_counter(), pick_device(args.device)
    model, made = base_model(args, device)
    train, test, _, _ = common.cifar10(data=args.data)
    train, test = subset(train, args.train_images, 1), subset(test, args.test_images, 2)
    sched = Schedule(epochs=args.epochs, lr=args.lr, optimizer=args.optimizer, batch_size=8 if args.smoke else 128,
                     label_smoothing=0.1, weight_decay=0.05 if args.optimizer == "adamw" else 5e-4)
    out_dir = Path(tempfile.mkdtemp(prefix="vit_compare_")) if args.smoke else args.runs
    extra = dict(o.split("=", 1) for o in args.opt)
    rows, refused, base = [], [], None
    for target in [parse_target(t) for t in args.targets.split(",")]:
        for method in args.methods.split(","):
            options = {k: v for k, v in {**OPTIONS, **extra}.items() if k.startswith(f"{method}.")}
            if args.smoke and method.startswith("pfa"):  # 32 images: every token a sample, so PFA can analyse
                options[f"{method}.reduce"] = "spatial"
            try:
                got = run_bench(model, "vit_tiny", train, test, methods=[method], targets=[target], schedule=sched,
                                out=out_dir / method, device=device, calib_size=args.calib, options=options,
                                measure_latency=False, resume=True, overwrite=False, log=common.log,
                                repair=Repair(mode=args.repair), command=common.command())
                rows.append(next(r for r in got["rows"] if r["method"] == method and r["target"] == str(target)))
                base = got["base"]
            except NetslimError as exc:
                refused.append({"method": method, "target": str(target), "reason": str(exc)})
                common.log(f"{target} {method}: refused: {exc}")
    if base is None:
        raise NetslimError("no method could be benched: " + "; ".join(r["reason"] for r in refused[:3]))
    summary = {t: _summary([r for r in rows if r["target"] == t]) for t in dict.fromkeys(r["target"] for r in rows)}
    result = {"benchmark": "vit_tiny_compare", **common.stamp(args), "device": device, "base": base, "made": made,
              "base_below_75": base["accuracy"] < 0.75, "schedule": {**asdict(sched), "train_images": len(train),
                                                                     "test_images": len(test), "repair": args.repair},
              "options": {**OPTIONS, **extra}, "summary": summary, "rows": rows, "refused": refused,
              "seconds": round(time.perf_counter() - began, 1),  # this invocation (rows already run are resumed)
              "rows_seconds": round(sum(r.get(k) or 0 for r in rows for k in
                                        ("analysis_seconds", "repair_seconds", "finetune_seconds")), 1)}
    common.write(Path(args.out), result)
    return result


def _stage(row: dict[str, Any], stage: str) -> float | None:
    """A row's accuracy after the fine-tune, or before it: the refit network, or the method's own network."""
    if stage == "after_finetune":
        return row["accuracy"]
    return row.get("accuracy_after_refit") if row.get("accuracy_after_refit") is not None \
        else row.get("accuracy_before_finetune")


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """netslim's best and the best peer, after the refit (before any training) and after the fine-tune, among
    the rows that met the target (pfa-kl, parameter-free, is benched at its own size and counts only if that
    is within the budget); the rows left out are listed."""
    out: dict[str, Any] = {"not_at_budget": sorted(r["method"] for r in rows if not r.get("met_target"))}
    for stage in ("before_finetune", "after_finetune"):
        for side, names in (("netslim", METHODS), ("peer", PEERS)):
            have = [(_stage(r, stage), r["method"]) for r in rows if r["method"] in names and r.get("met_target")]
            have = [h for h in have if h[0] is not None]
            if have:
                acc, method = max(have)
                out[f"best_{side}_{stage}"] = {"method": method, "accuracy": acc}
    return out


if __name__ == "__main__":
    main()
