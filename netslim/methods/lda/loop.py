"""The deep LDA loop: score the pre-decision layer, trace utility back, cut, fine-tune, repeat.

Iteration t (η_t = eta_start + (t-1)·eta_step): Fisher scores and M′ on the current network (lda.py),
utility trace of the M′ selected responses (lda_trace.py), then in every coupled group remove the
channels whose utility is below η_t · std(non-zero utilities of that group); a group's utility is the
per-channel maximum over its member layers (a residual stream channel stays if any block that writes
it needs it). The cut is then repaired before fine-tuning: BatchNorm statistics are re-estimated on
calibration images (option bn_recal), and the classifier bias is reset so that the cut network's mean
logits equal the uncut network's (option bias_correction): the removed pre-decision neurons then count
at their mean, as when M′ was judged, instead of at zero. The cut network is fine-tuned for a short round
(options ft_*) and scored on ctx.val; a round that lowers the validation accuracy is undone
(keep_unless_better): the base was trained on the whole training split, so a short high-lr round on
part of it can cost more than it repairs.

Stopping: with --min-accuracy A (option min_accuracy) the loop stops at the first iterate whose
validation accuracy falls below A (with patience=p, at the (p+1)-th in a row: short fine-tuning rounds
are noisy and the next one may recover; an iterate below A is never kept), and keeps (select=smallest,
the default) the smallest iterate at or above A, or (select=best) the most accurate one; without any
rule the floor is the unpruned validation accuracy minus max_drop. With --target params=F / flops=F the
step that would cross the target is bisected on η so the result just fits, and the loop stops there.
The test split is never looked at.

Keeps are composed across iterations into the base model's channel numbering, so the returned Plan
applies to the base; the pruned and fine-tuned network itself is handed to the pipeline in
ctx.cache["model"] (compress() uses it instead of re-applying the Plan to the base weights).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from rich.console import Console
from torch import nn

from netslim.cost.budget import model_size, plan_size
from netslim.data import ImageSet, batches, calibration_subset
from netslim.errors import NetslimError
from netslim.methods.base import Context
from netslim.methods.lda.core import (
    ClassMoments,
    choose_mprime,
    fisher_scores,
    mprime_curve,
    predecision_features,
    predecision_moments,
    ranking,
)
from netslim.methods.lda.trace import trace
from netslim.plan import Plan
from netslim.probe import response_modules
from netslim.surgery.apply import apply_plan


@dataclass
class LoopOptions:
    """Knobs of the loop (all settable with --opt key=value; min_accuracy also with --min-accuracy)."""

    min_accuracy: float | None = None
    max_drop: float = 0.02  # floor = unpruned val accuracy - max_drop when neither a floor nor a target is given
    eta_start: float = 0.1
    eta_step: float = 0.1
    max_iters: int = 10
    fisher: str = "diag"  # or "eig": full generalised eigenproblem
    mprime: int = 0  # fixed M′ (0: choose on validation data)
    mprime_tol: float = 0.01
    trace_images: int = 10  # per class
    min_keep: int = 1
    select: str = "smallest"  # or "best" (highest validation accuracy at or above the floor)
    patience: int = 0  # iterations in a row below the floor tolerated before stopping (never selected)
    val_images: int = 0  # 0: all of ctx.val
    ft_epochs: int = 1
    ft_lr: float = 0.01
    ft_batch: int = 128
    ft_images: int = 0  # images per fine-tuning round (0: all of ctx.train)
    ft_schedule: str = "onecycle"
    ft_weight_decay: float = 5e-4
    ft_distill: float = 0.0  # weight of the unpruned network's softened outputs in each round's loss
    ft_temperature: float = 4.0
    bn_recal: int = 1000  # after a cut, re-estimate BatchNorm statistics on this many calibration images
    bias_correction: bool = True  # after a cut, reset the classifier bias to keep the mean logits
    keep_unless_better: bool = True  # a fine-tuning round that lowers validation accuracy is undone
    bias_images: int = 256  # calibration images that measure the cut network's mean features
    verbose: bool = True

    @classmethod
    def from_context(cls, ctx: Context) -> LoopOptions:
        o = cls()
        for name, default in asdict(o).items():
            value = ctx.option(name, default)
            kind = type(default) if default is not None else float
            if value is None:
                continue
            try:
                setattr(o, name, kind(value) if not isinstance(default, bool) else _flag(value))
            except (TypeError, ValueError):
                raise NetslimError(f"lda option {name}={value!r} is not a {kind.__name__}") from None
        o.check()
        return o

    def check(self) -> None:
        if self.min_accuracy is not None and not 0.0 < self.min_accuracy <= 1.0:
            raise NetslimError(f"--min-accuracy must be in (0, 1], not {self.min_accuracy}")
        if self.eta_start <= 0 or self.eta_step < 0 or self.max_iters < 1:
            raise NetslimError("lda needs eta_start > 0, eta_step >= 0 and max_iters >= 1")
        if self.fisher not in ("diag", "eig"):
            raise NetslimError(f"lda option fisher must be diag or eig, not {self.fisher!r}")
        if self.select not in ("smallest", "best"):
            raise NetslimError(f"lda option select must be smallest or best, not {self.select!r}")
        if self.trace_images < 1 or self.min_keep < 1 or self.patience < 0:
            raise NetslimError("lda needs trace_images >= 1, min_keep >= 1 and patience >= 0")


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.lower() in ("1", "true", "yes", "on")
    return bool(value)


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

    def row(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("keep")
        return d


# ---------------------------------------------------------------- one analysis step
@dataclass
class Analysis:
    scores: torch.Tensor
    mprime: int
    curve: torch.Tensor
    utility: dict[str, torch.Tensor]  # group root -> (width,) utility
    mean: torch.Tensor  # (M,) training mean of the pre-decision neurons


def analyse_model(sub: Context, o: LoopOptions, val_feats: tuple[torch.Tensor, torch.Tensor]) -> Analysis:
    """Fisher scores, M′ on validation features, and per-group traced utility of the current model."""
    model, classifier, device = sub.model, sub.classifier, sub.device
    assert sub.calib is not None
    moments = predecision_moments(model, batches(sub.calib, sub.batch_size, device=device), classifier,
                                  sub.num_classes, device, full=o.fisher == "eig")
    scores = fisher_scores(moments, o.fisher)
    order = ranking(scores)
    head = model.get_submodule(classifier)
    curve = mprime_curve(order, *val_feats, head.weight, getattr(head, "bias", None), moments.mean)
    usable = int((scores > 0).sum())
    mprime = min(o.mprime, usable) if o.mprime > 0 else choose_mprime(curve, o.mprime_tol, usable)
    mask = torch.zeros(scores.numel())
    mask[order[:mprime]] = 1.0
    images = trace_set(sub.calib, o.trace_images)
    points = response_modules(model, sub.example(), [n for g in sub.groups() for n in g.layers])
    util = trace(model, (x for x, _ in batches(images, 64, device=device)), mask, classifier, points, device)
    utility = {}
    for g in sub.groups():
        members = [util[n] for n in g.layers if n in util]
        if members:
            utility[g.root] = torch.stack(members).amax(0)
    return Analysis(scores, mprime, curve, utility, moments.mean)


def trace_set(data: ImageSet, per_class: int) -> ImageSet:
    """The first `per_class` images of every class (data is already a random stratified subset)."""
    idx = [i for k in range(len(data.classes))
           for i in (data.labels == k).nonzero().flatten()[:per_class].tolist()]
    if not idx:
        raise NetslimError("no labelled images to trace utility with")
    return data.subset(sorted(idx))


def threshold_keep(utility: torch.Tensor, eta: float, min_keep: int) -> list[int]:
    """Channels whose utility is at least η·std(non-zero utilities); zero utility goes for any η > 0."""
    u = utility.double()
    nz = u[u > 0]
    thr = eta * float(nz.std()) if nz.numel() > 1 else 0.0
    keep = (u >= thr) & (u > 0) if eta > 0 else torch.ones_like(u, dtype=torch.bool)
    if int(keep.sum()) < min_keep:
        order = sorted(range(u.numel()), key=lambda j: (-float(u[j]), j))[:min_keep]
        keep = torch.zeros_like(keep)
        keep[order] = True
    return keep.nonzero().flatten().tolist()


def plan_at(sub: Context, a: Analysis, eta: float, o: LoopOptions) -> Plan:
    """Plan for the *current* model (its channel numbering) at threshold η."""
    plan = sub.base_plan("lda")
    for g in sub.groups():
        if g.root not in a.utility:
            continue
        keep = threshold_keep(a.utility[g.root], eta, min(o.min_keep, g.width))
        if len(keep) < g.width:
            for name in g.layers:
                plan.keep[name] = keep
    return plan


def match_mean_logits(new: nn.Module, classifier: str, target: torch.Tensor, data: ImageSet, device: str,
                      batch_size: int) -> bool:
    """Reset the cut network's classifier bias so its mean logits on `data` equal `target` (the uncut
    network's, b + W·mean). Dropped pre-decision neurons are thereby replaced by their mean (how M′ was
    judged) rather than by zero, and the mean shift that cuts further down cause in the kept ones is
    absorbed too; for a cut of the pre-decision layer alone it adds exactly W[:, dropped]·mean[dropped]."""
    head = new.get_submodule(classifier)
    if not isinstance(head, nn.Linear) or head.bias is None or head.out_features != target.numel():
        return False
    feats, _ = predecision_features(new, batches(data, batch_size, device=device), classifier, device)
    with torch.no_grad():
        bias = target.double() - head.weight.detach().double().cpu() @ feats.double().mean(0)
        head.bias.copy_(bias.to(head.bias))
    return True


def recalibrate(new: nn.Module, old: nn.Module, classifier: str, mean: torch.Tensor, calib: ImageSet,
                o: LoopOptions, device: str, batch_size: int) -> None:
    """Repair a fresh cut before fine-tuning: BatchNorm statistics re-estimated on calibration images,
    layers scaled back to their pre-cut variance (o.bn_recal; netslim.train.restore_scale), then the
    classifier bias reset to the uncut network's mean logits (o.bias_correction)."""
    from netslim.train import restore_scale

    if o.bn_recal > 0:
        restore_scale(new, lambda: batches(calib, batch_size, shuffle=True, device=device, seed=7), device, o.bn_recal)
    if o.bias_correction:
        images = calibration_subset(calib, min(o.bias_images, len(calib)), seed=3)
        match_mean_logits(new, classifier, _mean_logits(old, classifier, mean), images, device, batch_size)


def compose(base_keep: dict[str, list[int]], step: dict[str, list[int]], base_widths: dict[str, int]
            ) -> dict[str, list[int]]:
    """Keep lists in the base numbering after applying `step` (current numbering) on top of `base_keep`."""
    out = dict(base_keep)
    for name, idx in step.items():
        prev = base_keep.get(name, list(range(base_widths[name])))
        out[name] = [prev[i] for i in idx]
    return out


# ---------------------------------------------------------------- training and evaluation
def finetune_round(model: nn.Module, train: ImageSet, o: LoopOptions, round_index: int, device: str,
                   teacher: nn.Module | None = None) -> list[dict]:
    """One short fine-tuning round (ft_epochs on ft_images random training images, seeded by the round),
    distilled from `teacher` (the unpruned network) when ft_distill > 0."""
    from netslim.train import fit

    if o.ft_epochs <= 0:
        return []
    data = train
    if 0 < o.ft_images < len(train):
        data = calibration_subset(train, o.ft_images, seed=1000 + round_index)
    size = min(o.ft_batch, len(data))
    loader = batches(data, size, shuffle=True, augment=True, device=device, seed=round_index, drop_last=True)
    return fit(model, loader, epochs=o.ft_epochs, lr=o.ft_lr, schedule=o.ft_schedule,
               weight_decay=o.ft_weight_decay, device=device, progress=False, seed=round_index,
               teacher=teacher, distill=o.ft_distill, temperature=o.ft_temperature)


def validate(model: nn.Module, val: ImageSet, classifier: str, device: str, batch_size: int
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
def run_loop(ctx: Context) -> Plan:
    o = LoopOptions.from_context(ctx)
    if ctx.calib is None or ctx.val is None or ctx.train is None:
        raise NetslimError("lda needs labelled training data with a validation split held out of it")
    console = Console(stderr=True, quiet=not o.verbose)
    val = ctx.val if not 0 < o.val_images < len(ctx.val) else calibration_subset(ctx.val, o.val_images, seed=1)
    base = ctx.model.eval()
    classifier = ctx.classifier
    base_widths = {n: w for g in ctx.groups() for n in g.layers for w in [g.width]}
    base_size = model_size(base, ctx.input_size)
    t0 = time.perf_counter()
    acc0, feats = validate(base, val, classifier, ctx.device, ctx.batch_size)
    target = ctx.target
    if target is not None and target.kind not in ("params", "flops"):
        raise NetslimError(f"lda meets params or flops targets, not {target.kind}")
    floor = o.min_accuracy
    if floor is None and target is None:
        floor = acc0 - o.max_drop
    if floor is not None and acc0 < floor:
        raise NetslimError(f"the unpruned network's validation accuracy {acc0:.4f} is already below the floor "
                           f"{floor:.4f}; lower --min-accuracy")
    start = Iterate(0, None, None, _predecision_width(base, classifier), base_size["params"], base_size["macs"],
                    None, acc0, 0, time.perf_counter() - t0)
    history = [start]
    console.print(f"lda: unpruned {start.params:,} params, validation accuracy {acc0:.4f}"
                  + (f", floor {floor:.4f}" if floor is not None else "") + (f", target {target}" if target else ""))
    best: tuple[Iterate, nn.Module] | None = (start, base) if target is None else None
    cur, keep_base, rounds, misses, stop = base, {}, 0, 0, ""
    analyses: list[Analysis] = []
    for t in range(1, o.max_iters + 1):
        began = time.perf_counter()
        eta = o.eta_start + (t - 1) * o.eta_step
        sub = _sub_context(ctx, cur)
        a = analyse_model(sub, o, feats)
        analyses.append(a)
        plan, final = plan_at(sub, a, eta, o), False
        if target is not None:
            plan, eta, final = _fit_target(sub, a, eta, o, target, base_size, plan, last=t == o.max_iters)
        removed = sum(g.width - len(plan.keep[g.root]) for g in sub.groups() if g.root in plan.keep)
        if removed == 0 and not final:
            history.append(Iterate(t, eta, a.mprime, a.scores.numel(), history[-1].params, history[-1].macs, None,
                                   history[-1].val, 0, time.perf_counter() - began, keep_base))
            console.print(f"lda: iteration {t} (η={eta:.3f}, M′={a.mprime}): nothing below the threshold")
            continue
        new = apply_plan(copy.deepcopy(cur), plan) if plan.keep else copy.deepcopy(cur)
        recalibrate(new, cur, classifier, a.mean, ctx.calib, o, ctx.device, ctx.batch_size)
        keep_base = compose(keep_base, plan.keep, base_widths)
        acc_cut, feats_cut = validate(new, val, classifier, ctx.device, ctx.batch_size)
        rounds += 1
        before = copy.deepcopy(new.state_dict()) if o.keep_unless_better else None
        finetune_round(new, ctx.train, o, rounds, ctx.device, teacher=base)
        new.eval()
        acc, feats = validate(new, val, classifier, ctx.device, ctx.batch_size)
        if before is not None and acc < acc_cut:  # a short, high-lr round can cost more than it repairs
            console.print(f"lda: fine-tuning lowered validation accuracy to {acc:.4f}: kept the repaired cut")
            new.load_state_dict(before)
            acc, feats = acc_cut, feats_cut
        size = model_size(new, ctx.input_size)
        it = Iterate(t, round(eta, 6), a.mprime, a.scores.numel(), size["params"], size["macs"], acc_cut, acc,
                     removed, time.perf_counter() - began, keep_base)
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
    ctx.cache["model"] = model if model is not base else copy.deepcopy(base)
    plan = ctx.base_plan("lda")
    plan.keep = {n: sorted(k) for n, k in chosen.keep.items() if len(k) < base_widths[n]}
    plan.meta.update({"fisher": o.fisher, "selected_iteration": chosen.index, "stop": stop, "floor": floor,
                      "target": str(target) if target else None, "select": o.select, "finetune_rounds":
                      _rounds_until(history, chosen.index), "options": asdict(o),
                      "iterations": [h.row() for h in history]})
    _add_report(ctx, history, chosen, floor, base_size, stop, o, analyses)
    console.print(f"lda: kept iteration {chosen.index} ({chosen.params:,} params, val acc {chosen.val:.4f}); {stop}")
    return plan


def _rounds_until(history: list[Iterate], index: int) -> int:
    """Fine-tuning rounds that produced iterate `index` (every iteration that cut was fine-tuned)."""
    return sum(1 for h in history if 0 < h.index <= index and h.val_cut is not None)


def _mean_logits(model: nn.Module, classifier: str, mean: torch.Tensor) -> torch.Tensor:
    """Mean logits b + W·mean of a Linear classifier fed features with the given mean."""
    head = model.get_submodule(classifier)
    if not isinstance(head, nn.Linear):
        return torch.empty(0)
    out = head.weight.detach().double().cpu() @ mean.double()
    return out + head.bias.detach().double().cpu() if head.bias is not None else out


def _predecision_width(model: nn.Module, classifier: str) -> int:
    head = model.get_submodule(classifier)
    return int(head.in_features) if isinstance(head, nn.Linear) else -1


def _sub_context(ctx: Context, model: nn.Module) -> Context:
    return Context(model=model.eval(), arch=ctx.arch, num_classes=ctx.num_classes, input_size=ctx.input_size,
                   calib=ctx.calib, train=ctx.train, val=ctx.val, target=None, options=ctx.options,
                   device=ctx.device, batch_size=ctx.batch_size, cache={})


def _better(best: tuple[Iterate, nn.Module] | None, cand: tuple[Iterate, nn.Module], select: str
            ) -> tuple[Iterate, nn.Module]:
    if best is None:
        return cand
    b, c = best[0], cand[0]
    key = (lambda i: (i.params, -i.val)) if select == "smallest" else (lambda i: (-i.val, i.params))
    return cand if key(c) < key(b) else best


def _fit_target(sub: Context, a: Analysis, eta: float, o: LoopOptions, target: Any, base_size: dict[str, int],
                plan: Plan, last: bool) -> tuple[Plan, float, bool]:
    """If the step at η would cross the target, bisect η so the cut just fits it (and say it is final)."""
    goal = target.fraction * base_size[target.kind]
    template = sub.template()

    def size(p: Plan) -> int:
        return plan_size(p, template)[target.kind]

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


# ---------------------------------------------------------------- report
def _add_report(ctx: Context, history: list[Iterate], chosen: Iterate, floor: float | None,
                base: dict[str, int], stop: str, o: LoopOptions, analyses: list[Analysis]) -> None:
    from netslim.report.markdown import table

    rows = [[h.index, "–" if h.eta is None else f"{h.eta:.3f}", "–" if h.mprime is None else
             f"{h.mprime}/{h.predecision}", h.params, f"{h.params / base['params']:.4f}", h.macs,
             f"{h.macs / base['macs']:.4f}", h.val_cut, h.val, h.removed, round(h.seconds, 1),
             "◀" if h.index == chosen.index else ""] for h in history]
    ft = f"{o.ft_epochs} epoch(s) on {o.ft_images or 'all'} training images, lr {o.ft_lr}, {o.ft_schedule}"
    ctx.cache["report"] = [
        f"## Deep LDA iterations\n\nFisher scores: {o.fisher}; M′ within {o.mprime_tol} of the full pre-decision "
        f"layer's validation accuracy; utility traced from {o.trace_images} images per class; threshold η·std of the "
        f"non-zero utilities per layer, η = {o.eta_start}, {o.eta_start + o.eta_step:g}, …; fine-tuning per round: "
        f"{ft}. Floor: {'–' if floor is None else f'{floor:.4f}'} (validation); stop: {stop}; kept iteration "
        f"{chosen.index} (select={o.select}).\n\n![iterations](lda_iterations.png)\n\n" + table(
            ["iter", "η", "M′/M", "params", "params/base", "MACs", "MACs/base", "val acc after cut + recal.",
             "val acc after fine-tune", "channels removed", "seconds", "kept"], rows)]
    scores = analyses[0].scores if analyses else None
    ctx.cache.setdefault("artifacts", {})["lda_iterations.png"] = lambda path: iterations_plot(
        path, history, chosen, floor, base, scores, analyses[0].mprime if analyses else None)


def iterations_plot(path: Any, history: list[Iterate], chosen: Iterate, floor: float | None, base: dict[str, int],
                    scores: torch.Tensor | None, mprime: int | None) -> None:
    """Left: validation accuracy against kept parameters per iteration. Right: sorted Fisher scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from netslim.report.markdown import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    ax = axes[0]
    frac = [h.params / base["params"] for h in history]
    ax.plot(frac, [h.val for h in history], "o-", label="after fine-tuning")
    cut = [(f, h.val_cut) for f, h in zip(frac, history, strict=True) if h.val_cut is not None]
    if cut:
        ax.plot(*zip(*cut, strict=True), "x", color="grey", label="after the cut (recalibrated)")
    for f, h in zip(frac, history, strict=True):
        ax.annotate(str(h.index), (f, h.val), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.plot([chosen.params / base["params"]], [chosen.val], "s", mfc="none", ms=12, color="red", label="kept")
    if floor is not None:
        ax.axhline(floor, color="red", lw=0.8, ls="--", label="floor")
    ax.set_xscale("log")
    ax.set_xlabel("parameters kept (fraction of the unpruned task network)")
    ax.set_ylabel("validation accuracy")
    ax.legend(fontsize=7)
    ax = axes[1]
    if scores is not None:
        s = scores.sort(descending=True).values.numpy()
        ax.semilogy(range(1, len(s) + 1), s.clip(min=1e-6))
        if mprime:
            ax.axvline(mprime, color="red", lw=0.8)
        ax.set_title(f"Fisher scores, first iteration (M′={mprime})", fontsize=9)
        ax.set_xlabel("pre-decision neuron (sorted)")
    fig.tight_layout()
    save_figure(fig, path)


__all__ = ["LoopOptions", "Iterate", "run_loop", "analyse_model", "threshold_keep", "compose", "finetune_round",
           "trace_set", "ClassMoments"]
