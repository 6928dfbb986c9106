"""PFA's report section and spectra plot, kept apart from the analysis so the algorithm reads alone."""

from __future__ import annotations

import math
from pathlib import Path

from netslim.methods.base import Artifacts
from netslim.methods.common.heads import HeadSpectrum
from netslim.methods.common.spectral import energy_kept, kl_divergence
from netslim.methods.pfa.spectra import GroupSpectrum
from netslim.report.markdown import table
from netslim.report.plots import figure, save_figure


def report(specs: list[GroupSpectrum], widths: dict[str, int], meta: dict) -> tuple[list[str], Artifacts]:
    """The markdown section (one row per analysed group) and its spectra.png writer."""
    rows = []
    for s in specs:
        e = s.eigs[0]
        kl = kl_divergence(e)
        k = min(widths.get(s.root, s.width), s.width)
        rows.append([s.root, s.width, k, f"{k / s.width:.3f}", f"{kl:.3f}", f"{kl / math.log(s.width):.3f}"
                     if s.width > 1 else "–", f"{energy_kept(e, k):.4f}", s.samples if s.analysable else
                     f"{s.samples} (< C: kept whole)"])
    settings = ", ".join(f"{k}={v}" for k, v in meta.items())
    section = f"## PFA analysis ({settings})\n\nSpectra: ![spectra](spectra.png)\n\n" + table(
        ["layer (group root)", "C", "kept", "kept/C", "KL", "KL/log C", "energy kept", "samples"], rows)
    return [section], {"spectra.png": lambda path: spectra_plot(path, specs, widths)}


def head_report(specs: list[HeadSpectrum], heads: dict[str, list[int]]) -> str:
    """The markdown section on attention heads: per attention the heads kept and the order PFA drops them."""
    rows = [[h.name, h.heads, h.head_dim, len(heads.get(h.name, range(h.heads))), ", ".join(map(str, heads[h.name]))
             if h.name in heads else "all", " ".join(map(str, h.order)), f"{kl_divergence(h.eigs):.3f}",
             h.samples if h.analysable else f"{h.samples} (≤ features: kept whole)"] for h in specs]
    return "## PFA on attention heads (kept: ceil(d / head_dim) of the head-output spectrum)\n\n" + table(
        ["attention", "heads", "head dim", "kept", "kept heads", "drop order", "KL", "samples"], rows)


def spectra_plot(path: Path, specs: list[GroupSpectrum], widths: dict[str, int]) -> None:
    """Normalised eigenvalue spectra of every analysed layer, with the kept width marked."""
    n = len(specs)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = figure(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
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
