"""The README's "Paper reproductions" tables, from benchmarks/results/reproduce_*_{cpu,gpu}.json: per paper its
number (quoted from ../shared/methods), the schedule that ran (the paper's, or a reduced one, said so), and one row
per network with each stage's accuracy in its own column. Called by benchmarks.readme_results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

STAGES = (("accuracy_after_surgery", "cut"), ("accuracy_after_refit", "after refit"),
          ("accuracy_after_bn_recalibration", "after BN"), ("accuracy_before_finetune", "before fine-tune"),
          ("accuracy", "after fine-tune"))


def _cell(value: Any, fmt: str = "{:.3f}") -> str:
    return "–" if value is None else fmt.format(value)


def _schedule(r: dict[str, Any]) -> str:
    s = r["schedule"]
    kind = {"paper": "the paper's schedule", "reduced": "a **reduced** schedule, not the paper's",
            "smoke": "a smoke run"}[s["kind"]]
    rep = s.get("repair") or {}
    repair = f"repair {rep.get('mode', 'bn')}" + (f" ({rep['images']:,} images)" if rep.get("images") else "")
    distill = f", distilled from the base (weight {s['distill']})" if s.get("distill") else ""
    return (f"{r['date'][:10]}, {r['device']}, torch {r['torch']}, {r['seconds'] / 60:.0f} min; {kind}: "
            f"{s['epochs']} epoch{'s' if s['epochs'] != 1 else ''} of {s['train_images']:,} training images "
            f"(lr {s['lr']}, batch {s['batch_size']}, {s['schedule']}){distill}; {repair}; "
            f"{s['calibration_images']:,} calibration images; accuracy on {s['test_images']:,} test images.")


def _quotes(paper: dict[str, Any]) -> list[str]:
    found = [paper] if "quote" in paper else [p for p in paper.values() if isinstance(p, dict) and "quote" in p]
    return [f"- paper ({p['source']}): \"{p['quote']}\"" for p in found]


def _stage(row: dict[str, Any], key: str) -> str:
    """A stage's accuracy; BN re-estimation after the refit marked "(dropped)" where its held-out check refused it."""
    cell = _cell(row.get(key), "{:.4f}")
    dropped = key == "accuracy_after_bn_recalibration" and (row.get("bn_after_refit") or {}).get("kept") is False
    return cell + (" (dropped)" if dropped and row.get(key) is not None else "")


def _rows(rows: list[dict[str, Any]]) -> list[str]:
    stages = [(k, t) for k, t in STAGES if any(r.get(k) is not None for r in rows)]
    experiments = any(r.get("experiment") for r in rows)
    head = [*(["experiment"] if experiments else []), "network", "target", "params kept", "bytes kept", "MACs kept",
            *(t for _, t in stages)]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        name = r["method"] + (f" ({r['task']})" if r.get("task") else "") + (f", {r['layer']}" if r.get("layer")
                                                                            else "")
        cells = [*([r.get("experiment") or "–"] if experiments else []), name, r.get("target") or "own size",
                 _cell(r.get("params_kept")), _cell(r.get("bytes_kept")), _cell(r.get("macs_kept")),
                 *(_stage(r, k) for k, _ in stages)]
        out.append("| " + " | ".join(str(c) for c in cells) + " |")
    return out


def _flat(d: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flat(v, f"{prefix}{k}.")
        elif not isinstance(v, list):
            out.append(f"{prefix}{k} = {v}")
    return out


def section(result: dict[str, Any], name: str) -> str:
    title = result["benchmark"].removeprefix("reproduce_").upper()
    lines = [f"#### {title} — `{name}`", "", _schedule(result), "", *_quotes(result["paper"]),
             f"- ours (the file's `ours`): {'; '.join(_flat(result['ours']))}", "", *_rows(result["rows"]), ""]
    lines += [f"- differs from the paper: {d}" for d in result.get("differences", [])]
    lines += ["", f"Reproduce: `{result['command']}`", ""]
    return "\n".join(lines)


def sections(results: Path) -> list[str]:
    files = sorted(results.glob("reproduce_*_cpu.json")) + sorted(results.glob("reproduce_*_gpu.json"))
    body = ["Generated from `benchmarks/results/reproduce_*.json` by `python -m benchmarks.readme_results`; each "
            "script is in `benchmarks/reproduce/` and says its paper-schedule (GPU) and reduced (CPU) commands. "
            "A reduced schedule does not test the paper's claim; it shows the same code path on this machine.", ""]
    return body + [section(json.loads(f.read_text()), f.name) for f in files]
