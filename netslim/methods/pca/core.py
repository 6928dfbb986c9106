"""PCA design: width and depth of a network from one PCA pass, then one training run (from scratch).

Every spatial position of a conv response is a sample, so a few hundred images give hundreds of
thousands of samples per layer. A layer's width becomes its number of significant dimensions (the
smallest k holding a fraction tau of the response variance, default 0.999); its depth follows from
where those dimensions stop growing (netslim.methods.pca.depth). The covariance comes from the shared
probe and the spectral arithmetic from netslim.methods.common.spectral, the same as PFA's.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from netslim.cost.budget import bisect
from netslim.data import batches, calibration_subset
from netslim.errors import NetslimError
from netslim.methods.base import Context, register
from netslim.methods.common.ranking import plan_from_widths, round_width
from netslim.methods.common.selection import elimination_order
from netslim.methods.common.spectral import eigenvalues, energy_kept, energy_width, inactive
from netslim.methods.common.stats import response_stats
from netslim.methods.pca.depth import RULES, SATURATED, SCOPES, Unit, block_units, decide, sequential_units, structure
from netslim.plan import Plan
from netslim.probe import LayerStats, collect
from netslim.probe.points import ResponsePoint
from netslim.surgery.graph import ChannelGroup

DEFAULT_VARIANCE = 0.999
DEFAULT_IMAGES = 512


@dataclass
class Spectrum:
    """Eigenvalues of one response covariance; `analysable` when there are more samples than channels."""

    name: str
    channels: int
    samples: int
    eigs: torch.Tensor

    @property
    def analysable(self) -> bool:
        return self.samples > self.channels

    def dims(self, tau: float, min_keep: int = 1) -> int:
        return energy_width(self.eigs, tau, min_keep) if self.analysable else self.channels


@dataclass
class Analysis:
    layers: dict[str, Spectrum]  # conv/linear responses, forward order
    blocks: dict[str, Spectrum]  # residual block outputs (residual nets only)
    kind: str  # "sequential" | "residual" | "width-only"
    why: str
    images: int


@dataclass
class Design:
    tau: float
    depth_tau: float
    widths: dict[str, int]  # group root -> kept width (before rounding)
    units: list[Unit]
    drop: list[str]


def _spectra(stats: dict[str, LayerStats], order: list[str]) -> dict[str, Spectrum]:
    return {n: Spectrum(n, stats[n].channels, stats[n].n, eigenvalues(stats[n].cov)) for n in order if n in stats}


def _images(ctx: Context) -> int:
    images = int(ctx.option("images", DEFAULT_IMAGES))
    if images < 1:
        raise NetslimError(f"pca option images must be at least 1, not {images}")
    return images


def _calibration(ctx: Context, images: int) -> Context:
    """The Context whose calibration set has at most `images` images (spatial samples make that enough)."""
    if ctx.calib is None or len(ctx.calib.labels) == 0:
        raise NetslimError("pca needs calibration data, and none was given")
    if len(ctx.calib.labels) <= images:
        return ctx
    return dataclasses.replace(ctx, calib=calibration_subset(ctx.calib, images), cache={"groups": ctx.groups()})


def spatial_stats(ctx: Context) -> tuple[dict[str, LayerStats], Context]:
    """The probe's spatial statistics on at most `images` calibration images, and the Context they came from.

    With no more images than that, this is the shared `response_stats(ctx, "spatial")` pass; otherwise the
    pass runs on a subset and is cached under its own key, so other methods still see the full set."""
    images = _images(ctx)
    sub = _calibration(ctx, images)
    if sub is ctx:
        return response_stats(ctx, "spatial"), ctx
    key = f"pca:stats:{images}"
    if key not in ctx.cache:
        ctx.cache[key] = (response_stats(sub, "spatial"), sub)
        ctx.cache.setdefault("stats_passes", []).append(key)
    return ctx.cache[key]


def analyse(ctx: Context) -> Analysis:
    """One spatial-sample PCA pass over every prunable layer (and residual block outputs); cached."""
    key = f"pca:analysis:{_images(ctx)}"
    if key in ctx.cache:
        return ctx.cache[key]
    from netslim.surgery.depth import call_order

    stats, sub = spatial_stats(ctx)
    assert sub.calib is not None
    order = call_order(ctx.model, ctx.example(), (torch.nn.Conv2d, torch.nn.Linear))
    kind, why = structure(ctx.model, ctx.groups())
    blocks: dict[str, Spectrum] = {}
    if kind == "residual":
        units = block_units(ctx.model, ctx.example())
        points = {u.name: ResponsePoint(u.name, "conv", u.channels, None, None, u.name) for u in units}
        block_stats = collect(ctx.model, batches(sub.calib, ctx.batch_size, device=ctx.device), layers=points,
                              reduce="spatial", device=ctx.device)
        blocks = _spectra(block_stats, [u.name for u in units])
    result = Analysis(_spectra(stats, order), blocks, kind, why, len(sub.calib.labels))
    ctx.cache[key] = result
    return result


def _units(ctx: Context, a: Analysis) -> list[Unit]:
    if a.kind == "sequential":
        return sequential_units(ctx.model, ctx.example())
    if a.kind == "residual":
        return block_units(ctx.model, ctx.example())
    return []


def _dropped(name: str, drop: list[str]) -> bool:
    return any(name == d or name.startswith(d + ".") for d in drop)


def design(ctx: Context, a: Analysis, tau: float, depth_tau: float | None, units: list[Unit]) -> Design:
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
        members = [a.layers.get(n) for n in g.layers if not _dropped(n, drop)]
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
        score = torch.zeros(g.width)
        if members:
            corr = torch.stack([s.corr.abs() for s in members]).mean(0)
            dead = torch.stack([inactive(s.variance) for s in members]).all(0)
            score[elimination_order(corr, dead, "l1-max")] = torch.arange(g.width, dtype=score.dtype)
        self[root] = score
        return score


def _plan(ctx: Context, a: Analysis, d: Design, scores: dict[str, torch.Tensor], meta: dict) -> Plan:
    plan = plan_from_widths(ctx, "pca", scores, d.widths, meta)
    plan.keep = {n: idx for n, idx in plan.keep.items() if not _dropped(n, d.drop)}
    plan.drop = list(d.drop)
    return plan


def _options(ctx: Context) -> tuple[float, float | None]:
    tau = float(ctx.option("variance", ctx.option("energy", DEFAULT_VARIANCE)))
    if not 0 < tau <= 1:
        raise NetslimError(f"--variance must be in (0, 1], not {tau}")
    depth_tau = ctx.option("depth_variance", None)
    if depth_tau is not None and not 0 < float(depth_tau) <= 1:
        raise NetslimError(f"pca option depth_variance must be in (0, 1], not {depth_tau}")
    for name, allowed, default in (("depth_rule", RULES, "grow"), ("depth_scope", SCOPES, "stage"),
                                   ("saturated", SATURATED, "keep")):
        if str(ctx.option(name, default)) not in allowed:
            raise NetslimError(f"pca option {name} must be one of {', '.join(allowed)}, not {ctx.option(name, '')!r}")
    if float(ctx.option("depth_threshold", 0.0)) < 0:
        raise NetslimError("pca option depth_threshold must be >= 0")
    return tau, None if depth_tau is None else float(depth_tau)


def _meta(ctx: Context, a: Analysis, d: Design) -> dict:
    return {"variance": round(d.tau, 8), "depth_variance": round(d.depth_tau, 8), "structure": a.kind,
            "depth_rule": str(ctx.option("depth_rule", "grow")) if a.kind != "width-only" else "width only",
            "depth_threshold": float(ctx.option("depth_threshold", 0.0)),
            "depth_scope": str(ctx.option("depth_scope", "stage")), "saturated": str(ctx.option("saturated", "keep")),
            "images": a.images, "round_to": int(ctx.option("round_to", 1))}


@register("pca", "PCA design: width = significant dimensions of each layer (--variance), depth = where they stop "
          "growing; the designed network is trained from scratch", retrain="scratch")
def pca(ctx: Context) -> Plan:
    tau, depth_tau = _options(ctx)
    a = analyse(ctx)
    units = _units(ctx, a)
    key = f"pca:scores:{_images(ctx)}"
    scores = ctx.cache[key] if key in ctx.cache else ctx.cache.setdefault(key, _Scores(ctx))
    if ctx.target is None:
        d = design(ctx, a, tau, depth_tau, units)
        plan = _plan(ctx, a, d, scores, _meta(ctx, a, d))
    else:
        def make(t: float) -> Plan:
            d = design(ctx, a, max(t, 1e-9), depth_tau, units)
            return _plan(ctx, a, d, scores, _meta(ctx, a, d))

        plan = bisect(make, ctx.target, ctx.template(), 0.0, 1.0)
        d = design(ctx, a, max(plan.meta["variance"], 1e-9), depth_tau, units)
        plan.meta["target"] = str(ctx.target)
    _add_report(ctx, a, d, plan)
    return plan


def _resolution(shape: tuple[int, ...]) -> str:
    return "×".join(str(s) for s in shape) if shape else "–"


def _add_report(ctx: Context, a: Analysis, d: Design, plan: Plan) -> None:
    from netslim.report.markdown import table

    step = int(ctx.option("round_to", 1))
    group_of = {n: g for g in ctx.groups() for n in g.layers}
    rows = []
    for name, s in a.layers.items():
        g: ChannelGroup | None = group_of.get(name)
        if _dropped(name, d.drop):
            width, decision = 0, "dropped"
        elif g is None:
            width, decision = s.channels, "kept whole (not prunable)"
        else:
            width = round_width(d.widths[g.root], g.width, step)
            decision = f"coupled with {len(g.layers) - 1} more" if len(g.layers) > 1 else ""
        k = s.dims(d.tau)
        rows.append([name, s.channels, k if s.analysable else f"– ({s.samples} samples <= C)",
                     f"{energy_kept(s.eigs, k):.4f}", width, s.samples, decision])
    meta = plan.meta
    rule = (f"width only — {a.why}; no layer or block is removed" if a.kind == "width-only" else
            f"`{meta['depth_rule']}` on {'residual block outputs' if a.kind == 'residual' else 'conv responses'} "
            f"at variance {meta['depth_variance']}: within each resolution stage (scope `{meta['depth_scope']}`), "
            f"a removable {'block' if a.kind == 'residual' else 'conv'} whose significant dimensions do not exceed "
            f"(1 + {meta['depth_threshold']}) × the largest of the kept ones before it is dropped; the first of "
            f"each stage is kept; saturated units (dims = width): `{meta['saturated']}`")
    parts = [
        f"## PCA design (variance {d.tau:g}, {a.images} calibration images, every spatial position a sample)",
        f"Structure: **{a.kind}** ({a.why}). Depth rule: {rule}. Width rounding: {meta['round_to']}.",
        f"Dropped: {', '.join(d.drop) if d.drop else 'nothing'}. {_config(d, plan, ctx)}",
        "Significant dimensions against depth: ![significant dimensions](pca_dims.png)",
        table(["layer", "C", f"significant dims ({d.tau:g})", "variance kept", "designed width", "samples", ""],
              rows),
    ]
    if d.units:
        parts.append("### Depth decision\n\n" + table(
            ["unit", "stage", "resolution", "C", f"dims ({d.depth_tau:g})", "decision", "reason"],
            [[u.name, u.stage, _resolution(u.resolution), u.channels, u.dims, u.decision, u.reason]
             for u in d.units]))
    ctx.cache["report"] = ["\n\n".join(parts)]
    ctx.cache.setdefault("artifacts", {})["pca_dims.png"] = lambda path: dims_plot(path, a, d)


def _config(d: Design, plan: Plan, ctx: Context) -> str:
    """The designed architecture in words: widths per stage (sequential) or blocks per stage (residual)."""
    if not d.units:
        return ""
    stages: dict[int, list[str]] = {}
    for u in d.units:
        if u.decision == "keep":
            label = str(len(plan.keep[u.name])) if u.name in plan.keep else str(u.channels)
            stages.setdefault(u.stage, []).append(label if u.kind == "conv" else u.name)
    if d.units[0].kind == "conv":
        return "Designed convs per stage: " + " | ".join(", ".join(v) for v in stages.values()) + "."
    total = {s: sum(1 for u in d.units if u.stage == s) for s in stages}
    return "Designed blocks per stage: " + ", ".join(f"{len(v)} of {total[s]}" for s, v in stages.items()) + "."


def dims_plot(path, a: Analysis, d: Design) -> None:
    """Significant dimensions of every layer (and residual block output) against depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from netslim.report.markdown import save_figure

    panels = [("layer responses", a.layers, d.tau)] + ([("residual block outputs", a.blocks, d.depth_tau)]
                                                       if a.blocks else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6.0, 0.3 * len(a.layers) + 3) if len(panels) == 1
                                                      else 12.0, 4), squeeze=False)
    for ax, (title, spectra, tau) in zip(axes[0], panels, strict=True):
        names = list(spectra)
        xs = list(range(1, len(names) + 1))
        dims = [s.dims(tau) if s.analysable else math.nan for s in spectra.values()]
        ax.plot(xs, [s.channels for s in spectra.values()], color="#bbbbbb", lw=1, label="width")
        ax.plot(xs, dims, marker="o", ms=3, lw=1.2, label=f"significant dims ({tau:g})")
        stage = {u.name: u.stage for u in d.units}
        for i in range(1, len(names)):
            if names[i] in stage and names[i - 1] in stage and stage[names[i]] != stage[names[i - 1]]:
                ax.axvline(i + 0.5, color="#999999", lw=0.8, ls=":")  # a new resolution stage starts
        gone = [i for i, n in enumerate(names) if _dropped(n, d.drop)]
        if gone:
            ax.scatter([xs[i] for i in gone], [dims[i] for i in gone], marker="x", color="r", s=40, zorder=3,
                       label="dropped")
        ax.set_xlabel("depth (forward order)")
        ax.set_ylabel("dimensions")
        ax.set_title(title, fontsize=9)
        if len(names) <= 30:
            ax.set_xticks(xs)
            ax.set_xticklabels(names, rotation=75, ha="right", fontsize=6)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
