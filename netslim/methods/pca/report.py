"""PCA design's report section and plot: what was measured and why each layer got its width or went.

Kept apart from the design code (core.py) so that the algorithm reads without its presentation.
"""

from __future__ import annotations

import math
from pathlib import Path

from netslim.methods.base import Artifacts
from netslim.methods.common.heads import HeadSpectrum
from netslim.methods.common.ranking import round_width
from netslim.methods.common.spectral import energy_kept
from netslim.methods.pca.analysis import Design, PcaAnalysis, dropped
from netslim.plan import Plan
from netslim.report.markdown import table
from netslim.report.plots import figure, save_figure
from netslim.surgery.graph import ChannelGroup


def report(a: PcaAnalysis, d: Design, plan: Plan, groups: list[ChannelGroup]) -> tuple[list[str], Artifacts]:
    """The design section (per-layer dimensions and widths, the depth decision) and its pca_dims.png writer."""
    step = int(plan.meta["round_to"])
    group_of = {n: g for g in groups for n in g.layers}
    rows = []
    for name, s in a.layers.items():
        g: ChannelGroup | None = group_of.get(name)
        if dropped(name, d.drop):
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
        f"Dropped: {', '.join(d.drop) if d.drop else 'nothing'}. {_config(d, plan)}",
        "Significant dimensions against depth: ![significant dimensions](pca_dims.png)",
        table(["layer", "C", f"significant dims ({d.tau:g})", "variance kept", "designed width", "samples", ""],
              rows),
    ]
    if d.units:
        parts.append("### Depth decision\n\n" + table(
            ["unit", "stage", "resolution", "C", f"dims ({d.depth_tau:g})", "decision", "reason"],
            [[u.name, u.stage, _resolution(u.resolution), u.channels, u.dims, u.decision, u.reason]
             for u in d.units]))
    return ["\n\n".join(parts)], {"pca_dims.png": lambda path: dims_plot(path, a, d)}


def _config(d: Design, plan: Plan) -> str:
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


def _resolution(shape: tuple[int, ...]) -> str:
    return "×".join(str(s) for s in shape) if shape else "–"


def dims_plot(path: Path, a: PcaAnalysis, d: Design) -> None:
    """Significant dimensions of every layer (and residual block output) against depth."""
    panels = [("layer responses", a.layers, d.tau)] + ([("residual block outputs", a.blocks, d.depth_tau)]
                                                       if a.blocks else [])
    width = max(6.0, 0.3 * len(a.layers) + 3) if len(panels) == 1 else 12.0
    fig, axes = figure(1, len(panels), figsize=(width, 4), squeeze=False)
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
        gone = [i for i, n in enumerate(names) if dropped(n, d.drop)]
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


def head_section(hspecs: list[HeadSpectrum], plan: Plan) -> str:
    """The markdown section on attention heads: per attention how many heads PCA keeps, and which."""
    rows = [[h.name, h.heads, h.head_dim, len(plan.heads.get(h.name, range(h.heads))),
             ", ".join(map(str, plan.heads[h.name])) if h.name in plan.heads else "all",
             h.samples if h.analysable else f"{h.samples} (≤ features: kept whole)"] for h in hspecs]
    return (f"## PCA on attention heads (kept: ceil(significant dims at {plan.meta['variance']} / head_dim) of the "
            "head outputs, every token a sample)\n\n"
            + table(["attention", "heads", "head dim", "kept", "kept heads", "samples"], rows))
