"""Pruned *and* quantized, measured end to end: the shared CIFAR-10 VGG-16 cut by pfa-en to params=0.125 and
ResNet-56 cut by pfa-en to flops=0.42, each repaired by the least-squares refit (no fine-tuning), exported as
fp32 and static int8 ONNX (onnxruntime quantize_static, QDQ, per-channel, calibrated on training images)
beside the base network exported the same way; test accuracy, file bytes, top-1 agreement int8/fp32, and the
latency of all six forms at batch 1 and 64 timed in turns in one process (onnxruntime threads do not spin).
The factors from pruning (base → compressed, fp32 onnxruntime) and from quantization (fp32 → int8
onnxruntime) are reported apart, and against the issue's goals. `spinning_check` times the base's eager
PyTorch alone as well: its interleaved median should match its solo one (the artifact of issue 18).

    python -m benchmarks.speed.int8 [--threads 2] [--images 10000] [--calib-images 100] [--max-int8-drop D]
    python -m benchmarks.speed.int8 --smoke   # minutes: tiny settings, checks the script runs, not the numbers
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from benchmarks import _common as common
from benchmarks._common import CIFAR10, RESULTS, RUNS, TRAINED, log
from netslim import Schedule, parse_target
from netslim.cost.timing import Conditions, cpu_threads, interleaved_times, random_input
from netslim.data import calibration_subset
from netslim.repair import Repair
from netslim.workflows.compress import compress
from netslim.workflows.export_int8 import export_int8_run

CASES = "vgg16_bn:pfa-en:params=0.125,resnet56:pfa-en:flops=0.42,resnet56:pfa-en:flops=0.42:round=8"
GOALS = {"vgg16_bn": {"1": 15.0, "64": 8.0}, "resnet56": {"1": 4.0, "64": 4.0}}  # combined speedup, issue 18


def _compressed(arch: str, method: str, target: str, args: Any, train: Any, test: Any, round_to: int = 1) -> Path:
    """The run directory of the cut + lsq-repaired network (made once; --reuse keeps an existing one)."""
    rounded = f"_round{round_to}" if round_to > 1 else ""
    run = RUNS / f"int8{'-smoke' if args.smoke else ''}_{arch}_{method}_{target.replace('=', '')}{rounded}"
    if args.reuse and (run / "model.safetensors").is_file():
        log(f"{arch}: reusing {run}")
        return run
    model, arch, _ = common.trained(arch)
    log(f"{arch}: {method} to {target}, widths rounded to {round_to}, lsq repair on {args.repair_images} training "
        "images, no fine-tuning")
    compress(model, arch, train, test, method=method, target=parse_target(target), schedule=Schedule(epochs=0),
             options={"round_to": round_to},
             device="cpu", calib_size=args.calib, out=run, overwrite=True, measure_latency=False,
             repair=Repair(mode="lsq", images=args.repair_images, holdout=min(256, args.repair_images)),
             data=str(CIFAR10), command=common.command())  # the base is given to the export by --base (TRAINED)
    return run


def _solo(arch: str, batches: list[int], threads: int, seconds: float) -> dict[str, float]:
    """The base's eager PyTorch median at each batch, timed alone (nothing else in the rounds)."""
    model, _, _ = common.trained(arch)
    model = model.float().eval()
    out = {}
    with cpu_threads(threads):
        for b in batches:
            x = random_input((b, 3, 32, 32), Conditions("cpu", threads=threads), seed=1)
            out[str(b)] = statistics.median(interleaved_times([model], x, max_seconds=seconds)[0]) * 1e3
    return out


def _summary(arch: str, rep: dict[str, Any], solo: dict[str, float]) -> dict[str, Any]:
    ours = rep["networks"]["compressed"]
    acc = ours["accuracy"]
    rows = {(r["network"], r["runtime"], str(r["batch"])): r for r in rep["latency"]}
    eager = {b: rows[("base", "pytorch fp32", b)]["median_ms"] for b in solo}
    check = {b: {"solo_ms": ms, "interleaved_ms": eager[b], "interleaved_over_solo": eager[b] / ms}
             for b, ms in solo.items()}
    return {"int8_minus_fp32_points": (acc["onnxruntime int8"] - acc["onnxruntime fp32"]) * 100,
            "goal_within_half_point": acc["onnxruntime int8"] >= acc["onnxruntime fp32"] - 0.005,
            "int8_bytes_over_fp32": ours["int8_bytes_over_fp32"], "goal_bytes_quarter": ours["int8_bytes_over_fp32"]
            <= 0.25, "int8_weight_bytes_over_fp32": ours["int8_weight_bytes_over_fp32"], "bytes_by_part": ours["parts"],
            "factors": rep["factors"],
            "goal_combined": {b: {"goal": g, "measured": rep["factors"][b].get("combined"),
                                  "met": (rep["factors"][b].get("combined") or 0) >= g}
                              for b, g in GOALS.get(arch, {}).items() if b in rep["factors"]},
            "spinning_check": check}


def main() -> None:
    ap = common.parser(__doc__, out="speed_int8_cpu.json", threads=2)
    ap.add_argument("--cases", default=CASES, help="ARCH:METHOD:TARGET[:round=N],... (shared networks; N: kept "
                    "widths rounded to a multiple of N)")
    ap.add_argument("--images", type=int, default=10000, help="test images for the accuracies (10000: all)")
    ap.add_argument("--calib", type=int, default=2000, help="training images for the method's analysis")
    ap.add_argument("--repair-images", type=int, default=2000, help="training images of the lsq refit")
    ap.add_argument("--compress-test", type=int, default=2000, help="test images compress reports on")
    ap.add_argument("--calib-images", type=int, default=100, help="training images int8 ranges are calibrated on")
    ap.add_argument("--calib-method", default="minmax", choices=["minmax", "entropy", "percentile"])
    ap.add_argument("--max-int8-drop", type=float, default=None, help="keep in fp32 the layers losing more (points)")
    ap.add_argument("--sensitivity-images", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=20.0, help="timing budget per batch size")
    ap.add_argument("--reuse", action="store_true", help="reuse the compressed runs of an earlier invocation")
    ap.add_argument("--smoke", action="store_true", help="tiny settings to check the script (numbers meaningless)")
    args = ap.parse_args()
    if args.smoke:
        args.images, args.calib, args.repair_images, args.compress_test = 100, 600, 256, 100
        args.calib_images, args.sensitivity_images, args.seconds = 16, 100, 0.3
        if args.out == RESULTS / "speed_int8_cpu.json":
            args.out = RUNS / "int8-smoke" / "speed_int8_smoke.json"
    common.start(args)
    train, test, _, _ = common.cifar10()
    test = calibration_subset(test, min(args.compress_test, len(test.labels)), seed=2)
    result: dict[str, Any] = {**common.stamp(args), "fine_tuning": "none (cut + least-squares refit only)",
                              "test_images": args.images, "cases": []}
    for case in args.cases.split(","):
        arch, method, target, *extra = case.split(":")
        round_to = int(extra[0].removeprefix("round=")) if extra else 1
        run = _compressed(arch, method, target, args, train, test, round_to)
        log(f"{arch}: exporting fp32 and int8 beside the base ({args.threads} threads)")
        rep = export_int8_run(run, data=str(CIFAR10), images=args.images, batches=(1, 64), threads=args.threads,
                              max_seconds=args.seconds, overwrite=True, calib_method=args.calib_method,
                              calib_images=args.calib_images, max_drop=args.max_int8_drop,
                              sensitivity_images=args.sensitivity_images, base=TRAINED[arch])
        summary = _summary(arch, rep, _solo(arch, [1, 64], args.threads, args.seconds / 2))
        for b, f in rep["factors"].items():
            log(f"{arch} batch {b}: " + ", ".join(f"{k} {v:.2f}x" for k, v in f.items()))
        result["cases"].append({"arch": arch, "method": method, "target": target, "round_to": round_to, "run": str(run),
                                "summary": summary, "export": rep})
        common.write(args.out, result)  # after every case: a killed run keeps what it finished


if __name__ == "__main__":
    main()
