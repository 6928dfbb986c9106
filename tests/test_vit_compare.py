"""The vit_tiny comparison (benchmarks/vit/compare.py) runs end to end with --smoke on the shared CIFAR-10: lrs
(attention's projections factorized) and a torch-pruning criterion (whole heads cut) at the same budget, through
the same bench stages; lrs meets a FLOPs budget with low rank alone; a target a method cannot meet is recorded
as refused with its reason, not dropped; the summary counts only rows at the budget."""

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
        compare.main(["--smoke", "--methods", "tp-l1,lrs", "--targets", "params=0.5,flops=0.5,params=0.001", "--out",
                      str(tmp_path / "vit.json"), "--data", str(shared_path("data/cifar10-jpeg.tar.gz"))])
    finally:
        torch.set_num_threads(threads)
    got = json.loads((tmp_path / "vit.json").read_text())
    rows = {(r["method"], r["target"]): r for r in got["rows"]}
    assert set(rows) == {(m, t) for m in ("tp-l1", "lrs") for t in ("params=0.5", "flops=0.5")}
    for (method, target), r in rows.items():
        assert 0.45 < r["params_kept"] <= 0.5 or target == "flops=0.5"
        if method == "tp-l1":
            assert r["heads"] and all(1 <= n < 4 for n in r["heads"].values())  # vit_tiny: 4 heads per block
    assert sum(k.endswith((".in_proj", ".out_proj")) for k in rows[("lrs", "params=0.5")]["factorized"]) >= 6
    low_rank = rows[("lrs", "flops=0.5")]
    assert low_rank["met_target"] and low_rank["flops"] <= 0.5 * got["base"]["flops"]
    assert all(layer["nnz"] == 0 and layer["rank"] > 0 for layer in low_rank["plan_meta"]["layers"])
    assert [(x["method"], x["target"]) for x in got["refused"]] == [("tp-l1", "params=0.001"), ("lrs", "params=0.001")]
    assert all("unreachable" in x["reason"] for x in got["refused"])
    assert got["summary"]["params=0.5"]["best_peer_after_finetune"]["method"] == "tp-l1"
    assert got["summary"]["params=0.5"]["best_netslim_after_finetune"]["method"] == "lrs"
    assert got["base_below_75"] and got["made"]["weights"] is None  # a random base, said so


def test_the_summary_compares_only_rows_at_the_budget() -> None:
    """pfa-kl (parameter-free) benched above the budget does not count as netslim's best, however accurate."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from benchmarks.vit.compare import _summary

    rows = [{"method": "pfa-kl", "met_target": False, "accuracy": 0.9, "accuracy_after_refit": 0.8},
            {"method": "pfa-en", "met_target": True, "accuracy": 0.6, "accuracy_after_refit": 0.5},
            {"method": "tp-l1", "met_target": True, "accuracy": 0.7, "accuracy_after_refit": 0.4}]
    got = _summary(rows)
    assert got["not_at_budget"] == ["pfa-kl"]
    assert got["best_netslim_after_finetune"] == {"method": "pfa-en", "accuracy": 0.6}
    assert got["best_netslim_before_finetune"] == {"method": "pfa-en", "accuracy": 0.5}
    assert got["best_peer_after_finetune"] == {"method": "tp-l1", "accuracy": 0.7}


def test_vit_latency_smoke(tmp_path: Path) -> None:
    """benchmarks/vit/latency.py times the base and each method's network in turns and sizes each: lrs at
    flops=0.5 (low rank alone) and tp-l1 at the same budget keep at most half the FLOPs."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from benchmarks.vit import latency

    threads = torch.get_num_threads()
    try:
        got = latency.main(["--smoke", "--methods", "lrs,tp-l1", "--targets", "flops=0.5", "--out",
                            str(tmp_path / "lat.json"), "--data", str(shared_path("data/cifar10-jpeg.tar.gz"))])
    finally:
        torch.set_num_threads(threads)
    labels = ["base", "lrs flops=0.5", "tp-l1 flops=0.5"]
    assert list(got["kept"]) == labels
    assert all(0.4 < got["kept"][n]["flops"] <= 0.5 for n in labels[1:])
    for row in got["timing"]:
        assert [n["network"] for n in row["networks"]] == labels and row["rounds"] >= 5
        assert row["networks"][0]["time_vs_base"] == 1.0 and all(n["ms"] > 0 for n in row["networks"])
