"""CAR: greedy filter pruning by classification accuracy reduction.

CAR(f) = acc(network) - acc(network without f), measured on a fixed subset of the *training* split,
with f's channel zeroed after its BatchNorm and activation (no bias leak). The filter with the smallest
CAR goes first; CAR is then recomputed on the smaller network. Recomputing after every removal (the
paper's reading, `per_step=1`) costs O(C^2) evaluations per layer; `per_step=K` re-ranks only every K
removals. Every evaluation runs through `engine.AblationEngine` (cached layer input, batched masks); the
greedy loop is in greedy.py, the report and plots in report.py.

Targets: per chosen layer (`keep_fraction`, default 0.5), or global `--target params=F|flops=F`, met by
bisecting one kept fraction shared by the chosen layers (their widths follow it, the filters within a
layer are then chosen by greedy CAR). Several layers are pruned one after another in forward order,
each on the network with the earlier layers' removals already applied.

Options (`--opt key=value`, declared with their defaults in options.py; `netslim methods car` lists them):
layers, eval_size, per_step, adaptive, keep_fraction, max_drop, classwise, min_keep, round_to, seed, batch,
masks_per_pass, fast, precision.
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

from netslim.cost.targets import bisect
from netslim.data import ImageSet, batches, calibration_subset
from netslim.errors import NetslimError
from netslim.methods.base import Context, MethodResult, register
from netslim.methods.car.engine import AblationEngine
from netslim.methods.car.greedy import GreedyRun, greedy
from netslim.methods.car.options import CAROptions
from netslim.methods.car.report import report
from netslim.methods.common.ranking import round_width
from netslim.plan import Plan
from netslim.probe import response_modules
from netslim.surgery.graph import ChannelGroup


def eval_set(ctx: Context) -> tuple[torch.Tensor, torch.Tensor, ImageSet]:
    """The fixed evaluation subset of the training split (normalised floats, labels)."""
    data = ctx.train if ctx.train is not None else ctx.calib
    if data is None or len(data) == 0:
        raise NetslimError("CAR needs labelled training images to measure accuracy on")
    n = int(ctx.option("eval_size", 2000))
    sub = calibration_subset(data, min(n, len(data)), seed=int(ctx.option("seed", 0)))
    xs, ys = zip(*batches(sub, 1024), strict=True)
    return torch.cat(xs), torch.cat(ys), sub


def chosen_groups(ctx: Context) -> list[ChannelGroup]:
    """The coupled groups holding the requested `layers` (all prunable groups by default)."""
    groups = ctx.groups()
    wanted = ctx.option("layers", None)
    if wanted is None or wanted == "" or wanted == "all":
        return groups
    names = [n.strip() for n in wanted.split(",")] if isinstance(wanted, str) else [str(n) for n in wanted]
    out: list[ChannelGroup] = []
    for name in names:
        g = next((g for g in groups if name in g.layers), None)
        if g is None:
            modules = dict(ctx.model.named_modules())
            why = "no such layer" if name not in modules else "its output channels cannot be pruned"
            raise NetslimError(f"option layers: {name!r} ({why}); prunable: {', '.join(g.root for g in groups)}")
        if g not in out:
            out.append(g)
    order = {g.root: i for i, g in enumerate(groups)}
    return sorted(out, key=lambda g: order[g.root])


def zero_channels(model: nn.Module, layers: tuple[str, ...], channels: list[int], example: torch.Tensor) -> None:
    """Make `channels` of each layer's response exactly zero in `model` (BN affine set to 0, else the weights)."""
    if not channels:
        return
    points = response_modules(model, example, layers=list(layers))
    idx = torch.tensor(channels, dtype=torch.long)
    with torch.no_grad():
        for name in layers:
            p = points[name]
            layer = model.get_submodule(name)
            bn = model.get_submodule(p.bn) if p.bn else None
            if bn is not None and getattr(bn, "affine", False):
                bn.weight[idx] = 0
                bn.bias[idx] = 0
                continue
            layer.weight[idx] = 0
            if layer.bias is not None:
                layer.bias[idx] = 0
            if bn is not None and bn.running_mean is not None:
                bn.running_mean[idx] = 0


def _engine(ctx: Context, model: nn.Module, groups: list[ChannelGroup], x: torch.Tensor, y: torch.Tensor,
            fast: bool = True) -> AblationEngine:
    cuda = str(ctx.device).startswith("cuda")
    return AblationEngine(model, [g.layers for g in groups], x, y, ctx.num_classes, device=ctx.device,
                          batch_size=int(ctx.option("batch", 2048 if cuda else 256)),
                          masks_per_pass=int(ctx.option("masks_per_pass", 64 if cuda else 32)),
                          fast=bool(ctx.option("fast", True)), precision=str(ctx.option("precision", "fp32")))


def run_car(ctx: Context, groups: list[ChannelGroup], widths: dict[str, int]) -> list[GreedyRun]:
    """Greedy CAR on each group in forward order, earlier groups' removals applied to later ones."""
    x, y, _ = eval_set(ctx)
    per_step = int(ctx.option("per_step", 1))
    max_drop = ctx.option("max_drop", None)
    work = copy.deepcopy(ctx.model).eval()
    runs = []
    for g in groups:
        remove = g.width - widths.get(g.root, g.width)
        engine = _engine(ctx, work, [g], x, y)
        run = greedy(engine, 0, max(0, remove), per_step, None if max_drop is None else float(max_drop), g.root,
                     adaptive=bool(ctx.option("adaptive", True)))
        del engine
        zero_channels(work, g.layers, run.removed, ctx.example())
        runs.append(run)
    return runs


def target_widths(ctx: Context, groups: list[ChannelGroup]) -> dict[str, int]:
    """Kept width per chosen group: `keep_fraction` of each, or one fraction bisected to meet --target."""
    min_keep = int(ctx.option("min_keep", 1))
    step = int(ctx.option("round_to", 1))

    def widths(r: float) -> dict[str, int]:
        return {g.root: round_width(max(min_keep, round(g.width * r)), g.width, step) for g in groups}

    if ctx.target is None:
        return widths(float(ctx.option("keep_fraction", 0.5)))

    def make(r: float) -> Plan:
        plan = ctx.base_plan("car")
        w = widths(r)
        for g in groups:
            if w[g.root] < g.width:
                for name in g.layers:
                    plan.keep[name] = list(range(w[g.root]))
        plan.meta["keep_fraction"] = round(r, 6)
        return plan

    return widths(float(bisect(make, ctx.target, ctx.template(), 0.0, 1.0).meta["keep_fraction"]))


@register("car", "CAR: greedily remove the filters whose removal costs the least training-set accuracy "
                 "(--opt layers=A,B --opt eval_size=N --opt per_step=K)", needs_labels=True, options=CAROptions)
def car(ctx: Context) -> MethodResult:
    groups = chosen_groups(ctx)
    widths = target_widths(ctx, groups)
    t0 = time.perf_counter()
    runs = run_car(ctx, groups, widths)
    seconds = time.perf_counter() - t0
    plan = ctx.base_plan("car")
    for run, g in zip(runs, groups, strict=True):
        if len(run.kept) < g.width:
            for name in g.layers:
                plan.keep[name] = run.kept
    per_step = int(ctx.option("per_step", 1))
    plan.meta.update({"eval_images": runs[0].eval_images if runs else 0, "per_step": per_step,
                      "mode": runs[0].mode if runs else "", "target": str(ctx.target) if ctx.target else None,
                      "removed": {r.root: r.removed for r in runs}})
    classes = None
    if bool(ctx.option("classwise", False)):
        classes = list(ctx.train.classes) if ctx.train is not None else [str(k) for k in range(ctx.num_classes)]
    sections, artifacts = report(runs, seconds, classes)
    return MethodResult(plan, report=sections, artifacts=artifacts, evidence={"car_runs": runs})
