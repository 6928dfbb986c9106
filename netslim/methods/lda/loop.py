"""The deep LDA loop: score the pre-decision layer, trace utility back, cut, fine-tune, repeat.

Iteration t (η_t = eta_start + (t-1)·eta_step): Fisher scores and M′ on the current network (core.py),
utility trace of the M′ selected responses (trace.py), then in every coupled group remove the
channels whose utility is below η_t · std(non-zero utilities of that group); a group's utility is the
per-channel maximum over its member layers (a residual stream channel stays if any block that writes
it needs it). The cut is then repaired before fine-tuning: BatchNorm statistics are re-estimated on
calibration images (option bn_recal), and the classifier bias is reset so that the cut network's mean
logits equal the uncut network's (option bias_correction): the removed pre-decision neurons then count
at their mean, as when M′ was judged, instead of at zero. The cut network is fine-tuned for a short round
(options ft_*) and scored on ctx.val; a round that lowers the validation accuracy is undone
(keep_unless_better): the base was trained on the whole training split, so a short high-lr round on
part of it can cost more than it repairs.

Stopping: with --opt min_accuracy=A the loop stops at the first iterate whose
validation accuracy falls below A (with patience=p, at the (p+1)-th in a row: short fine-tuning rounds
are noisy and the next one may recover; an iterate below A is never kept), and keeps (select=smallest,
the default) the smallest iterate at or above A, or (select=best) the most accurate one; without any
rule the floor is the unpruned validation accuracy minus max_drop. With --target params=F / flops=F the
step that would cross the target is bisected on η so the result just fits, and the loop stops there.
The test split is never looked at.

Attention heads (option heads, on by default) are cut by the same threshold as channels, whole heads only and
at least one per attention (step.py). Keeps, of channels and of heads, are composed across iterations into the
base model's numbering (heads.py), so the returned Plan applies to the base; the pruned and fine-tuned
network itself is handed back with it (LoopOutcome.model, which compress() uses instead of re-applying the
Plan to the base weights). One step (analyse, cut, repair) is in step.py, the registered method in method.py,
its report in report.py.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from rich.console import Console
from torch import nn

from netslim.cost.size import model_size, plan_size
from netslim.data import ImageSet, batches, calibration_subset
from netslim.errors import NetslimError
from netslim.methods.base import AnalysisCache, Context
from netslim.methods.common.heads import attentions
from netslim.methods.lda.core import ClassMoments, predecision_features
from netslim.methods.lda.heads import Cuts, apply_step, head_counts
from netslim.methods.lda.options import LoopOptions
from netslim.methods.lda.step import LdaAnalysis, analyse_model, plan_at, recalibrate
from netslim.plan import Plan


@dataclass
class Iterate:
    index: int
    eta: float | None
    mprime: int | None
    predecision: int  # width of the pre-decision layer the scores were computed on
    params: int
    macs: int
    val_cut: float | None  # validation accuracy after the cut and its BN / bias recalibration
    val: float  # validation accuracy after fine-tuning
    removed: int  # channels removed in this step
    seconds: float
    keep: dict[str, list[int]] = field(default_factory=dict)  # base numbering
    heads: dict[str, list[int]] = field(default_factory=dict)  # kept heads per attention, base numbering
    heads_removed: int = 0  # heads removed in this step

    def row(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("keep")
        d.pop("heads")
        return d


# ---------------------------------------------------------------- training and evaluation
def finetune_round(model: nn.Module, train: ImageSet, o: LoopOptions, round_index: int, device: str,
                   teacher: nn.Module | None = None) -> list[dict]:
    """One short fine-tuning round (ft_epochs on ft_images random training images, seeded by the round),
    distilled from `teacher` (the unpruned network) when ft_distill > 0."""
    from netslim.train import Schedule, fit

    if o.ft_epochs <= 0:
        return []
    data = train
    if 0 < o.ft_images < len(train):
        data = calibration_subset(train, o.ft_images, seed=1000 + round_index)
    size = min(o.ft_batch, len(data))
    loader = batches(data, size, shuffle=True, augment=True, device=device, seed=round_index, drop_last=True)
    recipe = Schedule(epochs=o.ft_epochs, lr=o.ft_lr, batch_size=size, weight_decay=o.ft_weight_decay,
                      schedule=o.ft_schedule, augment=True, distill=o.ft_distill, temperature=o.ft_temperature)
    return fit(model, loader, recipe, device=device, progress=False, seed=round_index, teacher=teacher)


def validation_pass(model: nn.Module, val: ImageSet, classifier: str, device: str, batch_size: int
             ) -> tuple[float, tuple[torch.Tensor, torch.Tensor]]:
    """Validation accuracy and the pre-decision features it came from (one pass)."""
    feats, labels = predecision_features(model, batches(val, batch_size, device=device), classifier, device)
    head = model.get_submodule(classifier)
    with torch.no_grad():
        logits = _head_logits(head, feats)
    return float((logits.argmax(1) == labels).double().mean()), (feats, labels)


def _head_logits(head: nn.Module, feats: torch.Tensor) -> torch.Tensor:
    p = next(head.parameters())
    return head(feats.to(p.device, p.dtype)).float().cpu()


# ---------------------------------------------------------------- the loop
@dataclass
class LoopOutcome:
    """What the loop found: the Plan (base numbering), the chosen network, and the history its report shows."""

    plan: Plan
    model: nn.Module  # the chosen iterate's network, of the Plan's shape
    history: list[Iterate]
    chosen: Iterate
    floor: float | None
    base: dict[str, int]  # size of the unpruned network (params, macs)
    stop: str  # why the loop stopped
    options: LoopOptions
    analyses: list[LdaAnalysis]  # one per iteration


def run_loop(ctx: Context) -> LoopOutcome:
    o = LoopOptions.from_context(ctx)
    if ctx.calib is None or ctx.val is None or ctx.train is None:
        raise NetslimError("lda needs labelled training data with a validation split held out of it")
    console = Console(stderr=True, quiet=not o.verbose)
    val = ctx.val if not 0 < o.val_images < len(ctx.val) else calibration_subset(ctx.val, o.val_images, seed=1)
    base = ctx.model.eval()
    classifier = ctx.classifier
    base_widths = {n: w for g in ctx.groups() for n in g.layers for w in [g.width]}
    heads = attentions(ctx) if o.heads else []
    cuts = Cuts(base_widths, head_counts(base, heads))
    base_size = model_size(base, ctx.input_size)
    t0 = time.perf_counter()
    acc0, feats = validation_pass(base, val, classifier, ctx.device, ctx.batch_size)
    target = ctx.target
    if target is not None and target.kind not in ("params", "flops"):
        raise NetslimError(f"lda meets params or flops targets, not {target.kind}")
    floor = o.min_accuracy
    if floor is None and target is None:
        floor = acc0 - o.max_drop
    if floor is not None and acc0 < floor:
        raise NetslimError(f"the unpruned network's validation accuracy {acc0:.4f} is already below the floor "
                           f"{floor:.4f}; lower --opt min_accuracy")
    start = Iterate(0, None, None, _predecision_width(base, classifier), base_size["params"], base_size["macs"],
                    None, acc0, 0, time.perf_counter() - t0)
    history = [start]
    console.print(f"lda: unpruned {start.params:,} params, validation accuracy {acc0:.4f}"
                  + (f", floor {floor:.4f}" if floor is not None else "") + (f", target {target}" if target else ""))
    best: tuple[Iterate, nn.Module] | None = (start, base) if target is None else None
    cur, rounds, misses, stop = base, 0, 0, ""
    template = ctx.template()
    analyses: list[LdaAnalysis] = []
    for t in range(1, o.max_iters + 1):
        began = time.perf_counter()
        eta = o.eta_start + (t - 1) * o.eta_step
        sub = _sub_context(ctx, cur)
        a = analyse_model(sub, o, feats, heads)
        analyses.append(a)
        plan, final = plan_at(sub, a, eta, o), False
        if target is not None:
            def weigh(p: Plan, before: Cuts = cuts) -> int:
                return plan_size(before.then(p).plan(ctx), template)[target.kind]

            plan, eta, final = _fit_target(sub, a, eta, o, target, base_size, plan, weigh, last=t == o.max_iters)
        removed = sum(g.width - len(plan.keep[g.root]) for g in sub.groups() if g.root in plan.keep)
        heads_removed = sum(a.heads[n].numel() - len(k) for n, k in plan.heads.items())
        if removed == 0 and heads_removed == 0 and not final:
            history.append(Iterate(t, eta, a.mprime, a.scores.numel(), history[-1].params, history[-1].macs, None,
                                   history[-1].val, 0, time.perf_counter() - began, cuts.keep, cuts.heads))
            console.print(f"lda: iteration {t} (η={eta:.3f}, M′={a.mprime}): nothing below the threshold")
            continue
        new = apply_step(copy.deepcopy(cur), plan)
        recalibrate(new, cur, classifier, a.mean, ctx.calib, o, ctx.device, ctx.batch_size)
        cuts = cuts.then(plan)
        acc_cut, feats_cut = validation_pass(new, val, classifier, ctx.device, ctx.batch_size)
        rounds += 1
        before = copy.deepcopy(new.state_dict()) if o.keep_unless_better else None
        finetune_round(new, ctx.train, o, rounds, ctx.device, teacher=base)
        new.eval()
        acc, feats = validation_pass(new, val, classifier, ctx.device, ctx.batch_size)
        if before is not None and acc < acc_cut:  # a short, high-lr round can cost more than it repairs
            console.print(f"lda: fine-tuning lowered validation accuracy to {acc:.4f}: kept the repaired cut")
            new.load_state_dict(before)
            acc, feats = acc_cut, feats_cut
        size = model_size(new, ctx.input_size)
        it = Iterate(t, round(eta, 6), a.mprime, a.scores.numel(), size["params"], size["macs"], acc_cut, acc,
                     removed, time.perf_counter() - began, cuts.keep, cuts.heads, heads_removed)
        history.append(it)
        console.print(f"lda: iteration {t} (η={eta:.3f}, M′={a.mprime}/{a.scores.numel()}): {it.params:,} params "
                      f"({it.params / base_size['params']:.4f}), {it.macs:,} MACs, val acc {acc_cut:.4f} after the "
                      f"cut and recalibration, {acc:.4f} after fine-tuning, {it.seconds:.0f} s")
        below = floor is not None and acc < floor
        if not below and (target is None or final):
            best = _better(best, (it, new), o.select)
        misses = misses + 1 if below else 0
        if below and (misses > o.patience or final):
            stop = f"validation accuracy {acc:.4f} fell below the floor {floor:.4f}" + (
                f" ({misses} iterations in a row)" if misses > 1 else "")
            break
        cur = new
        if final:
            stop = f"target {target} reached"
            break
    else:
        stop = f"max_iters={o.max_iters} reached"
    if best is None:
        raise NetslimError(f"lda could not reach target {target} above the accuracy floor ({stop})")
    chosen, model = best
    plan = replace(cuts, keep=chosen.keep, heads=chosen.heads).plan(ctx)
    plan.meta.update({"fisher": o.fisher, "selected_iteration": chosen.index, "stop": stop, "floor": floor,
                      "target": str(target) if target else None, "select": o.select, "finetune_rounds":
                      _rounds_until(history, chosen.index), "options": asdict(o),
                      "iterations": [h.row() for h in history]})
    console.print(f"lda: kept iteration {chosen.index} ({chosen.params:,} params, val acc {chosen.val:.4f}); {stop}")
    return LoopOutcome(plan, model if model is not base else copy.deepcopy(base), history, chosen, floor, base_size,
                       stop, o, analyses)


def _rounds_until(history: list[Iterate], index: int) -> int:
    """Fine-tuning rounds that produced iterate `index` (every iteration that cut was fine-tuned)."""
    return sum(1 for h in history if 0 < h.index <= index and h.val_cut is not None)


def _predecision_width(model: nn.Module, classifier: str) -> int:
    head = model.get_submodule(classifier)
    return int(head.in_features) if isinstance(head, nn.Linear) else -1


def _sub_context(ctx: Context, model: nn.Module) -> Context:
    return Context(model=model.eval(), arch=ctx.arch, num_classes=ctx.num_classes, input_size=ctx.input_size,
                   calib=ctx.calib, train=ctx.train, val=ctx.val, target=None, options=ctx.options,
                   device=ctx.device, batch_size=ctx.batch_size, cache=AnalysisCache())


def _better(best: tuple[Iterate, nn.Module] | None, cand: tuple[Iterate, nn.Module], select: str
            ) -> tuple[Iterate, nn.Module]:
    if best is None:
        return cand
    b, c = best[0], cand[0]
    key = (lambda i: (i.params, -i.val)) if select == "smallest" else (lambda i: (-i.val, i.params))
    return cand if key(c) < key(b) else best


def _fit_target(sub: Context, a: LdaAnalysis, eta: float, o: LoopOptions, target: Any, base_size: dict[str, int],
                plan: Plan, size: Callable[[Plan], int], last: bool) -> tuple[Plan, float, bool]:
    """If the step at η would cross the target, bisect η so the cut just fits it (and say it is final);
    `size` weighs a step's Plan (current numbering) by the target's measure of the whole cut."""
    goal = target.fraction * base_size[target.kind]
    hi = eta
    if size(plan) > goal:
        if not last:
            return plan, eta, False
        while size(plan_at(sub, a, hi, o)) > goal:  # last chance: raise η beyond the schedule
            if hi > 1e3:
                kept = size(plan) / base_size[target.kind]
                raise NetslimError(f"target {target} is unreachable: lda keeps {kept:.4f} of the {target.kind} "
                                   f"at least after {o.max_iters} iterations")
            hi *= 2
    lo = 0.0
    if size(plan_at(sub, a, lo, o)) <= goal:
        return plan_at(sub, a, lo, o), lo, True
    for _ in range(30):
        mid = (lo + hi) / 2
        if size(plan_at(sub, a, mid, o)) <= goal:
            hi = mid
        else:
            lo = mid
    return plan_at(sub, a, hi, o), hi, True


__all__ = ["LoopOptions", "LoopOutcome", "Iterate", "run_loop", "finetune_round", "validation_pass", "ClassMoments"]
