"""The run directory a user reads and reloads: plan.json, model.safetensors, metrics.json, report.md, plots."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from netslim.io import atomic_write_text
from netslim.plan import Plan
from netslim.report.markdown import comparison_rows, table, write_markdown
from netslim.report.plots import widths_plot
from netslim.runtime.forms import RUNTIMES
from netslim.surgery.checkpoint import save_model


def write_run(path: Path, *, plan: Plan, model: nn.Module, metrics: dict[str, Any],
              artifacts: dict[str, Callable[[Path], None]], sections: list[str],
              classes: list[str] | None = None) -> None:
    """plan.json, model.safetensors (with the names of the classes it scores), metrics.json, report.md and
    widths.png (plus the method's artifacts)."""
    m = metrics
    plan.save(path / "plan.json")
    save_model(path / "model.safetensors", model, plan, classes=classes)
    atomic_write_text(path / "metrics.json", json.dumps(m, indent=1, default=str))
    w = m["widths"]
    widths_plot(path / "widths.png", [r["layer"] for r in w], [r["before"] for r in w], [r["after"] for r in w],
                f"{plan.arch}: {plan.method}")
    for name, writer in artifacts.items():
        writer(path / name)
    before, after = m["before"], m["after"]
    parts = [
        f"# netslim report: {plan.arch}, method `{plan.method}`",
        f"Target: {m['target'] or 'method default'} · init: {m['init']} · analysis: {m['analysis_seconds']} s on "
        f"{m['calibration_images']} calibration images · fine-tune: {m['schedule']['epochs']} epochs · "
        f"{m['date']} · torch {m['machine']['torch']}",
        _latency_target_line(m.get("latency_target")),
        "## Before and after\n\n" + table(["", "before", "after", "after/before"], comparison_rows(before, after)),
        _speed_section(m.get("speed", [])),
        "## Per-layer widths\n\n![widths](widths.png)\n\n" + table(
            ["layer", "before", "after"], [[r["layer"], r["before"], r["after"]] for r in w]),
        _history_section(m["history"]),
        *sections,
        f"Command: `{m['command']}`" if m["command"] else "",
    ]
    write_markdown(path / "report.md", parts)


def _history_section(history: list[dict]) -> str:
    if not history:
        return ""
    rows = [[h.get("epoch"), h.get("train_loss"), h.get("train_acc"), h.get("val_acc"), h.get("seconds")]
            for h in history]
    return "## Fine-tuning\n\n" + table(["epoch", "train loss", "train acc", "val acc", "seconds"], rows)


def _latency_target_line(lat: dict[str, Any] | None) -> str:
    """Where a latency target was timed and what the chosen network measured there (its Plan's meta)."""
    if not lat:
        return ""
    runtime = RUNTIMES.get(lat.get("runtime", "torch"), lat.get("runtime"))
    threads = f", {lat['threads']} threads" if lat.get("threads") else ""
    return (f"Latency target {lat['target']:g} timed on {runtime} ({lat['device_name']}{threads}, batch "
            f"{lat['batch']}): the chosen network ran at {lat['measured_ratio']:.3f} of the base's latency "
            f"({lat['ms']:.3f} ms vs {lat['base_ms']:.3f} ms, timed in turns; {len(lat['attempts'])} networks timed)."
            + _missed_note(lat.get("missed")))


def _missed_note(missed: dict[str, Any] | None) -> str:
    if not missed:
        return ""
    near = " and ".join(f"{r:.3f}" for r in (missed.get("below"), missed.get("above")) if r is not None)
    return (f" **No network was timed within 10% of the target**: the nearest ran at {near} of the base's latency "
            f"(a step in the runtime's kernels, or too few timings); ask for one of those.")


def _speed_section(speed: list[dict[str, Any]]) -> str:
    if not speed:
        return ""
    rows = [[r["device_name"] if r["device"] == "cpu" else r["device"], r.get("runtime", "torch"), r["dtype"],
             r["batch"], r.get("threads"),
             r.get("base_ms"), r.get("ms"), f"{r['speedup']:.3f}×" if "speedup" in r else r.get("error"),
             r.get("base_throughput"), r.get("throughput")] for r in speed]
    slower = [f"{r['device']} {r.get('runtime', 'torch')} {r['dtype']} batch {r['batch']}" for r in speed
              if r.get("speedup", 1.0) < 1.0]
    warning = ("\n\n**Slower than the base** at " + ", ".join(slower) + ": try `--round-to 8` (or 16 on "
               "AVX-512 CPUs) or a `--target latency=F`.") if slower else ""
    return ("## Speed (base and result timed in turns, medians)\n\n" + table(
        ["device", "runtime", "dtype", "batch", "threads", "base ms", "after ms", "speedup", "base img/s",
         "after img/s"],
        rows) + warning)
