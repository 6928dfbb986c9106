"""`netslim bench` on the small CNN: two methods, two targets, one table; a killed bench resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import netslim.workflows.bench as bench_mod
from netslim.cost.targets import parse_target
from netslim.data import load_dataset
from netslim.train import Schedule, finetune
from netslim.zoo import build

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def trained():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    model = build("small_cnn", num_classes=10)
    finetune(model, train, Schedule(epochs=3, lr=0.05, batch_size=64), "cpu")
    return model, train, test


def run(model, train, test, out: Path, resume: bool = False) -> dict:
    return bench_mod.run_bench(model, "small_cnn", train, test, methods=["tp-l1", "pfa-en"],
                               targets=[parse_target("params=0.5"), parse_target("params=0.25")],
                               schedule=Schedule(epochs=1, lr=0.02, batch_size=64), out=out, calib_size=500,
                               measure_latency=False, resume=resume, log=lambda *_: None)


def test_bench_two_methods_two_targets(trained, tmp_path: Path) -> None:
    model, train, test = trained
    res = run(model, train, test, tmp_path / "b")
    assert len(res["rows"]) == 4
    base = res["base"]["params"]
    for row in res["rows"]:
        assert row["params"] <= parse_target(row["target"]).fraction * base
        assert 0.0 <= row["accuracy"] <= 1.0
    pfa = [r for r in res["rows"] if r["method"] == "pfa-en"]
    assert pfa[1]["new_statistics_passes"] == 0  # the second target reuses the first pass
    assert (tmp_path / "b" / "accuracy_vs_macs.png").is_file()
    assert "| params=0.25 | tp-l1 |" in (tmp_path / "b" / "report.md").read_text()


def test_bench_resumes_after_interruption(trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, train, test = trained
    real = bench_mod._one
    calls = []

    def dying(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(args[4])
        return real(*args, **kwargs)

    monkeypatch.setattr(bench_mod, "_one", dying)
    with pytest.raises(KeyboardInterrupt):
        run(model, train, test, tmp_path / "b")
    assert len(list((tmp_path / "b" / "runs").glob("*.json"))) == 2
    monkeypatch.setattr(bench_mod, "_one", lambda *a, **k: calls.append(a[4]) or real(*a, **k))
    res = run(model, train, test, tmp_path / "b", resume=True)
    assert len(res["rows"]) == 4
    assert len(calls) == 4  # two before the interruption, only the two missing ones after
    assert json.loads((tmp_path / "b" / "results.json").read_text())["rows"][0]["method"] == "tp-l1"


def test_scoped_options_reach_only_their_method() -> None:
    from netslim.errors import NetslimError
    from netslim.workflows.bench import check_options, method_options

    opts = {"min_keep": 2, "car.eval_size": 64, "tp_l1.x": 1, "pfa_en.min_keep": 4}
    assert method_options(opts, "car") == {"min_keep": 2, "eval_size": 64}
    assert method_options(opts, "tp-l1") == {"x": 1}  # tp-l1 declares no min_keep; a scoped key always reaches it
    assert method_options(opts, "pfa-en") == {"min_keep": 4}
    with pytest.raises(NetslimError, match="unknown option 'x' for tp-l1"):
        check_options(opts, ["car", "tp-l1", "pfa-en"])
    with pytest.raises(NetslimError, match="not a benched method"):
        check_options({"car.eval_size": 64}, ["pfa-en"])
    with pytest.raises(NetslimError, match="no benched method declares it"):
        check_options({"enrgy": 0.5}, ["pfa-kl", "pfa-en"])
    check_options({"energy": "0.5", "round_to": "8"}, ["pfa-kl", "pfa-en", "tp-l1"])  # each takes what it declares
