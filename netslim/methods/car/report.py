"""CAR's report section, plots and car.json: kept apart from the greedy search so each reads alone."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import torch

from netslim.io import atomic_write_text
from netslim.methods.base import Artifacts
from netslim.methods.car.greedy import GreedyRun
from netslim.report.markdown import table
from netslim.report.plots import figure, save_figure


def report(runs: list[GreedyRun], seconds: float, classes: list[str] | None) -> tuple[list[str], Artifacts]:
    """The CAR section (per-layer summary, removal order; per-class effects when `classes` are given), and the
    writers of car_curve.png, car.json and car_classwise.png."""
    if not runs:
        return [], {}
    evals = sum(r.engine.get("evaluations", 0) for r in runs)
    heads = " A head is removed by zeroing its output (out_proj's input)." if any(r.unit == "head" for r in runs) \
        else ""
    engine_s = sum(r.engine.get("seconds", 0.0) for r in runs)
    lines = [f"## CAR greedy {'filter and head' if heads else 'filter'} pruning ({runs[0].mode})",
             f"Evaluation set: {runs[0].eval_images} images of the training split (fixed subset). "
             f"A filter is removed by zeroing its channel after BatchNorm and activation.{heads} "
             f"{evals:,} evaluations in {engine_s:.1f} s of ablation time "
             f"({evals / engine_s if engine_s else 0:.2f} evaluations/s, "
             f"{evals * runs[0].eval_images / engine_s if engine_s else 0:,.0f} images/s); {seconds:.1f} s in all.",
             table(["layer (group root) or attention", "units", "kept", "base acc %", "final acc %", "rankings",
                    "evaluations", "evals/s", "stopped", "evaluation path"],
                   [[r.root, f"{r.width} {r.unit}s", len(r.kept), 100 * r.base_accuracy,
                     100 * (r.accuracy[-1] if r.accuracy else r.base_accuracy), r.rankings,
                     r.engine.get("evaluations"), r.engine.get("evals_per_second"), r.stopped, r.path]
                    for r in runs]),
             "Accuracy on the evaluation set after each removal, and the CAR of each removed filter:\n\n"
             "![CAR curve](car_curve.png)"]
    for r in runs:
        if r.removed:
            rows = [[i + 1, f, f"{100 * c:+.2f}", f"{100 * a:.2f}"]
                    for i, (f, c, a) in enumerate(zip(r.removed, r.car, r.accuracy, strict=True))]
            lines.append(f"### {r.root}: removals in order\n\n" + table(["#", r.unit, "CAR (pts)", "acc after %"],
                                                                      rows))
    artifacts: Artifacts = {"car_curve.png": lambda path: curve_plot(path, runs),
                            "car.json": lambda path: _write_json(path, runs)}
    if classes is not None:
        names = classes
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
    return ["\n\n".join(lines)], artifacts


def _worst(row: list[float], names: list[str]) -> str:
    idx = sorted(range(len(row)), key=lambda k: -row[k])[:3]
    return ", ".join(f"{names[k] if k < len(names) else k} {100 * row[k]:+.1f}" for k in idx)


def _write_json(path: Path, runs: list[GreedyRun]) -> None:
    atomic_write_text(path, json.dumps([asdict(r) | {"kept": r.kept, "mode": r.mode} for r in runs], indent=1))


def curve_plot(path: Path, runs: list[GreedyRun]) -> None:
    """Per group: eval accuracy vs filters removed (line) and the CAR of each removal (bars)."""
    n = len(runs)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = figure(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, r in zip(axes.flat, runs, strict=False):
        xs = list(range(len(r.accuracy) + 1))
        ax.plot(xs, [100 * r.base_accuracy] + [100 * a for a in r.accuracy], color="C0", lw=1.2)
        ax.set_xlabel(f"{r.unit}s removed", fontsize=7)
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


def classwise_plot(path: Path, runs: list[GreedyRun], classes: list[str]) -> None:
    """Heat map per group: class (rows) x filter (columns, by overall CAR) accuracy change in points."""
    size = (max(6.0, 0.12 * max(r.width for r in runs) + 2), 2.2 + 0.25 * len(classes) * len(runs))
    fig, axes = figure(len(runs), 1, figsize=size, squeeze=False)
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
