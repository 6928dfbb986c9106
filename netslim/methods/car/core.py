"""CAR: greedy filter pruning by classification accuracy reduction.

CAR(f) = acc(network) - acc(network without f), measured on a fixed subset of the *training* split,
with f's channel zeroed after its BatchNorm and activation (no bias leak). The filter with the smallest
CAR goes first; CAR is then recomputed on the smaller network. Recomputing after every removal (the
paper's reading, `per_step=1`) costs O(C^2) evaluations per layer; `per_step=K` re-ranks only every K
removals. Every evaluation runs through `car_eval.AblationEngine` (cached layer input, batched masks).

Targets: per chosen layer (`keep_fraction`, default 0.5), or global `--target params=F|flops=F`, met by
bisecting one kept fraction shared by the chosen layers (their widths follow it, the filters within a
layer are then chosen by greedy CAR). Several layers are pruned one after another in forward order,
each on the network with the earlier layers' removals already applied.

Options (`--opt key=value`; the first three also as CLI flags): layers, eval_size (2000), per_step (1),
keep_fraction (0.5), max_drop (stop before eval accuracy falls more than this below the start),
classwise (heat map in the report), min_keep, round_to, seed, batch (forward batch), masks_per_pass,
fast (False: naive full-network evaluation), precision (fp32 | bf16 autocast: faster, approximate).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from netslim.cost.budget import bisect
from netslim.data import ImageSet, batches, calibration_subset
from netslim.errors import NetslimError
from netslim.methods.base import Context, register
from netslim.methods.car.engine import AblationEngine
from netslim.methods.common.ranking import round_width
from netslim.plan import Plan
from netslim.probe import response_modules
from netslim.surgery.graph import ChannelGroup


@dataclass
class GreedyRun:
    """What the greedy loop did on one coupled group."""

    root: str
    layers: tuple[str, ...]
    width: int
    eval_images: int
    per_step: int
    base_accuracy: float
    removed: list[int] = field(default_factory=list)  # filters in removal order
    car: list[float] = field(default_factory=list)  # CAR of each removed filter when it was ranked
    loss_rise: list[float] = field(default_factory=list)  # its eval cross-entropy increase (tie-break)
    accuracy: list[float] = field(default_factory=list)  # eval accuracy after each removal
    first_car: list[float] = field(default_factory=list)  # CAR of every filter of the unpruned layer
    classwise: list[list[float]] = field(default_factory=list)  # [filter][class] accuracy change
    stopped: str = "target width reached"
    adaptive: bool = False
    rankings: int = 0  # full rankings of the remaining filters
    engine: dict[str, Any] = field(default_factory=dict)
    ranking: dict[str, Any] = field(default_factory=dict)  # the first full ranking alone (time, evaluations)
    path: str = ""

    @property
    def kept(self) -> list[int]:
        gone = set(self.removed)
        return [c for c in range(self.width) if c not in gone]

    @property
    def mode(self) -> str:
        if self.per_step == 1:
            return "exact greedy: CAR recomputed after every removal"
        if self.adaptive:
            return (f"re-ranked every {self.per_step} removals or sooner (adaptive: a block stops at a removal "
                    "costing more than its CAR)")
        return f"re-ranked every {self.per_step} removals"


def eval_set(ctx: Context) -> tuple[torch.Tensor, torch.Tensor, ImageSet]:
    """The fixed evaluation subset of the training split (normalised floats, labels)."""
    data = ctx.train if ctx.train is not None else ctx.calib
    if data is None or len(data) == 0:
        raise NetslimError("CAR needs labelled training images to measure accuracy on")
    n = int(ctx.option("eval_size", 2000))
    if n < 1:
        raise NetslimError(f"--eval-size must be positive, got {n}")
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
            raise NetslimError(f"--layers: {name!r} ({why}); prunable: {', '.join(g.root for g in groups)}")
        if g not in out:
            out.append(g)
    order = {g.root: i for i, g in enumerate(groups)}
    return sorted(out, key=lambda g: order[g.root])


def greedy(engine: AblationEngine, slot: int, remove: int, per_step: int = 1, max_drop: float | None = None,
           root: str = "", adaptive: bool = True) -> GreedyRun:
    """Remove `remove` channels of one slot greedily by smallest CAR.

    Ties in CAR (frequent on training images a network fits perfectly) go to the filter whose removal
    raises the evaluation cross-entropy least, then to the lower index. With `per_step=K > 1` the K best
    of a ranking are removed before the next ranking; `adaptive` cuts such a block short at the first
    removal that costs more (on top of the ones before it) than its own CAR predicted, and halves the
    next block, so interacting removals fall back to one-at-a-time re-ranking where the layer is fragile.
    """
    if per_step < 1:
        raise NetslimError(f"--per-step must be at least 1, got {per_step}")
    sl = engine.slot_slice(slot)
    width = sl.stop - sl.start
    n = engine.n
    mask = engine.full_mask()
    alive = list(range(width))
    counts, losses = engine.evaluate(torch.cat([mask[None], _without(mask, [sl.start + c for c in alive])]))
    current, cur_loss = float(counts[0].sum()), float(losses[0])
    totals = engine.class_totals().clamp_min(1)
    run = GreedyRun(root, engine.slots[slot].layers, width, n, per_step, current / n, path=engine.path,
                    adaptive=adaptive and per_step > 1, rankings=1)
    block = per_step
    run.ranking = {"evaluations": engine.stats.evaluations, "seconds": round(engine.stats.seconds, 3),
                   "cpu_seconds": round(engine.stats.cpu_seconds, 3),
                   "cache_seconds": round(engine.stats.cache_seconds, 3)}
    run.first_car = ((current - counts[1:].sum(1)) / n).tolist()
    run.classwise = ((counts[0][None] - counts[1:]) / totals).tolist()
    floor = None if max_drop is None else current - max_drop * n - 1e-9
    ablated: torch.Tensor | None = counts[1:].sum(1)
    abl_loss = losses[1:]
    while len(run.removed) < remove:
        if ablated is None:
            c, abl_loss = engine.evaluate(_without(mask, [sl.start + c for c in alive]))
            ablated = c.sum(1)
            run.rankings += 1
        car = (current - ablated) / n
        rise = (abl_loss - cur_loss) / n
        order = sorted(range(len(alive)), key=lambda i: (float(car[i]), float(rise[i]), alive[i]))
        take = order[:min(block, remove - len(run.removed), len(alive) - 1)]
        if not take:
            run.stopped = "one filter left"
            break
        if len(take) == 1:
            after, after_loss = [float(ablated[take[0]])], [float(abl_loss[take[0]])]
        else:
            steps = mask.repeat(len(take), 1)
            for j, i in enumerate(take):
                steps[j:, sl.start + alive[i]] = 0
            c, step_loss = engine.evaluate(steps)
            after, after_loss = c.sum(1).tolist(), step_loss.tolist()
        at_ranking = current
        accepted = 0
        for j, i in enumerate(take):
            if floor is not None and after[j] < floor:
                run.stopped = f"accuracy floor reached (max drop {max_drop})"
                break
            if run.adaptive and j > 0 and after[j - 1] - after[j] > at_ranking - float(ablated[i]):
                break  # interacts with the removals before it: re-rank now
            accepted += 1
            mask[sl.start + alive[i]] = 0
            run.removed.append(alive[i])
            run.car.append(float(car[i]))
            run.loss_rise.append(float(rise[i]))
            run.accuracy.append(after[j] / n)
            current, cur_loss = after[j], after_loss[j]
        if run.stopped.startswith("accuracy floor"):
            break
        if run.adaptive:
            block = min(per_step, 2 * block) if accepted == len(take) else max(1, block // 2)
        alive = [c for c in alive if mask[sl.start + c] > 0]
        ablated = None
    run.engine = engine.stats.as_dict()
    return run


def _without(mask: torch.Tensor, channels: list[int]) -> torch.Tensor:
    out = mask.repeat(len(channels), 1)
    out[torch.arange(len(channels)), torch.tensor(channels, dtype=torch.long)] = 0
    return out


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
        r = float(ctx.option("keep_fraction", 0.5))
        if not 0 < r <= 1:
            raise NetslimError(f"keep_fraction must be in (0, 1], not {r}")
        return widths(r)

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
                 "(--layers, --eval-size, --per-step)", needs_labels=True)
def car(ctx: Context) -> Plan:
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
    _add_report(ctx, runs, seconds, bool(ctx.option("classwise", False)))
    return plan


# -- report ------------------------------------------------------------------------------------------------


def _add_report(ctx: Context, runs: list[GreedyRun], seconds: float, classwise: bool) -> None:
    from netslim.report.markdown import table

    if not runs:
        return
    evals = sum(r.engine.get("evaluations", 0) for r in runs)
    engine_s = sum(r.engine.get("seconds", 0.0) for r in runs)
    lines = [f"## CAR greedy filter pruning ({runs[0].mode})",
             f"Evaluation set: {runs[0].eval_images} images of the training split (fixed subset). "
             f"A filter is removed by zeroing its channel after BatchNorm and activation. "
             f"{evals:,} evaluations in {engine_s:.1f} s of ablation time "
             f"({evals / engine_s if engine_s else 0:.2f} evaluations/s, "
             f"{evals * runs[0].eval_images / engine_s if engine_s else 0:,.0f} images/s); {seconds:.1f} s in all.",
             table(["layer (group root)", "filters", "kept", "base acc %", "final acc %", "rankings", "evaluations",
                    "evals/s", "stopped", "evaluation path"],
                   [[r.root, r.width, len(r.kept), 100 * r.base_accuracy,
                     100 * (r.accuracy[-1] if r.accuracy else r.base_accuracy), r.rankings,
                     r.engine.get("evaluations"), r.engine.get("evals_per_second"), r.stopped, r.path]
                    for r in runs]),
             "Accuracy on the evaluation set after each removal, and the CAR of each removed filter:\n\n"
             "![CAR curve](car_curve.png)"]
    for r in runs:
        if r.removed:
            rows = [[i + 1, f, f"{100 * c:+.2f}", f"{100 * a:.2f}"]
                    for i, (f, c, a) in enumerate(zip(r.removed, r.car, r.accuracy, strict=True))]
            lines.append(f"### {r.root}: removals in order\n\n" + table(["#", "filter", "CAR (pts)", "acc after %"],
                                                                      rows))
    artifacts = ctx.cache.setdefault("artifacts", {})
    artifacts["car_curve.png"] = lambda path: curve_plot(path, runs)
    artifacts["car.json"] = lambda path: _write_json(path, runs)
    if classwise:
        names = list(ctx.train.classes) if ctx.train is not None else [str(k) for k in range(ctx.num_classes)]
        lines.append("### Class-wise CAR\n\nAccuracy change of each class (points) when one filter of the unpruned "
                     "layer is removed; filters sorted by overall CAR (left: removed first).\n\n"
                     "![class-wise CAR](car_classwise.png)")
        artifacts["car_classwise.png"] = lambda path: classwise_plot(path, runs, names)
        for r in runs:
            order = sorted(range(r.width), key=lambda f: (r.first_car[f], f))
            top = order[-min(5, r.width):][::-1]
            rows = [[f, f"{100 * r.first_car[f]:+.2f}", _worst(r.classwise[f], names)] for f in top]
            lines.append(f"{r.root}: most important filters\n\n" + table(["filter", "CAR (pts)",
                                                                          "classes hurt most (pts)"], rows))
    ctx.cache["report"] = ["\n\n".join(lines)]
    ctx.cache["car_runs"] = runs


def _worst(row: list[float], names: list[str]) -> str:
    idx = sorted(range(len(row)), key=lambda k: -row[k])[:3]
    return ", ".join(f"{names[k] if k < len(names) else k} {100 * row[k]:+.1f}" for k in idx)


def _write_json(path, runs: list[GreedyRun]) -> None:
    from netslim.io import atomic_write_text

    atomic_write_text(path, json.dumps([asdict(r) | {"kept": r.kept, "mode": r.mode} for r in runs], indent=1))


def curve_plot(path, runs: list[GreedyRun]) -> None:
    """Per group: eval accuracy vs filters removed (line) and the CAR of each removal (bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from netslim.report.markdown import save_figure

    n = len(runs)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, r in zip(axes.flat, runs, strict=False):
        xs = list(range(len(r.accuracy) + 1))
        ax.plot(xs, [100 * r.base_accuracy] + [100 * a for a in r.accuracy], color="C0", lw=1.2)
        ax.set_xlabel("filters removed", fontsize=7)
        ax.set_ylabel("eval accuracy %", fontsize=7, color="C0")
        ax2 = ax.twinx()
        ax2.bar(xs[1:], [100 * c for c in r.car], color="C1", alpha=0.5, width=0.8)
        ax2.set_ylabel("CAR of removal (pts)", fontsize=7, color="C1")
        ax.set_title(f"{r.root} ({r.width}→{len(r.kept)}, step {r.per_step})", fontsize=8)
        for a in (ax, ax2):
            a.tick_params(labelsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path)


def classwise_plot(path, runs: list[GreedyRun], classes: list[str]) -> None:
    """Heat map per group: class (rows) x filter (columns, by overall CAR) accuracy change in points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from netslim.report.markdown import save_figure

    fig, axes = plt.subplots(len(runs), 1, figsize=(max(6.0, 0.12 * max(r.width for r in runs) + 2),
                                                     2.2 + 0.25 * len(classes) * len(runs)), squeeze=False)
    for ax, r in zip(axes.flat, runs, strict=True):
        order = sorted(range(r.width), key=lambda f: (r.first_car[f], f))
        m = 100 * torch.tensor(r.classwise)[order].T
        lim = max(float(m.abs().max()), 1e-6)
        im = ax.imshow(m.numpy(), aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        ax.set_yticks(range(len(classes)))
        ax.set_yticklabels(classes, fontsize=6)
        step = max(1, r.width // 32)
        ax.set_xticks(range(0, r.width, step))
        ax.set_xticklabels([order[i] for i in range(0, r.width, step)], fontsize=5, rotation=90)
        ax.set_title(f"{r.root}: class accuracy drop without each filter (pts)", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.025)
    fig.tight_layout()
    save_figure(fig, path)
