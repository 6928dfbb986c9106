"""Regenerate the README's "Results" section from committed bench JSON (benchmarks/results/bench_*.json) and its
one-shot repair tables from benchmarks/results/repair_*.json (benchmarks.repair.readme).

    python -m benchmarks.readme_results [--readme README.md]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from benchmarks._common import REPO, RESULTS
from benchmarks.repair.readme import sections as repair_sections

START, END = "<!-- results:start -->", "<!-- results:end -->"
REPAIR_START, REPAIR_END = "<!-- repair:start -->", "<!-- repair:end -->"


def _ms(row: dict, batch: int) -> str:
    from netslim.report.markdown import latency_of

    ms = latency_of(row, batch)
    return "–" if ms is None else f"{ms:.1f}"


def section(result: dict, name: str) -> str:
    base, s = result["base"], result["schedule"]
    lines = [f"### {result['arch']} — `{name}`", "",
             f"{result['date'][:10]}, {result['machine']['processor']}, torch {result['machine']['torch']}; "
             f"every method fine-tuned {s['epochs']} epoch{'s' if s['epochs'] != 1 else ''} "
             f"(lr {s['lr']}, batch {s['batch_size']}, {s['schedule']}).",
             "", "| target | method | acc. after surgery | after BN recal. | acc. after fine-tune | params | MACs "
             "| CPU ms b=1 | CPU ms b=64 | analysis s |",
             "|---|---|---|---|---|---|---|---|---|---|",
             f"| – | base | {base['accuracy']:.4f} | – | {base['accuracy']:.4f} | {base['params']:,} | "
             f"{base['macs']:,} | "
             f"{_ms(base, 1)} | {_ms(base, 64)} | – |"]
    for r in result["rows"]:
        own = "" if r["met_target"] else " (own size)"
        recal = r.get("accuracy_after_bn_recalibration")
        lines.append(f"| {r['target']}{own} | {r['method']} | {r['accuracy_after_surgery']:.4f} | "
                     f"{'–' if recal is None else f'{recal:.4f}'} | "
                     f"{r['accuracy']:.4f} | {r['params']:,} ({r['params_kept']:.3f}) | {r['macs']:,} | "
                     f"{_ms(r, 1)} | {_ms(r, 64)} | {r.get('analysis_seconds', 0):.0f} |")
    command = result["command"]
    if "repair" not in result and "--repair" not in command:  # made before the refit existed: BN repair only
        command += " --repair bn"
    lines += ["", f"Reproduce: `{command}`", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--readme", type=Path, default=REPO / "README.md", help="file whose results section is rewritten")
    args = ap.parse_args()
    files = sorted(RESULTS.glob("bench_*.json"))
    body = ["Generated from `benchmarks/results/bench_*.json` by `python -m benchmarks.readme_results`. "
            "CPU numbers come from reduced schedules on a shared 2-core machine (see each file for details).", ""]
    body += [section(json.loads(f.read_text()), f.name) for f in files]
    readme = args.readme
    text = _replace(readme.read_text(), START, END, body)
    text = _replace(text, REPAIR_START, REPAIR_END, repair_sections(RESULTS))
    readme.write_text(text)
    print(f"README results: {len(files)} bench file(s), repair tables")


def _replace(text: str, start: str, end: str, body: list[str]) -> str:
    if start not in text or end not in text:
        raise SystemExit(f"the README has no {start} … {end} block")
    return re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: start + "\n" + "\n".join(body) + end, text,
                  flags=re.S)


if __name__ == "__main__":
    main()
