"""CAR: greedy filter pruning by classification accuracy reduction.

CAR(f) = acc(network) - acc(network without f), measured on a fixed subset of the *training* split,
with f's channel zeroed after its BatchNorm and activation (no bias leak). The filter with the smallest
CAR goes first; CAR is then recomputed on the smaller network. Recomputing after every removal (the
paper's reading, `per_step=1`) costs O(C^2) evaluations per layer; `per_step=K` re-ranks only every K
removals. Every evaluation runs through `engine.AblationEngine` (cached layer input, batched masks); the
greedy loop is in greedy.py, the report and plots in report.py.

Attention (nn.MultiheadAttention, ViTs) loses whole heads by the same rule: CAR(h) is the accuracy lost
with head h's output zeroed (heads.py), and at least one head stays (`--opt heads=false` keeps attention
whole).

Targets: per chosen unit (`keep_fraction`, default 0.5), or global `--target params=F|flops=F`, met by
bisecting one kept fraction shared by the chosen layers and attentions (units.py: their widths and head
counts follow it, the filters and heads within a unit are then chosen by greedy CAR). Units are pruned one
after another in forward order, each on the network with the earlier removals already applied.

Options (`--opt key=value`, declared with their defaults in options.py; `netslim methods car` lists them):
layers, heads, eval_size, per_step, adaptive, keep_fraction, max_drop, classwise, min_keep, round_to, seed,
batch, masks_per_pass, fast, precision.
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

from netslim.data import ImageSet, batches, calibration_subset
from netslim.errors import NetslimError
from netslim.methods.base import Context, MethodResult, register
from netslim.methods.car.engine import AblationEngine
from netslim.methods.car.greedy import GreedyRun, greedy
from netslim.methods.car.heads import HeadEngine, zero_heads
from netslim.methods.car.options import CAROptions
from netslim.methods.car.report import report
from netslim.methods.car.units import Unit, chosen_units, target_counts
from netslim.probe import response_modules


def eval_set(ctx: Context) -> tuple[torch.Tensor, torch.Tensor, ImageSet]:
    """The fixed evaluation subset of the training split (normalised floats, labels)."""
    data = ctx.train if ctx.train is not None else ctx.calib
    if data is None or len(data) == 0:
        raise NetslimError("CAR needs labelled training images to measure accuracy on")
    n = int(ctx.option("eval_size", 2000))
    sub = calibration_subset(data, min(n, len(data)), seed=int(ctx.option("seed", 0)))
    xs, ys = zip(*batches(sub, 1024), strict=True)
    return torch.cat(xs), torch.cat(ys), sub


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


def _engine(ctx: Context, model: nn.Module, unit: Unit, x: torch.Tensor, y: torch.Tensor) -> AblationEngine:
    """The batched ablation engine of one unit: filters by their channel mask, heads by their head mask."""
    cuda = str(ctx.device).startswith("cuda")
    batch = int(ctx.option("batch", 2048 if cuda else 256))
    per_pass = int(ctx.option("masks_per_pass", 64 if cuda else 32))
    precision = str(ctx.option("precision", "fp32"))
    if unit.heads:
        return HeadEngine(model, [unit.root], x, y, ctx.num_classes, device=ctx.device, batch_size=batch,
                          masks_per_pass=per_pass, precision=precision)
    return AblationEngine(model, [unit.layers], x, y, ctx.num_classes, device=ctx.device, batch_size=batch,
                          masks_per_pass=per_pass, fast=bool(ctx.option("fast", True)), precision=precision)


def run_car(ctx: Context, units: list[Unit], counts: dict[str, int]) -> list[GreedyRun]:
    """Greedy CAR on each unit in forward order, earlier units' removals applied to later ones."""
    x, y, _ = eval_set(ctx)
    per_step = int(ctx.option("per_step", 1))
    max_drop = ctx.option("max_drop", None)
    work = copy.deepcopy(ctx.model).eval()
    runs = []
    for u in units:
        remove = u.width - counts.get(u.root, u.width)
        engine = _engine(ctx, work, u, x, y)
        run = greedy(engine, 0, max(0, remove), per_step, None if max_drop is None else float(max_drop), u.root,
                     adaptive=bool(ctx.option("adaptive", True)))
        run.unit = u.kind
        del engine
        if u.heads:
            zero_heads(work, u.root, run.removed)
        else:
            zero_channels(work, u.layers, run.removed, ctx.example())
        runs.append(run)
    return runs


@register("car", "CAR: greedily remove the filters whose removal costs the least training-set accuracy "
                 "(--opt layers=A,B --opt eval_size=N --opt per_step=K)", needs_labels=True, options=CAROptions)
def car(ctx: Context) -> MethodResult:
    units = chosen_units(ctx)
    counts = target_counts(ctx, units)
    t0 = time.perf_counter()
    runs = run_car(ctx, units, counts)
    seconds = time.perf_counter() - t0
    plan = ctx.base_plan("car")
    for run, u in zip(runs, units, strict=True):
        if len(run.kept) < u.width:
            if u.heads:
                plan.heads[u.root] = run.kept
            else:
                for name in u.layers:
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
