"""The repair stage inside compress and bench: cut → least-squares refit → BatchNorm → fine-tune, recorded."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from netslim.cli import app
from netslim.cost.targets import parse_target
from netslim.data import batches, load_dataset
from netslim.repair import Repair
from netslim.train import Schedule, fit
from netslim.workflows.bench import run_bench
from netslim.workflows.compress import compress
from netslim.zoo import build

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def trained() -> tuple:
    torch.manual_seed(0)
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    model = build("small_cnn", 10, 1)
    fit(model, batches(train, 64, shuffle=True), Schedule(epochs=6, lr=0.05), progress=False)
    return model.eval(), train, test


def _run(trained: tuple, mode: str, out: Path | None = None):
    model, train, test = trained
    return compress(copy.deepcopy(model), "small_cnn", train, test, method="tp-l1", target=parse_target("params=0.3"),
                    calib_size=300, measure_latency=False, out=out,
                    repair=Repair(mode=mode, images=600, holdout=200))


def test_lsq_repair_is_a_stage_with_its_own_accuracy_and_report(trained: tuple, tmp_path: Path) -> None:
    res = _run(trained, "lsq", tmp_path / "run")
    after, rep = res.metrics["after"], res.metrics["repair"]
    assert rep["mode"] == "lsq" and rep["settings"]["images"] == 600
    layers = rep["refit"]["layers"]
    refitted = [r for r in layers if r["refitted"]]
    assert refitted, layers
    for r in refitted:  # measured on 200 held-out training images: a refit never makes a layer worse there
        assert r["error_after"] <= r["error_before"] + 1e-9
    assert after["accuracy_after_refit"] > after["accuracy_after_surgery"] + 0.1
    assert "least-squares refit" in (tmp_path / "run" / "report.md").read_text()
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["after"]["accuracy_after_refit"] == after["accuracy_after_refit"]


def test_repair_modes_differ_only_in_the_stage(trained: tuple) -> None:
    lsq, bn, none = (_run(trained, m) for m in ("lsq", "bn", "none"))
    assert lsq.plan.keep == bn.plan.keep == none.plan.keep  # the repair never changes what was cut
    assert "accuracy_after_refit" not in bn.metrics["after"] and "refit" not in bn.metrics["repair"]
    assert "accuracy_after_bn_recalibration" in bn.metrics["after"]
    assert set(none.metrics["after"]) & {"accuracy_after_refit", "accuracy_after_bn_recalibration"} == set()
    assert none.metrics["after"]["accuracy"] == none.metrics["after"]["accuracy_after_surgery"]


def test_bench_rows_name_their_repair(trained: tuple, tmp_path: Path) -> None:
    model, train, test = trained
    res = run_bench(model, "small_cnn", train, test, methods=["tp-l1+bn", "tp-l1+lsq"],
                    targets=[parse_target("params=0.3")], schedule=Schedule(epochs=0), out=tmp_path / "b",
                    calib_size=300, measure_latency=False, log=lambda *_: None,
                    repair=Repair(images=600, holdout=200))
    bn, lsq = res["rows"]
    assert (bn["method"], bn["repair"], lsq["method"], lsq["repair"]) == ("tp-l1+bn", "bn", "tp-l1+lsq", "lsq")
    assert bn["widths"] == lsq["widths"] and bn["accuracy_after_refit"] is None
    assert lsq["accuracy_after_refit"] is not None
    assert "after LSQ refit" in (tmp_path / "b" / "report.md").read_text()


def test_a_bad_repair_is_refused_before_any_data(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["compress", "--data", str(tmp_path / "missing.tar.gz"), "--model", "small_cnn",
                                   "--repair", "banana", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--repair must be one of none, bn, lsq" in res.stderr
    res = CliRunner().invoke(app, ["bench", "--data", str(tmp_path / "missing.tar.gz"), "--model", "small_cnn",
                                   "--methods", "tp-l1+fix", "--out", str(tmp_path / "b")])
    assert res.exit_code == 2 and "after '+' comes a repair (none, bn, lsq) or a channel selection" in res.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "b").exists()


def test_a_time_budget_shortens_the_schedule_and_keeps_the_better_network(trained: tuple) -> None:
    model, train, test = trained
    res = compress(copy.deepcopy(model), "small_cnn", train, test, method="tp-l1", target=parse_target("params=0.3"),
                   calib_size=300, measure_latency=False, repair=Repair(images=600, holdout=200),
                   schedule=Schedule(epochs=500, lr=0.02, batch_size=64, budget_minutes=0.05))
    history, choice = res.metrics["history"], res.metrics["repair"]["finetune_choice"]
    assert 1 <= len(history) < 500  # 500 epochs do not fit in 3 seconds; a whole onecycle of fewer does
    assert choice["validation_images"] > 0 and choice["kept"] in ("fine-tuned", "repaired")
    assert (choice["after"] >= choice["before"]) == (choice["kept"] == "fine-tuned")
    if choice["kept"] == "repaired":
        after = res.metrics["after"]
        stage = "accuracy_after_bn_recalibration" if after["bn_recalibration_kept"] else "accuracy_after_refit"
        assert after["accuracy"] == after[stage]


def test_bn_repair_after_the_refit_is_kept_only_if_it_helps_on_held_out_training_images(trained: tuple) -> None:
    res = _run(trained, "lsq")
    choice, after = res.metrics["repair"]["bn_after_refit"], res.metrics["after"]
    assert choice["validation_images"] == 200 and choice["kept"] == (choice["refit_bn"] >= choice["refit"])
    stage = "accuracy_after_bn_recalibration" if choice["kept"] else "accuracy_after_refit"
    assert after["accuracy"] == after[stage] and after["bn_recalibration_kept"] == choice["kept"]


def test_thinet_rows_keep_the_widths_and_record_the_new_channels(trained: tuple, tmp_path: Path) -> None:
    model, train, test = trained
    res = run_bench(model, "small_cnn", train, test, methods=["tp-l1+lsq", "tp-l1+lsq+thinet"],
                    targets=[parse_target("params=0.3")], schedule=Schedule(epochs=0), out=tmp_path / "b",
                    calib_size=300, measure_latency=False, log=lambda *_: None,
                    repair=Repair(images=600, holdout=200))
    own, thin = res["rows"]
    assert own["widths"] == thin["widths"] and own["params"] == thin["params"]
    assert own["selection"] is None and thin["plan_meta"]["selection"] == "thinet"
    assert thin["selection"]["groups"] >= 1 and thin["selection"]["channels_changed"] >= 1
    assert thin["accuracy_after_surgery"] != own["accuracy_after_surgery"]  # other channels were cut
