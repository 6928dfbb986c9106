"""Principal Filter Analysis (PFA-KL, PFA-En, budget-targeted PFA-En).

The spectrum of each layer's response covariance says how many filters it needs; the correlation
matrix says which ones to drop. Coupled layers (residual adds, depthwise pairs) share one width, the
largest any member asks for, and one selection, made on the members' mean |correlation|. Attention keeps
whole heads by the same rules on its head outputs (heads.py), from the same τ under a budget.
"""

from __future__ import annotations

from collections.abc import Callable

from netslim.cost.sizemodel import SizeModel, enabled, fast_plan_size
from netslim.cost.targets import bisect, fits
from netslim.errors import NetslimError
from netslim.methods.base import Context, MethodResult, register
from netslim.methods.common.heads import HeadSpectrum, head_spectra, planned_heads
from netslim.methods.common.ranking import plan_from_widths, planned_widths
from netslim.methods.pfa.options import MIN_FRACTION, PFAEnOptions, PFAOptions
from netslim.methods.pfa.report import head_report, report
from netslim.methods.pfa.spectra import GroupSpectrum, spectra
from netslim.plan import Plan


def _floor_options(ctx: Context, default_fraction: float) -> tuple[int, float]:
    """Options min_keep (filters) and min_fraction (of each layer's width): the least a layer keeps."""
    return int(ctx.option("min_keep", 1)), float(ctx.option("min_fraction", default_fraction))


def _head_spectra(ctx: Context) -> list[HeadSpectrum]:
    """The attention PFA cuts heads of (none with --opt heads=false); after spectra(), which checks the data."""
    return head_spectra(ctx, ctx.option("reduce", "max"), ctx.option("selection", "l1-max")) \
        if ctx.option("heads", True) else []


def _with_heads(plan: Plan, heads: dict[str, list[int]]) -> Plan:
    plan.heads = dict(heads)
    return plan


def _result(plan: Plan, specs: list[GroupSpectrum], widths: dict[str, int], meta: dict,
            hspecs: list[HeadSpectrum]) -> MethodResult:
    sections, artifacts = report(specs, widths, meta)
    if hspecs:
        sections.append(head_report(hspecs, plan.heads))
    return MethodResult(plan, report=sections, artifacts=artifacts)


def _plan(ctx: Context, method: str, widths: dict[str, int], specs: list[GroupSpectrum], meta: dict,
          hspecs: list[HeadSpectrum], heads: dict[str, list[int]]) -> MethodResult:
    plan = plan_from_widths(ctx, method, {s.root: s.scores() for s in specs}, widths, meta)
    return _result(_with_heads(plan, heads), specs, widths, meta, hspecs)


@register("pfa-kl", "PFA-KL: parameter-free width from the KL divergence of each layer's spectrum",
          options=PFAOptions)
def pfa_kl(ctx: Context) -> MethodResult:
    min_keep, min_fraction = _floor_options(ctx, 0.0)
    specs = spectra(ctx)
    if ctx.target is not None:
        raise NetslimError("pfa-kl is parameter-free; use --method pfa-en to meet a --target")
    hspecs = _head_spectra(ctx)
    widths = {s.root: s.kl_width(min_keep, min_fraction) for s in specs}
    heads = planned_heads(hspecs, {h.name: h.kl_count(min_fraction) for h in hspecs})
    return _plan(ctx, "pfa-kl", widths, specs, {"rule": "ceil(C (1 - KL/log C))"}, hspecs, heads)


@register("pfa-en", "PFA-En: keep a fraction of each layer's spectral energy (--opt energy=F), or bisect it to "
          "--target", options=PFAEnOptions)
def pfa_en(ctx: Context) -> MethodResult:
    min_keep, min_fraction = _floor_options(ctx, MIN_FRACTION)
    specs = spectra(ctx)
    hspecs = _head_spectra(ctx)

    def widths(tau: float) -> dict[str, int]:
        return {s.root: s.energy_width(tau, min_keep, min_fraction) for s in specs}

    def heads(tau: float) -> dict[str, list[int]]:
        return planned_heads(hspecs, {h.name: h.energy_count(tau, min_fraction) for h in hspecs})

    if ctx.target is None:
        tau = float(ctx.option("energy", 0.95))
        return _plan(ctx, "pfa-en", widths(tau), specs, {"energy": tau}, hspecs, heads(tau))
    scores = {s.root: s.scores() for s in specs}

    def make(tau: float) -> Plan:
        return _with_heads(plan_from_widths(ctx, "pfa-en", scores, widths(tau), {"energy": round(tau, 8)}),
                           heads(tau))

    plan = bisect(make, ctx.target, ctx.template(), 0.0, 1.0,
                  why=lambda _: _unreachable(ctx, specs, scores, min_keep, min_fraction, hspecs))
    tau, meta, kept_heads = plan.meta["energy"], dict(plan.meta), plan.heads  # τ rounded for the record
    kept = plan.widths()
    w, plan = _top_up(ctx, specs, {s.root: kept.get(s.root, s.width) for s in specs},
                      lambda w: _with_heads(plan_from_widths(ctx, "pfa-en", scores, w, meta), kept_heads))
    return _result(plan, specs, w, {"energy": tau, "target": str(ctx.target)}, hspecs)


def _top_up(ctx: Context, specs: list[GroupSpectrum], widths: dict[str, int],
            make: Callable[[dict[str, int]], Plan]) -> tuple[dict[str, int], Plan]:
    """Spend what one shared τ leaves of the budget: add a filter (a `round_to` step) where the next
    eigenvalue holds the most energy, as long as the network still fits. One τ step can move several
    layers at once, so the bisection alone may stop short by more than a filter's worth. The heads the
    bisection kept stay as they are (whole heads are too coarse a step to top up with)."""
    assert ctx.target is not None
    target = ctx.target
    step = max(1, int(ctx.option("round_to", 1)))
    template = ctx.template()
    base = fast_plan_size(ctx.base_plan("pfa-en"), template)
    sizes = SizeModel.of(template, ctx.input_size) if enabled() and not make(widths).heads else None
    open_ = {s.root: s for s in specs if s.analysable}
    added = 0

    def fit(w: dict[str, int]) -> bool:
        """Sized from the widths alone when the size model can (no Plan per trial), else by the Plan."""
        size = sizes.size_widths(planned_widths(ctx, w)) if sizes is not None else None
        if size is None:
            return fits(make(w), target, base, template)
        return size[target.kind] <= target.fraction * base[target.kind]

    def gain(s: GroupSpectrum, k: int) -> float:
        return max(float(e[k:k + step].sum() / e.sum()) if float(e.sum()) > 0 else 0.0 for e in s.eigs)

    while open_:
        for s in sorted(open_.values(), key=lambda s: gain(s, widths[s.root]), reverse=True):
            if widths[s.root] + step > s.width:
                del open_[s.root]
                continue
            trial = {**widths, s.root: widths[s.root] + step}
            if fit(trial):
                widths, added = trial, added + step
                break
            del open_[s.root]  # the budget only shrinks from here: this layer's next step never fits
        else:
            break
    plan = make(widths)
    plan.meta["topped_up_filters"] = added
    return widths, plan


def _unreachable(ctx: Context, specs: list[GroupSpectrum], scores: dict, min_keep: int, min_fraction: float,
                 hspecs: list[HeadSpectrum]) -> str:
    """Why PFA-En's smallest network is too big: groups kept whole for want of samples, the floor, or layers
    that no channel group cuts (attention beyond the heads PFA may cut)."""
    assert ctx.target is not None
    kind, fraction = ctx.target.kind, ctx.target.fraction
    template = ctx.template()
    base = fast_plan_size(ctx.base_plan("pfa-en"), template)[kind]

    def kept(widths: dict[str, int], heads: dict[str, list[int]]) -> float:
        return fast_plan_size(_with_heads(plan_from_widths(ctx, "pfa-en", scores, widths), heads), template)[kind] \
            / base

    fewest = planned_heads(hspecs, {h.name: h.count(0, min_fraction) for h in hspecs})
    whole = sorted((s for s in specs if not s.analysable), key=lambda s: -s.width)
    could = kept({s.root: s.floor(min_keep, min_fraction) for s in specs}, fewest) if whole else 0.0
    reasons = []
    if whole:
        names = ", ".join(f"{s.root} ({s.width})" for s in whole[:3]) + (", ..." if len(whole) > 3 else "")
        more = (f"at least {whole[0].width + 1} calibration images (--calib-size)" if ctx.option("reduce", "max")
                != "spatial" else "more calibration images (--calib-size)")
        reasons.append(f"{len(whole)} of {len(specs)} channel groups are kept whole because they have no more "
                       f"calibration samples ({min(s.samples for s in whole)}) than channels ({names}); with {more} "
                       f"PFA can cut them, and its smallest network would keep {could:.4f} of the {kind}")
    if not whole or could > fraction:
        lower = "--opt min_fraction=0" + (" and min_keep=1" if min_keep > 1 else "")
        reasons.append(f"the floor keeps every analysed group at least max(min_keep={min_keep}, "
                       f"min_fraction={min_fraction:g} of its width) channels ({lower} lowers it)")
        least = kept(dict.fromkeys((s.root for s in specs), 1), {h.name: h.keep(1) for h in hspecs if h.heads > 1})
        if least > fraction:
            one = " and one head per attention" if hspecs else ""
            attention = "attention's kept head" if hspecs else "attention"
            reasons.append(f"even one channel per group{one} keeps {least:.4f} of the {kind}: the rest is in layers "
                           f"no channel group cuts (grouped convolutions, {attention}, layers tied to the outputs)")
    return "; ".join(reasons)
