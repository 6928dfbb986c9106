"""The README's one-shot repair tables, generated from `benchmarks/results/repair_*.json` (benchmarks.repair.oneshot).

Rows of files for the same network are merged by (budget, criterion), so a later run that adds a repair (e.g.
`--repairs lsq-thinet --out repair_resnet56_thinet_cpu.json`) fills its column; each file is named under its table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

COLUMNS = ("after cut", "BN repair only", "refit, own-output targets", "refit, residual-sum targets",
           "refit + BN", "handed over", "ThiNet's channels + refit", "repair CPU s")


def _acc(v: Any) -> str:
    return "–" if v is None else f"{v:.3f}"


def _cells(row: dict[str, Any]) -> list[str]:
    bn, lsq, layer, thin = (row.get(k) or {} for k in ("bn", "lsq", "lsq-layer", "lsq-thinet"))
    old = not layer and lsq and "bn_after_refit" not in lsq  # made before residual-sum targets: own outputs only
    if old:
        layer, lsq = lsq, {"repair_cpu_seconds": lsq.get("repair_cpu_seconds")}
    refit_bn = _acc(lsq.get("accuracy_after_bn_recalibration") if not old else
                    layer.get("accuracy_after_bn_recalibration")) + (" †" if old else "")
    kept = lsq.get("bn_after_refit", {}).get("kept")
    handed = lsq.get("accuracy") if "bn_after_refit" in lsq else None
    handed_s = "–" if handed is None else f"{handed:.3f} ({'refit + BN' if kept in (True, None) else 'refit'})"
    surgery = (bn or lsq or layer).get("accuracy_after_surgery")
    return [_acc(surgery), _acc(bn.get("accuracy")), _acc(layer.get("accuracy_after_refit")),
            _acc(lsq.get("accuracy_after_refit")), refit_bn, handed_s, _acc(thin.get("accuracy")),
            str(round(lsq.get("repair_cpu_seconds") or layer.get("repair_cpu_seconds") or 0))]


def merged(files: list[Path]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The first file's header and every file's rows merged by (target, method), in first-seen order."""
    head: dict[str, Any] = {}
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for f in files:
        d = json.loads(f.read_text())
        head = head or d
        for r in d["rows"]:
            row = rows.setdefault((r["target"], r["method"]), {})
            old = row.get("lsq")
            if old and "bn_after_refit" not in old and "lsq" in r and "lsq-layer" not in row:
                row["lsq-layer"] = old  # an older file's refit fitted every layer to its own output
            row.update({k: v for k, v in r.items() if v is not None})
    return head, list(rows.values())


def table(files: list[Path]) -> list[str]:
    head, rows = merged(files)
    lines = [f"{head['arch']}, base {head['base_accuracy']:.3f} on {head['test_images']:,} test images "
             f"({', '.join(f'`{f.name}`' for f in files)}):", "",
             "| budget | criterion | params | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 3) + "|"]
    lines += [f"| {r['target']} | {r['method']} | {r['params']:,} | " + " | ".join(_cells(r)) + " |" for r in rows]
    if any("†" in line for line in lines[4:]):
        lines += ["", "† BN re-estimated after the refit with own-output targets (a file made before residual-sum "
                  "targets existed)."]
    curves = [(r, c) for r in rows for c in (r.get("finetune") or [])]
    if curves:
        epochs = max(len(c["curve"]) for _, c in curves)
        lines += ["", "Fine-tuning a repaired network (the repair in \"fine-tuned from\"; "
                  f"{curves[0][1]['train_images']:,} training images per "
                  f"epoch, lr {curves[0][1]['schedule']['lr']}, onecycle over {epochs} epochs, batch "
                  f"{curves[0][1]['schedule']['batch_size']}); test accuracy after each epoch and the CPU seconds "
                  "spent:", "",
                  "| budget | criterion | fine-tuned from | distillation weight | before | " +
                  " | ".join(f"epoch {e + 1}" for e in range(epochs)) + " | CPU s |",
                  "|---" * (epochs + 6) + "|"]
        for r, c in curves:
            accs = [_acc(p["accuracy"]) for p in c["curve"]] + ["–"] * (epochs - len(c["curve"]))
            start = c.get("from", "lsq")
            lines.append(f"| {r['target']} | {r['method']} | {start} | {c['schedule']['distill']} | "
                         f"{_acc((r.get(start) or {}).get('accuracy'))} | " + " | ".join(accs) +
                         f" | {c['curve'][-1]['cpu_seconds']:.0f} |")
    return lines


def sections(results: Path) -> list[str]:
    """One table (and fine-tuning curve) per network, from every repair_*.json in `results`."""
    by_arch: dict[str, list[Path]] = {}
    for f in sorted(results.glob("repair_*.json")):
        by_arch.setdefault(json.loads(f.read_text())["arch"], []).append(f)
    out: list[str] = []
    for files in by_arch.values():
        out += [*table(sorted(files, key=lambda f: len(f.name))), ""]
    return out
