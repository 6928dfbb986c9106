"""How long PFA-En takes to plan `--target params=0.5` on a random-init tv:densenet121, with every candidate
Plan sized by the per-layer size model (netslim.cost.sizemodel) and, as before it existed, by meta-device
surgery (one traced, cut copy per Plan; stopped after --before-limit seconds).

The statistics pass (one forward over the calibration images) is timed apart: it is the same either way.
Both runs must give the same Plan. Also recorded: building the size model, one Plan sized each way.

    python -m benchmarks.speed.plan_sizing [--size 64] [--images 300] [--before-limit 300]
"""

from __future__ import annotations

import signal
import statistics
import time
from typing import Any

import torch

from benchmarks._common import log, parser, stamp, start, write
from netslim.cost.size import meta_template, plan_size
from netslim.cost.sizemodel import SizeModel, surgery_only
from netslim.cost.targets import Target
from netslim.data import ImageSet
from netslim.methods import Context, get_method
from netslim.methods.common.stats import response_stats
from netslim.plan import Plan
from netslim.zoo import build


class _TimeUp(Exception):
    pass


def random_images(n: int, size: int, seed: int = 0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (n,), generator=g)
    return ImageSet(x, y, [str(i) for i in range(10)], (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def plan_timed(ctx: Context, limit: float | None) -> tuple[Plan | None, float]:
    """PFA-En's Plan and the seconds it took (None and the limit when stopped at `limit` seconds)."""

    def stop(*_: Any) -> None:
        raise _TimeUp

    old = signal.signal(signal.SIGALRM, stop)
    if limit:
        signal.setitimer(signal.ITIMER_REAL, limit)
    t0 = time.perf_counter()
    try:
        plan = get_method("pfa-en").fn(ctx).plan
    except _TimeUp:
        return None, float(limit or 0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    return plan, time.perf_counter() - t0


def main() -> None:
    ap = parser(__doc__, out="plan_sizing_cpu.json", threads=1)
    ap.add_argument("--arch", default="tv:densenet121")
    ap.add_argument("--size", type=int, default=64, help="input height and width")
    ap.add_argument("--images", type=int, default=300, help="random calibration images")
    ap.add_argument("--target", default="params=0.5")
    ap.add_argument("--before-limit", type=float, default=300.0, help="seconds before the surgery run is stopped")
    args = ap.parse_args()
    start(args)
    torch.manual_seed(0)
    model = build(args.arch, num_classes=10).eval()
    shape = (3, args.size, args.size)
    kind, _, frac = args.target.partition("=")
    ctx = Context(model=model, arch=args.arch, num_classes=10, input_size=shape,
                  calib=random_images(args.images, args.size), target=Target(kind, float(frac)))
    t0 = time.perf_counter()
    ctx.groups()
    response_stats(ctx, "max")
    stats_s = time.perf_counter() - t0
    log(f"statistics pass {stats_s:.1f} s ({len(ctx.groups())} groups)")

    after, after_s = plan_timed(ctx, None)
    assert after is not None
    log(f"planned with the size model in {after_s:.2f} s")
    ctx.cache.derived.clear()  # the spectra again, as the first run computed them
    with surgery_only():
        before, before_s = plan_timed(ctx, args.before_limit)
    log(f"planned by surgery: {'stopped after' if before is None else 'in'} {before_s:.1f} s")

    template = meta_template(model)  # a fresh one: the size model is built again, and timed
    t0 = time.perf_counter()
    sizes = SizeModel.of(template, shape)
    build_s = time.perf_counter() - t0
    assert sizes is not None
    arithmetic = []
    for _ in range(20):
        t0 = time.perf_counter()
        fast = sizes.size(after)
        arithmetic.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    slow = plan_size(after, template)
    surgery_s = time.perf_counter() - t0
    base = plan_size(ctx.base_plan("pfa-en"), template)
    write(args.out, {
        **stamp(args), "arch": args.arch, "input_size": list(shape), "calibration_images": args.images,
        "target": args.target, "statistics_seconds": round(stats_s, 2),
        "after": {"sizing": "size model", "plan_seconds": round(after_s, 2),
                  "kept_params": round(slow["params"] / base["params"], 4),
                  "topped_up_filters": after.meta.get("topped_up_filters")},
        "before": {"sizing": "meta-device surgery per Plan", "finished": before is not None,
                   "plan_seconds": round(before_s, 2) if before is not None else None,
                   "stopped_after_seconds": None if before is not None else round(before_s, 1),
                   "same_plan": None if before is None else before.keep == after.keep},
        "one_plan": {"size_model_build_seconds": round(build_s, 2),
                     "size_model_ms": round(1e3 * statistics.median(arithmetic), 3),
                     "surgery_seconds": round(surgery_s, 2), "equal": fast == slow},
    })


if __name__ == "__main__":
    main()
