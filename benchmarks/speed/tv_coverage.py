"""Does netslim compress every torchvision classification model (and, named with --only, timm models)? Each
one, random-init, is compressed with
PFA-En to `--target params=0.5` (64 random calibration images, `--opt reduce=spatial` so that layers wider
than the image count can be analysed, no repair, no fine-tuning, no latency) through
`netslim.workflows.compress.compress`, and recorded as

- ok: the network was cut, and its real parameter count equals the planned one (the size the budget
  search saw),
- refused: one NetslimError line saying why (its text is recorded),
- failed: anything else (a traceback, or real != planned),
- not run (time): stopped at --limit seconds, or never started before --wall ran out.

A target refused for want of calibration samples says nothing about surgery, so every model is also cut to
a random Plan (half of every channel group's channels): `random_plan` records whether the size model, the
meta-device surgery and the real cut network agree on its parameter count and the cut network runs.

Input: 64×64 where the model takes it (inception_v3 needs 75, ViT/Swin/MaxViT 224; with --small-vit the large
ViTs are built for a small image instead, their position embeddings sized for it). Each model runs in its
own process on one thread, two at a time by default, cheapest first (torchvision's GFLOPs scaled to the input).

    python -m benchmarks.speed.tv_coverage [--limit 150] [--wall 1440] [--jobs 2] [--only resnet18,googlenet]

--only re-runs the named models and replaces their rows in an existing result file; a name with a prefix
(`timm:deit_tiny_patch16_224`, `tv:vit_b_16`) is built by netslim.zoo as written, a bare one is torchvision's.
A random Plan cuts the groups a method would be offered (netslim.surgery.trial) and a random half of the
heads of every attention netslim can cut (nn.MultiheadAttention, timm's qkv attention).

    python -m benchmarks.speed.tv_coverage --only tv:vit_b_16,tv:swin_t,timm:deit_tiny_patch16_224,\\
        timm:swin_tiny_patch4_window7_224,timm:mobilevit_xxs --out transformers_coverage_cpu.json --jobs 1
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from benchmarks._common import REPO, log, parser, stamp, start, write

BIG_INPUT = {"inception_v3": 75}  # the smallest input the model accepts, when 64 is too small
SMALL_VIT = {"vit_l_16": 64, "vit_l_32": 64, "vit_h_14": 56}  # built for this image size (--small-vit)


def spec(name: str) -> str:
    """The zoo name: as written when prefixed (timm:, tv:), else torchvision's."""
    return name if ":" in name else f"tv:{name}"


def input_side(name: str, small_vit: bool = False) -> int:
    bare = name.split(":")[-1]
    if small_vit and bare in SMALL_VIT:
        return SMALL_VIT[bare]
    if bare.startswith(("vit_", "swin_", "maxvit", "deit", "mobilevit", "efficientformer")):
        return 224  # position embeddings, windows and patch grids are sized for it
    return BIG_INPUT.get(bare, 64)


def cost(name: str) -> float:
    """Rough seconds-ordering key: torchvision's GFLOPs at 224 px scaled to our input, plus weights to build."""
    import torchvision.models as tvm

    try:
        meta = next(iter(tvm.get_model_weights(name.split(":")[-1]))).meta
        gflops, params = float(meta.get("_ops", 10.0)), float(meta.get("num_params", 1e8))
    except Exception:
        gflops, params = 10.0, 1e8
    return gflops * (input_side(name) / 224) ** 2 + params / 2e7


def one(name: str, images: int, small_vit: bool = False) -> dict[str, Any]:
    """Compress one model in this process; the record of it."""
    from benchmarks.speed.plan_sizing import random_images
    from netslim.cost.size import meta_template
    from netslim.cost.sizemodel import SizeModel, fast_plan_size
    from netslim.cost.targets import parse_target
    from netslim.errors import NetslimError
    from netslim.repair import Repair
    from netslim.train import Schedule
    from netslim.workflows.compress import compress
    from netslim.zoo import build

    torch.set_num_threads(1)
    torch.manual_seed(0)
    side = input_side(name, small_vit)
    rec: dict[str, Any] = {"model": name, "input": side}
    t0 = time.perf_counter()
    try:
        if side != input_side(name):  # a ViT's position embedding is sized for its image: build it for this one
            import torchvision.models as tvm

            model = tvm.get_model(name, num_classes=10, image_size=side).eval()
            rec["built_for_image_size"] = side
        else:
            model = build(spec(name), num_classes=10).eval()
        rec["base_params"] = sum(p.numel() for p in model.parameters())
        res = compress(model, spec(name), random_images(images, side), None, method="pfa-en",
                       target=parse_target("params=0.5"), options={"reduce": "spatial"},
                       schedule=Schedule(epochs=0, bn_recal=0), calib_size=images, measure_latency=False,
                       repair=Repair(mode="none"))
        template = meta_template(model)
        planned = fast_plan_size(res.plan, template)["params"]
        real = int(res.metrics["after"]["params"])
        rec.update(status="ok" if planned == real else "failed", planned_params=planned, real_params=real,
                   kept=round(real / rec["base_params"], 4), size_model=SizeModel.of(template, (3, side, side))
                   is not None, cut_layers=len(res.plan.keep), heads_cut=len(res.plan.heads))
        if planned != real:
            rec["reason"] = f"real parameter count {real} differs from the planned {planned}"
    except NetslimError as exc:
        rec.update(status="refused", reason=str(exc))
    except Exception as exc:  # what the coverage is here to find
        rec.update(status="failed", reason=f"{type(exc).__name__}: {exc}",
                   traceback=traceback.format_exc(limit=-6))
    if "base_params" in rec:
        rec["random_plan"] = random_cut(model, name, side)
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    return rec


def random_cut(model: torch.nn.Module, name: str, side: int) -> dict[str, Any]:
    """Cut a random half of every channel group: size model, meta surgery and the real network must agree."""
    import random

    from netslim.cost.size import meta_template, plan_size, stored_params
    from netslim.cost.sizemodel import SizeModel
    from netslim.errors import NetslimError
    from netslim.methods.common.heads import cuttable_attentions
    from netslim.plan import Plan
    from netslim.surgery.apply import apply_plan, find_classifier
    from netslim.surgery.clone import clone
    from netslim.surgery.graph import channel_groups
    from netslim.surgery.trial import runnable_groups

    rng = random.Random(0)
    shape = (3, side, side)
    try:
        plan = Plan(spec(name), 10, shape)
        example = torch.zeros(1, *shape)
        for g in runnable_groups(model, example, channel_groups(model, example, find_classifier(model)), 10):
            keep = sorted(rng.sample(range(g.width), max(1, g.width // 2)))
            plan.keep.update({n: keep for n in g.layers})
        for n in cuttable_attentions(model, example):
            heads = model.get_submodule(n).num_heads
            plan.heads[n] = sorted(rng.sample(range(heads), max(1, heads // 2)))
        template = meta_template(model)
        sizes = SizeModel.of(template, shape)
        modelled = sizes.size(plan) if sizes is not None else None
        surgery = plan_size(plan, template)["params"]
        cut = apply_plan(clone(model), plan)
        with torch.no_grad():
            out = cut(torch.zeros(1, *shape))
        real = stored_params(cut)
        same = real == surgery and (modelled is None or modelled["params"] == real) and tuple(out.shape) == (1, 10)
        return {"status": "ok" if same else "failed", "cut_layers": len(plan.keep), "heads_cut": len(plan.heads),
                "size_model": None if modelled is None else modelled["params"], "surgery": surgery, "real": real}
    except NetslimError as exc:
        return {"status": "refused", "reason": str(exc)}
    except Exception as exc:
        return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(limit=-6)}


def run_child(name: str, images: int, limit: float, small_vit: bool = False) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.speed.tv_coverage", "--one", name, "--images", str(images),
           *(["--small-vit"] if small_vit else [])]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=max(1.0, limit))
    except subprocess.TimeoutExpired:
        return {"model": name, "input": input_side(name, small_vit), "status": "not run (time)",
                "reason": f"stopped after {limit:.0f} s", "seconds": round(time.perf_counter() - t0, 1)}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"model": name, "input": input_side(name), "status": "failed",
                "reason": f"exit {done.returncode}: {done.stderr.strip()[-400:]}",
                "seconds": round(time.perf_counter() - t0, 1)}
    return json.loads(lines[-1])


def main() -> None:
    ap = parser(__doc__, out="tv_coverage_cpu.json", threads=1)
    ap.add_argument("--one", help="compress this one model here and print its record (used by the parent)")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--limit", type=float, default=150.0, help="seconds per model")
    ap.add_argument("--wall", type=float, default=1440.0, help="seconds for the whole run")
    ap.add_argument("--jobs", type=int, default=2, help="models compressed at once (one thread each)")
    ap.add_argument("--only", default="", help="comma-separated model names (default: all)")
    ap.add_argument("--small-vit", action="store_true", help="build the large ViTs for a small image "
                    f"({', '.join(f'{k} {v}' for k, v in SMALL_VIT.items())} px) instead of 224")
    args = ap.parse_args()
    start(args)
    if args.one:
        print(json.dumps(one(args.one, args.images, args.small_vit)), flush=True)
        return
    import torchvision.models as tvm

    names = [n for n in args.only.split(",") if n] or tvm.list_models(module=tvm)
    names = sorted(dict.fromkeys(names), key=cost)
    deadline = time.monotonic() + args.wall

    def job(name: str) -> dict[str, Any]:
        left = deadline - time.monotonic()
        if left < 10:
            return {"model": name, "input": input_side(name), "status": "not run (time)",
                    "reason": f"the {args.wall:.0f} s wall for the whole run was spent first", "seconds": 0.0}
        rec = run_child(name, args.images, min(args.limit, left), args.small_vit)
        log(f"{name:22s} {rec['status']:15s} {rec['seconds']:6.1f} s  {rec.get('reason', '')[:110]}")
        return rec

    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(job, names))
    earlier: list[dict[str, Any]] = []
    if args.only and args.out.exists():  # a re-run of some models replaces their rows in the full table
        fresh = {r["model"] for r in rows}
        previous = json.loads(args.out.read_text())
        rows = [r for r in previous["models"] if r["model"] not in fresh] + rows
        earlier = [*previous.get("earlier_runs", []), {k: previous.get(k) for k in ("date", "command")}]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    refusals: dict[str, list[str]] = {}
    for r in rows:
        if r["status"] == "refused":
            refusals.setdefault(r["reason"].split(";")[0].split(":")[0], []).append(r["model"])
    write(args.out, {**stamp(args), "method": "pfa-en", "target": "params=0.5", "options": {"reduce": "spatial"},
                     "calibration_images": args.images, "repair": "none", "finetune_epochs": 0,
                     "counts": counts, "refusals_by_reason": refusals, "earlier_runs": earlier, "models": rows})


if __name__ == "__main__":
    main()
