"""The README's generated results blocks are what benchmarks.readme_results makes of the committed JSON: a number
edited by hand, or JSON re-run without regenerating, fails here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from benchmarks._common import REPO, RESULTS
from benchmarks.readme_results import rendered


def test_readme_blocks_match_the_committed_json() -> None:
    text = (REPO / "README.md").read_text()
    assert rendered(text) == text, "README results are stale: run python -m benchmarks.readme_results"


def test_a_changed_number_in_the_json_changes_the_readme(tmp_path: Path) -> None:
    src = sorted(RESULTS.glob("reproduce_*_cpu.json"))[0]
    shutil.copy(src, tmp_path / src.name)
    for f in [*RESULTS.glob("bench_*.json"), *RESULTS.glob("repair_*.json")]:
        shutil.copy(f, tmp_path / f.name)
    data = json.loads(src.read_text())
    data["rows"][0]["accuracy"] = 0.1234
    (tmp_path / src.name).write_text(json.dumps(data))
    text = (REPO / "README.md").read_text()
    assert "0.1234" in rendered(text, tmp_path) and "0.1234" not in text
