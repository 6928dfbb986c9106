"""PNG plots for run directories: one way to open a figure and one to write it.

matplotlib is imported here, lazily, so that importing netslim stays fast and headless runs (Agg) need
no display; every plot in the tree goes through `figure` and `save_figure`.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from netslim.io import atomic_write_bytes


def figure(rows: int = 1, cols: int = 1, *, figsize: tuple[float, float], squeeze: bool = True) -> tuple[Any, Any]:
    """A new (figure, axes) on the headless Agg backend; `squeeze=False` always gives a 2-D axes array."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, cols, figsize=figsize, squeeze=squeeze)


def save_figure(fig: Any, path: Path) -> None:
    """Write `fig` as a PNG atomically (a killed run never leaves half an image) and free it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def widths_plot(path: Path, names: list[str], before: list[int], after: list[int], title: str) -> None:
    """Bar chart of per-layer widths before and after compression."""
    fig, ax = figure(figsize=(max(6, 0.35 * len(names) + 2), 4))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], before, width=0.4, label="before", color="#bbbbbb")
    ax.bar([x + 0.2 for x in xs], after, width=0.4, label="after", color="#1f77b4")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("output channels")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
