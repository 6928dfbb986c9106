"""The run directory a user reads: report.md (before/after and per-layer widths); plots are in report.plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from netslim.io import atomic_write_text


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}" if value < 10 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def latency_of(summary: dict[str, Any], batch: int, device: str = "cpu", runtime: str = "torch") -> float | None:
    """The fp32 median ms at `batch` on `device` and `runtime` (rows before runtimes were recorded: torch)."""
    for row in summary.get("latency", []):
        fp32 = row.get("dtype", "float32") in ("fp32", "float32")
        if row["batch"] == batch and row["device"].startswith(device) and fp32 \
                and row.get("runtime", "torch") == runtime:
            return row["median_ms"]
    return None


ACCURACY_STAGES = (("accuracy right after surgery", "accuracy_after_surgery"),
                   ("after least-squares refit", "accuracy_after_refit"),
                   ("after BatchNorm recalibration", "accuracy_after_bn_recalibration"),
                   ("method's own network, before fine-tuning", "accuracy_before_finetune"))


def comparison_rows(before: dict[str, Any], after: dict[str, Any]) -> list[list[Any]]:
    """Rows of the before/after table: accuracies at each stage, then sizes and speeds with after/before."""
    acc: list[list[Any]] = [["test accuracy", before.get("accuracy"), after.get("accuracy"), "–"]]
    acc += [[label + (" (not kept: lower on held-out training images)" if key == "accuracy_after_bn_recalibration"
                      and after.get("bn_recalibration_kept") is False else ""), None, after[key], "–"]
            for label, key in ACCURACY_STAGES if after.get(key) is not None]
    return acc + size_rows(before, after)


def size_rows(before: dict[str, Any], after: dict[str, Any]) -> list[list[Any]]:
    """Rows of the before/after table, with the ratio after/before."""
    def ratio(a: Any, b: Any) -> str:
        return f"{b / a:.3f}×" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a else "–"

    rows = []
    for label, key in (("parameters", "params"), ("MACs", "macs"), ("FLOPs", "flops"), ("bytes stored", "bytes")):
        rows.append([label, before.get(key), after.get(key), ratio(before.get(key), after.get(key))])
    for batch in (1, 64):
        a, b = latency_of(before, batch), latency_of(after, batch)
        rows.append([f"CPU latency batch {batch} (ms, median)", a, b, ratio(a, b)])
    runtimes = dict.fromkeys(r["runtime"] for r in before.get("latency", []) if r.get("runtime", "torch") != "torch")
    for runtime in runtimes:  # a latency target timed on onnxruntime: the result on it too
        for batch in dict.fromkeys(r["batch"] for r in before["latency"] if r.get("runtime") == runtime):
            a, b = latency_of(before, batch, runtime=runtime), latency_of(after, batch, runtime=runtime)
            rows.append([f"CPU {runtime} latency batch {batch} (ms, median)", a, b, ratio(a, b)])
    for batch in (1, 1024):
        a, b = latency_of(before, batch, "cuda"), latency_of(after, batch, "cuda")
        if a is not None:
            rows.append([f"CUDA latency batch {batch} (ms, median)", a, b, ratio(a, b)])
    return rows


def write_markdown(path: Path, sections: list[str]) -> None:
    atomic_write_text(path, "\n\n".join(s.strip() for s in sections if s) + "\n")
