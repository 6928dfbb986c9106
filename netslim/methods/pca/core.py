"""PCA design: width and depth of a network from one PCA pass, then one training run (from scratch).

Every spatial position of a conv response is a sample, so a few hundred images give hundreds of
thousands of samples per layer. A layer's width becomes its number of significant dimensions (the
smallest k holding a fraction tau of the response variance, default 0.999); its depth follows from
where those dimensions stop growing (netslim.methods.pca.depth). The covariance comes from the shared
probe and the spectral arithmetic from netslim.methods.common.spectral, the same as PFA's. The shared
analysis is in analysis.py, the report and plot in report.py.
"""

from __future__ import annotations

import torch

from netslim.cost.targets import bisect
from netslim.methods.base import Context, MethodResult, register
from netslim.methods.common.heads import HeadSpectrum, head_spectra, planned_heads
from netslim.methods.common.ranking import plan_from_widths
from netslim.methods.common.selection import group_order, order_scores
from netslim.methods.pca.analysis import Design, PcaAnalysis, analyse, dropped, image_count, spatial_stats
from netslim.methods.pca.depth import DropUnit, block_units, decide, sequential_units
from netslim.methods.pca.options import PCAOptions
from netslim.methods.pca.report import head_section, report
from netslim.plan import Plan

DEFAULT_VARIANCE = 0.999


def _units(ctx: Context, a: PcaAnalysis) -> list[DropUnit]:
    if a.kind == "sequential":
        return sequential_units(ctx.model, ctx.example())
    if a.kind == "residual":
        return block_units(ctx.model, ctx.example())
    return []


def design(ctx: Context, a: PcaAnalysis, tau: float, depth_tau: float | None, units: list[DropUnit]) -> Design:
    """Widths at `tau` and the depth decision at `depth_tau` (default: tau) for the analysed network."""
    min_keep = int(ctx.option("min_keep", 1))
    depth_tau = tau if depth_tau is None else depth_tau
    source = a.blocks if a.kind == "residual" else a.layers
    for u in units:
        s = source.get(u.name)
        u.dims = s.dims(depth_tau, min_keep) if s is not None and s.analysable else None
    drop = decide(units, str(ctx.option("depth_rule", "grow")), float(ctx.option("depth_threshold", 0.0)),
                  str(ctx.option("depth_scope", "stage")), str(ctx.option("saturated", "keep")))
    widths = {}
    for g in ctx.groups():
        members = [a.layers.get(n) for n in g.layers if not dropped(n, drop)]
        if not members or any(s is None or not s.analysable for s in members):
            widths[g.root] = g.width
        else:
            widths[g.root] = max(s.dims(tau, min_keep) for s in members if s is not None)
    return Design(tau, depth_tau, widths, units, drop)


class _Scores(dict):
    """Channel scores per group root, computed on first use (only groups that are cut need them).

    They decide which channels survive under --init inherit: PFA's correlation order on the spatial statistics.
    """

    def __init__(self, ctx: Context) -> None:
        super().__init__()
        self.stats = spatial_stats(ctx)[0]
        self.groups = {g.root: g for g in ctx.groups()}

    def __missing__(self, root: str) -> torch.Tensor:
        g = self.groups[root]
        members = [self.stats[n] for n in g.layers if n in self.stats]
        score = order_scores(group_order(members, "l1-max")) if members else torch.zeros(g.width)
        self[root] = score
        return score


def _plan(ctx: Context, a: PcaAnalysis, d: Design, scores: dict[str, torch.Tensor], meta: dict,
          hspecs: list[HeadSpectrum]) -> Plan:
    plan = plan_from_widths(ctx, "pca", scores, d.widths, meta)
    plan.keep = {n: idx for n, idx in plan.keep.items() if not dropped(n, d.drop)}
    plan.drop = list(d.drop)
    heads = planned_heads(hspecs, {h.name: h.energy_count(d.tau) for h in hspecs})
    plan.heads = {n: k for n, k in heads.items() if not dropped(n, d.drop)}
    return plan


def _head_spectra(ctx: Context) -> list[HeadSpectrum]:
    """Every token a sample (PCA's spatial mode), on the images the layers are analysed on; none with heads=false."""
    return head_spectra(ctx, "spatial", "l1-max", spatial_stats(ctx)[1]) if ctx.option("heads", True) else []


def _options(ctx: Context) -> tuple[float, float | None]:
    """(variance, depth_variance); PCAOptions checked their ranges when the method was called."""
    tau = float(ctx.option("variance", DEFAULT_VARIANCE))
    depth_tau = ctx.option("depth_variance", None)
    return tau, None if depth_tau is None else float(depth_tau)


def _meta(ctx: Context, a: PcaAnalysis, d: Design) -> dict:
    return {"variance": round(d.tau, 8), "depth_variance": round(d.depth_tau, 8), "structure": a.kind,
            "depth_rule": str(ctx.option("depth_rule", "grow")) if a.kind != "width-only" else "width only",
            "depth_threshold": float(ctx.option("depth_threshold", 0.0)),
            "depth_scope": str(ctx.option("depth_scope", "stage")), "saturated": str(ctx.option("saturated", "keep")),
            "images": a.images, "round_to": int(ctx.option("round_to", 1))}


@register("pca", "PCA design: width = significant dimensions of each layer (--opt variance=F), depth = where they "
          "stop growing; the designed network is trained from scratch", retrain="scratch", options=PCAOptions)
def pca(ctx: Context) -> MethodResult:
    tau, depth_tau = _options(ctx)
    a = analyse(ctx)
    units = _units(ctx, a)
    key = f"pca:scores:{image_count(ctx)}"
    if key not in ctx.cache.derived:
        ctx.cache.derived[key] = _Scores(ctx)
    scores, hspecs = ctx.cache.derived[key], _head_spectra(ctx)
    if ctx.target is None:
        d = design(ctx, a, tau, depth_tau, units)
        plan = _plan(ctx, a, d, scores, _meta(ctx, a, d), hspecs)
    else:
        def make(t: float) -> Plan:
            d = design(ctx, a, max(t, 1e-9), depth_tau, units)
            return _plan(ctx, a, d, scores, _meta(ctx, a, d), hspecs)

        plan = bisect(make, ctx.target, ctx.template(), 0.0, 1.0)
        d = design(ctx, a, max(plan.meta["variance"], 1e-9), depth_tau, units)
        plan.meta["target"] = str(ctx.target)
    sections, artifacts = report(a, d, plan, ctx.groups())
    if hspecs:
        sections.append(head_section(hspecs, plan))
    return MethodResult(plan, report=sections, artifacts=artifacts)
