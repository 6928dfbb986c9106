"""The paper reproductions (benchmarks/reproduce/) run end to end with --smoke (the same code path on a few images
of the shared CIFAR-10, one step, on the shared VGG-16) and write what a reproduction must report: the paper's
number quoted from ../shared/methods, ours, the schedule, the machine, and torch-pruning's criteria beside the
method. The scripts' real schedules are GPU jobs; their results are not checked here."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import shared_path

REPO = Path(__file__).resolve().parents[1]
PEERS = {"tp-l1", "tp-random", "tp-taylor"}
OWN = {"pfa": {"pfa-en", "pfa-kl"}, "pca": {"original", "pca"}, "lda": {"lda"}, "car": {"car"}, "lrs": {"lrs"}}


@pytest.fixture(scope="module")
def shared() -> list[str]:
    return ["--data", str(shared_path("data/cifar10-jpeg.tar.gz")),
            "--weights", str(shared_path("models/vgg16_bn_cifar10.safetensors")),
            "--papers", str(shared_path("methods"))]


def smoke(name: str, shared: list[str], out: Path) -> dict:
    """`python -m benchmarks.reproduce.<name> --smoke`, in this process (one import of torch for all five)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    module = importlib.import_module(f"benchmarks.reproduce.{name}")
    threads = torch.get_num_threads()
    try:
        module.main(["--smoke", "--distill", "0.5", "--out", str(out), *shared])  # the CPU recipes distil
    finally:
        torch.set_num_threads(threads)
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", sorted(OWN))
def test_reproduction_smoke_writes_paper_ours_schedule_machine_and_peers(name: str, shared: list[str],
                                                                          tmp_path: Path) -> None:
    result = smoke(name, shared, tmp_path / f"{name}.json")
    assert result["benchmark"] == f"reproduce_{name}"
    quotes = [result["paper"]] if "source" in result["paper"] else list(result["paper"].values())
    for quote in quotes:  # the paper's number, quoted verbatim from the spec it names
        assert quote["source"].startswith("../shared/methods/") and quote["quote_found"], quote
        assert len(quote) > 3  # source, quote, quote_found and the numbers themselves
    assert result["ours"]
    schedule = result["schedule"]
    assert schedule["kind"] == "smoke" and schedule["epochs"] >= 0 and schedule["train_images"] > 0
    assert result["machine"]["torch"] == torch.__version__ and result["device"] == "cpu"
    rows = result["rows"]
    methods = {r["method"] for r in rows}
    assert OWN[name] | PEERS <= methods, methods
    for row in rows:
        assert row["accuracy"] is None or 0.0 <= row["accuracy"] <= 1.0
        assert row["params"] > 0
        if str(row.get("target") or "").startswith("params="):  # every budgeted row meets its budget
            assert row["params_kept"] <= float(row["target"].split("=")[1]) + 1e-4, row
    assert result["differences"]
    if name == "car":  # the peers halve the same layers to the same widths as CAR, in every experiment
        widths: dict[str, dict[str, dict]] = {}
        for row in rows:
            widths.setdefault(row["experiment"], {})[row["method"]] = row["widths"]
        assert len(widths) == 3  # conv1 alone, conv2 alone, both (fine-tuned and packed)
        assert all(w == ws["car"] for ws in widths.values() for w in ws.values()), widths
        assert result["car"]["car@features.0"]["mode"].startswith("exact greedy")
    if name in ("pfa", "lda"):  # peers beside every size the method reached (pfa: both its variants; lda: both tasks)
        for experiment in {r["experiment"] for r in rows if r["method"] not in PEERS}:
            assert PEERS <= {r["method"] for r in rows if r["experiment"] == experiment}, experiment
