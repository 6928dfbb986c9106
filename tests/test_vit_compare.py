"""The vit_tiny comparison (benchmarks/vit/compare.py) runs end to end with --smoke on the shared CIFAR-10: a
netslim method and a torch-pruning criterion at the same params budget, both cutting whole heads, through the
same bench stages; a target a method cannot meet is recorded as refused with its reason, not dropped."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from conftest import shared_path

REPO = Path(__file__).resolve().parents[1]


def test_vit_compare_smoke(tmp_path: Path) -> None:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from benchmarks.vit import compare

    threads = torch.get_num_threads()
    try:
        compare.main(["--smoke", "--methods", "pfa-en,tp-l1,lrs", "--targets", "params=0.5", "--out",
                      str(tmp_path / "vit.json"), "--data", str(shared_path("data/cifar10-jpeg.tar.gz"))])
    finally:
        torch.set_num_threads(threads)
    got = json.loads((tmp_path / "vit.json").read_text())
    rows = {r["method"]: r for r in got["rows"]}
    assert set(rows) == {"pfa-en", "tp-l1"}
    for r in rows.values():
        assert r["target"] == "params=0.5" and 0.45 < r["params_kept"] <= 0.5
        assert r["heads"] and all(1 <= n < 4 for n in r["heads"].values())  # vit_tiny: 4 heads per block
    assert [x["method"] for x in got["refused"]] == ["lrs"] and "unreachable" in got["refused"][0]["reason"]
    assert got["summary"]["params=0.5"]["best_peer_after_finetune"]["method"] == "tp-l1"
    assert got["base_below_75"] and got["made"]["weights"] is None  # a random base, said so
