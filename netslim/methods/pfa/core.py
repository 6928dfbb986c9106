"""Principal Filter Analysis (PFA-KL, PFA-En, budget-targeted PFA-En).

The spectrum of each layer's response covariance says how many filters it needs; the correlation
matrix says which ones to drop. Coupled layers (residual adds, depthwise pairs) share one width, the
largest any member asks for, and one selection, made on the members' mean |correlation|.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from netslim.cost.budget import bisect, fits, plan_size
from netslim.errors import NetslimError
from netslim.methods.base import Context, register
from netslim.methods.common.ranking import plan_from_widths
from netslim.methods.common.selection import elimination_order
from netslim.methods.common.spectral import eigenvalues, energy_kept, energy_width, inactive, kl_divergence, kl_width
from netslim.methods.common.stats import response_stats
from netslim.plan import Plan

# PFA-En's default floor, a fraction of each layer's width. The last layers of a CIFAR network respond
# in about as many directions as there are classes, so at a tight budget one shared τ leaves them ~10
# filters: VGG-16 at 1/8 of its parameters then reaches 0.50 after a short fine-tune, against 0.83
# with this floor (benchmarks/results/pfa_floor_cpu.json). `--opt min_fraction=0` is the paper's rule.
MIN_FRACTION = 0.125


@dataclass
class GroupSpectrum:
    root: str
    width: int
    samples: int
    eigs: list[torch.Tensor]  # one spectrum per member layer
    order: list[int]  # elimination order (first removed first)
    analysable: bool

    def floor(self, min_keep: int, min_fraction: float) -> int:
        return min(self.width, max(min_keep, math.ceil(min_fraction * self.width - 1e-9)))

    def kl_width(self, min_keep: int, min_fraction: float = 0.0) -> int:
        floor = self.floor(min_keep, min_fraction)
        return max(kl_width(e, floor) for e in self.eigs) if self.analysable else self.width

    def energy_width(self, tau: float, min_keep: int, min_fraction: float = 0.0) -> int:
        floor = self.floor(min_keep, min_fraction)
        return max(energy_width(e, tau, floor) for e in self.eigs) if self.analysable else self.width

    def scores(self) -> torch.Tensor:
        s = torch.empty(self.width)
        s[self.order] = torch.arange(self.width, dtype=s.dtype)
        return s


def spectra(ctx: Context) -> list[GroupSpectrum]:
    """Per coupled group: the members' eigenvalue spectra and PFA's elimination order (cached)."""
    if "pfa_spectra" in ctx.cache:
        return ctx.cache["pfa_spectra"]
    stats = response_stats(ctx, ctx.option("reduce", "max"))
    strategy = ctx.option("selection", "l1-max")
    if strategy not in ("l1-max", "abs-max"):
        raise NetslimError(f"PFA selection must be l1-max or abs-max, not {strategy!r}")
    out = []
    for g in ctx.groups():
        members = [stats[n] for n in g.layers if n in stats]
        if not members:
            continue
        n = min(s.n for s in members)
        ok = n > g.width
        eigs = [eigenvalues(s.cov) for s in members]
        corr = torch.stack([s.corr.abs() for s in members]).mean(0)
        dead = torch.stack([inactive(s.variance) for s in members]).all(0)
        out.append(GroupSpectrum(g.root, g.width, n, eigs, elimination_order(corr, dead, strategy), ok))
    ctx.cache["pfa_spectra"] = out
    return out


def _floor_options(ctx: Context, default_fraction: float) -> tuple[int, float]:
    """Options min_keep (filters) and min_fraction (of each layer's width): the least a layer keeps."""
    min_keep, min_fraction = int(ctx.option("min_keep", 1)), float(ctx.option("min_fraction", default_fraction))
    if min_keep < 1 or not 0 <= min_fraction <= 1:
        raise NetslimError(f"PFA needs min_keep >= 1 and min_fraction in [0, 1], got {min_keep} and {min_fraction}")
    return min_keep, min_fraction


def _plan(ctx: Context, method: str, widths: dict[str, int], specs: list[GroupSpectrum], meta: dict) -> Plan:
    plan = plan_from_widths(ctx, method, {s.root: s.scores() for s in specs}, widths, meta)
    _add_report(ctx, specs, widths, meta)
    return plan


@register("pfa-kl", "PFA-KL: parameter-free width from the KL divergence of each layer's spectrum")
def pfa_kl(ctx: Context) -> Plan:
    min_keep, min_fraction = _floor_options(ctx, 0.0)
    specs = spectra(ctx)
    if ctx.target is not None:
        raise NetslimError("pfa-kl is parameter-free; use --method pfa-en to meet a --target")
    widths = {s.root: s.kl_width(min_keep, min_fraction) for s in specs}
    return _plan(ctx, "pfa-kl", widths, specs, {"rule": "ceil(C (1 - KL/log C))"})


@register("pfa-en", "PFA-En: keep a fraction of each layer's spectral energy (--energy), or bisect it to --target")
def pfa_en(ctx: Context) -> Plan:
    min_keep, min_fraction = _floor_options(ctx, MIN_FRACTION)
    specs = spectra(ctx)

    def widths(tau: float) -> dict[str, int]:
        return {s.root: s.energy_width(tau, min_keep, min_fraction) for s in specs}

    if ctx.target is None:
        tau = float(ctx.option("energy", 0.95))
        if not 0 < tau <= 1:
            raise NetslimError(f"--energy must be in (0, 1], not {tau}")
        return _plan(ctx, "pfa-en", widths(tau), specs, {"energy": tau})
    scores = {s.root: s.scores() for s in specs}

    def make(tau: float) -> Plan:
        return plan_from_widths(ctx, "pfa-en", scores, widths(tau), {"energy": round(tau, 8)})

    plan = bisect(make, ctx.target, ctx.template(), 0.0, 1.0)
    tau = plan.meta["energy"]  # rounded for the record: the widths come from the plan itself
    kept = plan.widths()
    w, plan = _top_up(ctx, specs, {s.root: kept.get(s.root, s.width) for s in specs},
                      lambda w: plan_from_widths(ctx, "pfa-en", scores, w, plan.meta))
    _add_report(ctx, specs, w, {"energy": tau, "target": str(ctx.target)})
    return plan


def _top_up(ctx: Context, specs: list[GroupSpectrum], widths: dict[str, int],
            make: Callable[[dict[str, int]], Plan]) -> tuple[dict[str, int], Plan]:
    """Spend what one shared τ leaves of the budget: add a filter (a `round_to` step) where the next
    eigenvalue holds the most energy, as long as the network still fits. One τ step can move several
    layers at once, so the bisection alone may stop short by more than a filter's worth."""
    assert ctx.target is not None
    step = max(1, int(ctx.option("round_to", 1)))
    template = ctx.template()
    base = plan_size(ctx.base_plan("pfa-en"), template)
    plan = make(widths)
    open_ = {s.root: s for s in specs if s.analysable}
    added = 0

    def gain(s: GroupSpectrum, k: int) -> float:
        return max(float(e[k:k + step].sum() / e.sum()) if float(e.sum()) > 0 else 0.0 for e in s.eigs)

    while open_:
        for s in sorted(open_.values(), key=lambda s: gain(s, widths[s.root]), reverse=True):
            if widths[s.root] + step > s.width:
                del open_[s.root]
                continue
            trial = make({**widths, s.root: widths[s.root] + step})
            if fits(trial, ctx.target, base, template):
                widths, plan, added = {**widths, s.root: widths[s.root] + step}, trial, added + step
                break
            del open_[s.root]  # the budget only shrinks from here: this layer's next step never fits
        else:
            break
    plan.meta["topped_up_filters"] = added
    return widths, plan


def _add_report(ctx: Context, specs: list[GroupSpectrum], widths: dict[str, int], meta: dict) -> None:
    from netslim.report.markdown import table

    rows = []
    for s in specs:
        e = s.eigs[0]
        kl = kl_divergence(e)
        k = min(widths.get(s.root, s.width), s.width)
        rows.append([s.root, s.width, k, f"{k / s.width:.3f}", f"{kl:.3f}", f"{kl / math.log(s.width):.3f}"
                     if s.width > 1 else "–", f"{energy_kept(e, k):.4f}", s.samples if s.analysable else
                     f"{s.samples} (< C: kept whole)"])
    settings = ", ".join(f"{k}={v}" for k, v in meta.items())
    ctx.cache["report"] = [
        f"## PFA analysis ({settings})\n\nSpectra: ![spectra](spectra.png)\n\n" + table(
            ["layer (group root)", "C", "kept", "kept/C", "KL", "KL/log C", "energy kept", "samples"], rows)]
    ctx.cache.setdefault("artifacts", {})["spectra.png"] = lambda path: spectra_plot(path, specs, widths)


def spectra_plot(path, specs: list[GroupSpectrum], widths: dict[str, int]) -> None:
    """Normalised eigenvalue spectra of every analysed layer, with the kept width marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from netslim.report.markdown import save_figure

    n = len(specs)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax, s in zip(axes.flat, specs, strict=False):
        e = s.eigs[0]
        p = (e / e.sum()).clamp_min(1e-12) if float(e.sum()) > 0 else e
        ax.semilogy(range(1, len(p) + 1), p.numpy(), lw=1)
        ax.axvline(widths.get(s.root, s.width), color="r", lw=0.8)
        ax.set_title(f"{s.root} ({widths.get(s.root, s.width)}/{s.width})", fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("eigenvalue spectra (normalised); red: kept width", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
