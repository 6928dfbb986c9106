"""Deep LDA's report section and iterations plot, kept apart from the loop so the algorithm reads alone."""

from __future__ import annotations

from pathlib import Path

import torch

from netslim.methods.base import Artifacts
from netslim.methods.lda.loop import Iterate, LoopOutcome
from netslim.report.markdown import table
from netslim.report.plots import figure, save_figure


def report(r: LoopOutcome) -> tuple[list[str], Artifacts]:
    """The iterations table (size and validation accuracy per iterate) and the lda_iterations.png writer."""
    history, chosen, floor, base, o = r.history, r.chosen, r.floor, r.base, r.options
    heads = any(h.heads_removed for h in history)  # a column only for networks that lost attention heads
    rows = [[h.index, "–" if h.eta is None else f"{h.eta:.3f}", "–" if h.mprime is None else
             f"{h.mprime}/{h.predecision}", h.params, f"{h.params / base['params']:.4f}", h.macs,
             f"{h.macs / base['macs']:.4f}", h.val_cut, h.val, h.removed, *([h.heads_removed] if heads else []),
             round(h.seconds, 1), "◀" if h.index == chosen.index else ""] for h in history]
    ft = f"{o.ft_epochs} epoch(s) on {o.ft_images or 'all'} training images, lr {o.ft_lr}, {o.ft_schedule}"
    section = (
        f"## Deep LDA iterations\n\nFisher scores: {o.fisher}; M′ within {o.mprime_tol} of the full pre-decision "
        f"layer's validation accuracy; utility traced from {o.trace_images} images per class; threshold η·std of the "
        f"non-zero utilities per layer (per attention for whole heads), η = {o.eta_start}, "
        f"{o.eta_start + o.eta_step:g}, …; fine-tuning per round: {ft}. "
        f"Floor: {'–' if floor is None else f'{floor:.4f}'} (validation); stop: {r.stop}; kept iteration "
        f"{chosen.index} (select={o.select}).\n\n![iterations](lda_iterations.png)\n\n" + table(
            ["iter", "η", "M′/M", "params", "params/base", "MACs", "MACs/base", "val acc after cut + recal.",
             "val acc after fine-tune", "channels removed", *(["heads removed"] if heads else []), "seconds", "kept"],
            rows))
    scores = r.analyses[0].scores if r.analyses else None
    mprime = r.analyses[0].mprime if r.analyses else None
    return [section], {"lda_iterations.png": lambda path: iterations_plot(path, history, chosen, floor, base, scores,
                                                                            mprime)}


def iterations_plot(path: Path, history: list[Iterate], chosen: Iterate, floor: float | None, base: dict[str, int],
                    scores: torch.Tensor | None, mprime: int | None) -> None:
    """Left: validation accuracy against kept parameters per iteration. Right: sorted Fisher scores."""
    fig, axes = figure(1, 2, figsize=(10, 3.8))
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
