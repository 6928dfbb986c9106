"""The command line end to end on the embedded digits data: train, compress, evaluate, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from netslim.cli.commands import app
from netslim.surgery.checkpoint import load_model

torch.set_num_threads(1)
runner = CliRunner()


def run(*args: str) -> tuple[int, str, str]:
    res = runner.invoke(app, list(args))
    return res.exit_code, res.stdout, res.stderr


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "base"
    code, _, err = run("train", "--model", "small_cnn", "--data", "digits", "--epochs", "4", "--out", str(out))
    assert code == 0, err
    return out / "model.safetensors"


def test_compress_writes_a_reloadable_run(base: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    code, stdout, err = run("compress", "--weights", str(base), "--method", "l1", "--target", "params=0.5",
                            "--finetune-epochs", "1", "--out", str(out), "--no-latency", "--json")
    assert code == 0, err
    assert {p.name for p in out.iterdir()} >= {"plan.json", "model.safetensors", "metrics.json", "report.md",
                                                "widths.png"}
    metrics = json.loads(stdout)
    assert metrics["after"]["params"] <= 0.5 * metrics["before"]["params"]
    assert "| test accuracy |" in (out / "report.md").read_text()
    model, plan = load_model(out)
    assert plan.method == "l1"
    code, stdout, err = run("evaluate", "--weights", str(out / "model.safetensors"), "--data", "digits", "--json")
    assert code == 0, err
    assert json.loads(stdout)["accuracy"] == pytest.approx(metrics["after"]["accuracy"], abs=1e-9)


def test_existing_output_is_refused_and_kept(base: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "mine.txt").write_text("precious")
    code, _, err = run("compress", "--weights", str(base), "--method", "l1", "--out", str(out), "--no-latency")
    assert code == 2
    assert "already exists" in err
    assert (out / "mine.txt").read_text() == "precious"


@pytest.mark.parametrize(("target", "message"), [("params=0.0001", "unreachable"), ("params=1.5", "impossible"),
                                                  ("size=0.5", "must look like")])
def test_impossible_targets(base: Path, tmp_path: Path, target: str, message: str) -> None:
    out = tmp_path / "run"
    code, _, err = run("compress", "--weights", str(base), "--method", "l1", "--target", target, "--out", str(out),
                       "--no-latency")
    assert code == 2
    assert message in err
    assert not out.exists()


def test_compress_distils_from_the_unpruned_network(base: Path, tmp_path: Path) -> None:
    out = tmp_path / "kd"
    code, stdout, err = run("compress", "--weights", str(base), "--method", "l1", "--target", "params=0.25",
                            "--finetune-epochs", "2", "--out", str(out), "--no-latency", "--json")
    assert code == 0, err
    metrics = json.loads(stdout)  # distillation is compress's default (weight 0.5)
    assert metrics["schedule"]["distill"] == 0.5 and metrics["schedule"]["temperature"] == 4.0
    assert len(metrics["history"]) == 2
    assert metrics["after"]["accuracy"] > metrics["after"]["accuracy_after_surgery"] + 0.05
    code, stdout, err = run("compress", "--weights", str(base), "--method", "l1", "--target", "params=0.25",
                            "--finetune-epochs", "2", "--distill", "0", "--out", str(tmp_path / "plain"),
                            "--no-latency", "--json")
    assert code == 0, err
    plain = json.loads(stdout)
    assert plain["schedule"]["distill"] == 0.0
    # same data, seeds and cut: only the teacher's term can make the two losses differ
    assert plain["after"]["accuracy_after_surgery"] == metrics["after"]["accuracy_after_surgery"]
    assert abs(plain["history"][0]["train_loss"] - metrics["history"][0]["train_loss"]) > 1e-3


def test_bad_inputs_exit_2_with_one_message(base: Path, tmp_path: Path) -> None:
    cases = [
        (["evaluate", "--weights", str(tmp_path / "missing.safetensors"), "--model", "small_cnn"], "does not exist"),
        (["evaluate", "--weights", str(base), "--model", "resnet20"], "holds a 'small_cnn' network"),
        (["compress", "--weights", str(base), "--method", "magic"], "unknown method"),
        (["evaluate", "--weights", str(base), "--classes", "cat"], "unknown class"),
        (["evaluate", "--weights", str(base), "--data", str(tmp_path / "nowhere")], "nowhere"),
        (["compress", "--weights", str(base), "--method", "lda", "--val-from", "val", "--out", str(tmp_path / "v")],
         "--val-from must be train or test"),
        (["compress", "--weights", str(base), "--method", "l1", "--distill", "1.5", "--out", str(tmp_path / "d")],
         "--distill must be in [0, 1]"),
    ]
    for args, message in cases:
        code, _, err = run(*args)
        assert code == 2, (args, err)
        assert message in err, (args, err)
        assert "Traceback" not in err
