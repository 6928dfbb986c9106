"""Is vit_tiny cut to a budget by each method also faster? Times the networks the comparison builds, in turns.

FLOPs are not time: lrs at flops=0.5 runs every Linear as two thinner ones (more calls, more memory traffic),
while the criteria that cut heads and widths run fewer, narrower layers. This script builds, from the trained
base, each method's network at each target (the analysis only: refit and fine-tune change weights, not time),
then times the base and all of them interleaved (rotating order, medians; CPU fp32, batch 1 and 64). lrs's
params=0.5 network is timed twice: its sparse part as the masked dense layer it trains with, and as CSR.

    python -m benchmarks.vit.latency --base runs/vit_tiny_base/model.safetensors --threads 2
    python -m benchmarks.vit.latency --smoke --out /tmp/lat.json                     # the code path, seconds
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import _common as common
from benchmarks.reproduce.common import subset


def parse(argv: list[str] | None) -> Any:
    ap = common.parser(__doc__, out="vit_tiny_latency_cpu.json", threads=2)
    a = ap.add_argument
    a("--data", type=Path, default=common.CIFAR10)
    a("--base", type=Path, default=common.RUNS / "vit_tiny_base" / "model.safetensors")
    a("--targets", default="params=0.5,flops=0.5")
    a("--methods", default="lrs,pfa-en,tp-l1", help="methods whose networks are timed")
    a("--calib", type=int, default=1024, help="calibration images of the analysis")
    a("--batches", default="1,64")
    a("--seconds", type=float, default=30.0, help="timing per batch size, all networks in turns")
    a("--smoke", action="store_true", help="random base, a few images, a second of timing: for tests")
    args = ap.parse_args(argv)
    if args.smoke:
        args.calib, args.seconds, args.threads, args.batches = 32, 1.0, 1, "1,4"
    return args


def networks(base: torch.nn.Module, train: Any, args: Any) -> list[tuple[str, torch.nn.Module]]:
    """(label, network) for every method at every target, cut from `base` as the comparison cuts it."""
    from netslim.cost.targets import parse_target
    from netslim.surgery.apply import apply_plan
    from netslim.surgery.factorized import use_sparse_kernel
    from netslim.workflows.stages import analyse

    out = []
    for target in [parse_target(t) for t in args.targets.split(",")]:
        for method in args.methods.split(","):
            options = {"reduce": "spatial"} if args.smoke and method.startswith("pfa") else {}
            result, _, seconds = analyse(copy.deepcopy(base), "vit_tiny", train, method, target, options, "cpu",
                                         calib_size=args.calib)
            net = result.model if result.model is not None else apply_plan(copy.deepcopy(base), result.plan)
            common.log(f"{target} {method}: analysed in {seconds:.1f} s")
            out.append((f"{method} {target}", net.eval()))
            if method == "lrs" and target.kind == "params":
                csr = copy.deepcopy(net)
                if use_sparse_kernel(csr):
                    out.append((f"{method} {target} (S as CSR)", csr))
    return out


def timed(models: list[tuple[str, torch.nn.Module]], batch: int, seconds: float) -> dict[str, Any]:
    """Median ms of each network at `batch`, and its median per-round ratio to the base (the first)."""
    from netslim.cost.timing import calls_per_timing, interleaved_times, ratio_of

    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    nets = [m for _, m in models]
    calls = calls_per_timing(nets, [x] * len(nets), seconds=5e-3)
    times = interleaved_times(nets, x, max_seconds=seconds, calls=calls)
    return {"batch": batch, "rounds": len(times[0]),
            "networks": [{"network": label, "ms": round(statistics.median(t) * 1e3, 4),
                          "time_vs_base": round(ratio_of(times, i), 4)}
                         for i, ((label, _), t) in enumerate(zip(models, times, strict=True))]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from netslim import load_trained
    from netslim.cost.size import model_size
    from netslim.zoo import build

    args = parse(argv)
    common.start(args)
    began = time.perf_counter()
    if args.smoke:
        torch.manual_seed(0)
        base = build("vit_tiny", num_classes=10).eval()
    else:
        base = load_trained(args.base, "vit_tiny", 10)[0].eval()
    train = subset(common.cifar10(data=args.data)[0], args.calib, 1)
    models = [("base", base), *networks(base, train, args)]
    sizes = {label: model_size(m, (3, 32, 32)) for label, m in models}
    kept = {label: {k: round(v / sizes["base"][k], 4) for k, v in s.items()} for label, s in sizes.items()}
    rows = [timed(models, int(b), args.seconds) for b in args.batches.split(",")]
    for r in rows:
        common.log(f"batch {r['batch']}: " + ", ".join(f"{n['network']} {n['time_vs_base']:.3f}"
                                                       for n in r["networks"]))
    result = {"benchmark": "vit_tiny_latency", **common.stamp(args), "base": str(args.base) if not args.smoke
              else "random init (smoke)", "threads": torch.get_num_threads(), "dtype": "float32",
              "sizes": sizes, "kept": kept, "timing": rows, "seconds": round(time.perf_counter() - began, 1)}
    common.write(Path(args.out), result)
    return result


if __name__ == "__main__":
    main()
