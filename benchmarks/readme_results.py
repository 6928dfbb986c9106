"""Regenerate the README's "Results" section from committed bench JSON (benchmarks/results/bench_*.json) and its
one-shot repair tables from benchmarks/results/repair_*.json (benchmarks.repair.readme) and its paper
reproductions from benchmarks/results/reproduce_*.json (benchmarks.reproduce.readme).

    python -m benchmarks.readme_results [--readme README.md]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from benchmarks._common import REPO, RESULTS
from benchmarks.repair.readme import sections as repair_sections
from benchmarks.reproduce.readme import sections as reproduce_sections

START, END = "<!-- results:start -->", "<!-- results:end -->"
REPAIR_START, REPAIR_END = "<!-- repair:start -->", "<!-- repair:end -->"
REPRO_START, REPRO_END = "<!-- reproduce:start -->", "<!-- reproduce:end -->"


def _ms(row: dict, batch: int) -> str:
    from netslim.report.markdown import latency_of

    ms = latency_of(row, batch)
    return "–" if ms is None else f"{ms:.1f}"


def _acc(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def _schedule(result: dict) -> str:
    """The one recipe every row shares: fine-tuning, images, repair, distillation."""
    s, rep = result["schedule"], result.get("repair")
    images = (f" of {result['train_images']:,} training images" if "train_images" in result else "")
    test = f"; test accuracy on {result['test_images']:,} test images" if "test_images" in result else ""
    repair = (f"; repair {rep['mode']}" + (f" ({rep['target']} targets, {rep['images']:,} images)"
                                           if rep["mode"] == "lsq" else "")) if rep else "; repair bn"
    distill = f", distilled from the base (weight {s['distill']})" if s.get("distill") else ""
    return (f"{result['date'][:10]}, {result['machine']['processor']}, torch {result['machine']['torch']}; "
            f"every row fine-tuned {s['epochs']} epoch{'s' if s['epochs'] != 1 else ''}{images} (lr {s['lr']}, "
            f"batch {s['batch_size']}, {s['schedule']}){distill}{repair}{test}; "
            f"{result['calibration_images']:,} calibration images for the analysis.")


def _notes(result: dict) -> list[str]:
    """What a row's stage columns mean when its method is not a plain cut."""
    notes = []
    for r in result["rows"]:
        meta = r.get("plan_meta") or {}
        if r.get("init") == "scratch":
            notes.append(f"{r['method']}: the designed network is re-initialised and trained from scratch for the "
                         "same epochs, so its \"cut\" column is a random network's")
        elif r.get("repair") == "method":
            rounds = meta.get("finetune_rounds")
            own = (f"after {rounds} prune-and-fine-tune round{'s' if rounds != 1 else ''} of its own" if rounds
                   is not None else "the weights the method fitted itself")
            notes.append(f"{r['method']}: \"method's network\" is {own}; the fine-tune column starts from it")
    return [f"- {n}." for n in dict.fromkeys(notes)]


def section(result: dict, name: str) -> str:
    base = result["base"]
    lines = [f"### {result['arch']} — `{name}`", "", _schedule(result), "",
             "| target | method | cut | after refit | after BN | method's network | after fine-tune | params (kept) "
             "| MACs | bytes (fp32) | CPU ms b=1 | CPU ms b=64 | analysis s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
             f"| – | base (not fine-tuned) | – | – | – | – | {base['accuracy']:.4f} | {base['params']:,} | "
             f"{base['macs']:,} | {base['bytes']:,} | {_ms(base, 1)} | {_ms(base, 64)} | – |"]
    for r in result["rows"]:
        own = "" if r["met_target"] else " (own size)"
        bn_kept = (r.get("bn_after_refit") or {}).get("kept", True)
        bn = r.get("accuracy_after_bn_recalibration")
        bn_cell = _acc(bn) + ("" if bn is None or bn_kept else " (dropped)")
        lines.append(f"| {r['target']}{own} | {r['method']} | {_acc(r['accuracy_after_surgery'])} | "
                     f"{_acc(r.get('accuracy_after_refit'))} | {bn_cell} | {_acc(r.get('accuracy_before_finetune'))} | "
                     f"{_acc(r['accuracy'])} | {r['params']:,} ({r['params_kept']:.3f}) | {r['macs']:,} | "
                     f"{r['bytes']:,} | {_ms(r, 1)} | {_ms(r, 64)} | {r.get('analysis_seconds', 0):.0f} |")
    command = result["command"]
    if "repair" not in result and "--repair" not in command:  # made before the refit existed: BN repair only
        command += " --repair bn"
    notes = _notes(result)
    lines += [""] + (notes + [""] if notes else []) + [
        "bytes: the weights at float32 as a deployment stores them (a sparse part's indices included); "
        "\"(dropped)\": BN re-estimation after the refit was measured but not kept (worse on held-out training "
        "images).", "", f"Reproduce: `{command}`", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--readme", type=Path, default=REPO / "README.md", help="file whose results section is rewritten")
    args = ap.parse_args()
    readme = args.readme
    readme.write_text(rendered(readme.read_text()))
    print("README results: bench tables, repair tables, paper reproductions")


def rendered(text: str, results: Path = RESULTS) -> str:
    """`text` (the README) with its three generated blocks rewritten from the JSON under `results`."""
    files = sorted(results.glob("bench_*.json"))
    body = ["Generated from `benchmarks/results/bench_*.json` by `python -m benchmarks.readme_results`. "
            "CPU numbers come from reduced schedules on a shared 2-core machine (see each file for details).", ""]
    body += [section(json.loads(f.read_text()), f.name) for f in files]
    text = _replace(text, START, END, body)
    text = _replace(text, REPAIR_START, REPAIR_END, repair_sections(results))
    return _replace(text, REPRO_START, REPRO_END, reproduce_sections(results))


def _replace(text: str, start: str, end: str, body: list[str]) -> str:
    if start not in text or end not in text:
        raise SystemExit(f"the README has no {start} … {end} block")
    return re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: start + "\n" + "\n".join(body) + end, text,
                  flags=re.S)


if __name__ == "__main__":
    main()
