"""The promise: bad input is one `error:` line and exit 2, nothing already written is lost or half-written, and
what a file holds is data. One test (or a few) per defect that broke it, on the embedded digits data."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import netslim.io as nio
import netslim.workflows.bench as bench_mod
from netslim.cli import app
from netslim.cost.targets import parse_target
from netslim.data import calibration_subset, load_dataset
from netslim.errors import NetslimError
from netslim.plan import Plan
from netslim.surgery.checkpoint import CLASSES_KEY, load_model, read_metadata, save_model
from netslim.train import Schedule
from netslim.zoo import build

torch.set_num_threads(1)
runner = CliRunner()
DIGITS = [str(i) for i in range(10)]


def run(*args: str) -> tuple[int, str, str]:
    res = runner.invoke(app, [str(a) for a in args])
    return res.exit_code, res.stdout, res.stderr


def refused(code: int, err: str, *words: str) -> None:
    """Exit 2 with exactly one `error:` line that contains `words`, and no traceback."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0], (w, err)


def siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def digits_file(path: Path, classes: list[str] | None = None, seed: int = 0) -> Path:
    """A small CNN for digits (random weights) saved by netslim, with or without stored class names."""
    torch.manual_seed(seed)
    save_model(path, build("small_cnn", 10, 1), Plan("small_cnn", 10, (1, 16, 16)), classes=classes)
    return path


def png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, format="PNG")
    return buf.getvalue()


def image_folder(root: Path, classes: tuple[str, ...] = ("cat", "dog"), empty: str | None = None) -> Path:
    """An RGB 16x16 ImageFolder (train/ and test/), optionally with an empty class folder in train/."""
    for split, n in (("train", 4), ("test", 2)):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                (root / split / name / f"{i}.png").write_bytes(png((60 * c + 10 * i, 20 * i, 90)))
    if empty:
        (root / "train" / empty).mkdir()
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A compress-like run directory on digits (names stored, its data recorded)."""
    out = tmp_path_factory.mktemp("rel") / "run"
    out.mkdir()
    digits_file(out / "model.safetensors", DIGITS)
    (out / "metrics.json").write_text(json.dumps({"data": "digits", "command": "netslim compress"}))
    return out


# ---------------------------------------------------------------- 1. files lost or mixed
def test_demo_refuses_an_existing_out(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, _, err = run("demo", "--out", out, "--epochs", "1", "--finetune-epochs", "0")
    refused(code, err, "already exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "precious"


def test_bench_refuses_a_non_empty_out(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "report.md").write_text("mine")
    code, _, err = run("bench", "--model", "small_cnn", "--methods", "tp-random", "--out", out, "--no-latency")
    refused(code, err, "not empty", "--resume", "--overwrite")
    assert siblings(out) == ["report.md"] and (out / "report.md").read_text() == "mine"
    code, _, err = run("bench", "--model", "small_cnn", "--out", out, "--resume", "--overwrite")
    refused(code, err, "pass one of them")


@pytest.fixture(scope="module")
def bench_data() -> tuple[torch.nn.Module, object, object]:
    train = calibration_subset(load_dataset("digits", "train"), 300, seed=0)
    test = calibration_subset(load_dataset("digits", "test"), 60, seed=0)
    torch.manual_seed(0)
    return build("small_cnn", 10, 1), train, test


def bench(model: torch.nn.Module, train: object, test: object, out: Path, **kw: object) -> dict:
    return bench_mod.run_bench(model, "small_cnn", train, test, methods=["tp-random"],  # type: ignore[arg-type]
                               targets=[parse_target("params=0.5")], schedule=Schedule(epochs=0), out=out,
                               calib_size=100, measure_latency=False, log=lambda *_: None, **kw)  # type: ignore[arg-type]


def test_bench_overwrite_replaces_only_a_complete_bench(bench_data, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    model, train, test = bench_data
    out = tmp_path / "b"
    out.mkdir()
    (out / "report.md").write_text("old")

    def boom(*a: object, **k: object) -> dict:
        raise RuntimeError("killed mid-bench")

    with monkeypatch.context() as m:
        m.setattr(bench_mod, "_one", boom)
        with pytest.raises(RuntimeError):
            bench(model, train, test, out, overwrite=True)
    assert siblings(out) == ["report.md"] and (out / "report.md").read_text() == "old"
    assert siblings(tmp_path) == ["b"]  # no temporary sibling left behind
    bench(model, train, test, out, overwrite=True)
    assert {"report.md", "bench.json"} <= set(siblings(out)) and "old" not in (out / "report.md").read_text()
    assert siblings(tmp_path) == ["b"]


def test_export_refuses_an_existing_file_and_replaces_it_cleanly(run_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "model.onnx"
    target.write_text("precious")
    code, _, err = run("export", run_dir, "--out", target, "--images", "20", "--threads", "1")
    refused(code, err, "already exists", "--overwrite")
    assert target.read_text() == "precious"
    from netslim.workflows.export import export_run

    export_run(run_dir, "onnx", out=target, images=20, batches=(1,), max_seconds=0.1, overwrite=True)
    assert target.read_bytes() != b"precious" and siblings(tmp_path) == ["model.onnx"]


def test_overwriting_a_file_with_a_directory_leaves_nothing_stray(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out"
    target.write_text("old file")
    with pytest.raises(ValueError), nio.atomic_dir(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("x")
        raise ValueError
    assert target.read_text() == "old file" and siblings(tmp_path) == ["out"]
    real, calls = os.replace, []

    def failing_swap(src: object, dst: object) -> None:  # moving the old aside works, the swap itself fails
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("disk full")
        real(src, dst)

    with monkeypatch.context() as m:
        m.setattr(nio.os, "replace", failing_swap)
        with pytest.raises(OSError), nio.atomic_dir(target, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("x")
    assert target.read_text() == "old file" and siblings(tmp_path) == ["out"]
    with nio.atomic_dir(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("x")
    assert target.is_dir() and siblings(target) == ["new.txt"] and siblings(tmp_path) == ["out"]


def test_pack_overwrite_of_a_file_leaves_nothing_stray(run_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "packed"
    target.write_text("a file")
    code, _, err = run("pack", run_dir, "--out", target, "--finetune-epochs", "0")
    refused(code, err, "already exists")
    code, _, err = run("pack", run_dir, "--out", target, "--finetune-epochs", "0", "--overwrite")
    assert code == 0, err
    assert "packed.safetensors" in siblings(target) and siblings(tmp_path) == ["packed"]


# ---------------------------------------------------------------- 2. train --classes
def test_train_on_a_class_subset_writes_a_model_that_loads_and_scores(tmp_path: Path) -> None:
    out = tmp_path / "t3"
    code, stdout, err = run("train", "--classes", "0,1,2", "--epochs", "1", "--out", out, "--json")
    assert code == 0, err
    trained = json.loads(stdout)["accuracy"]
    model, plan = load_model(out)
    assert plan.out_classes == 3 and model(torch.zeros(1, 1, 16, 16)).shape == (1, 3)
    assert json.loads(read_metadata(out / "model.safetensors")[CLASSES_KEY]) == ["0", "1", "2"]
    code, stdout, err = run("evaluate", "--weights", out / "model.safetensors", "--classes", "0,1,2", "--json")
    assert code == 0, err
    scored = json.loads(stdout)
    assert scored["accuracy"] == pytest.approx(trained, abs=1e-9) and scored["images"] == 107
    code, _, err = run("evaluate", "--weights", out / "model.safetensors")
    refused(code, err, "scores classes 0, 1, 2", "--classes 0,1,2")


# ---------------------------------------------------------------- 3. bench --resume, compress's .train
def test_bench_resume_refuses_rows_made_with_other_inputs(bench_data, tmp_path: Path) -> None:
    model, train, test = bench_data
    out = tmp_path / "b"
    bench(model, train, test, out)
    rows = siblings(out / "runs")
    torch.manual_seed(1)
    other = build("small_cnn", 10, 1)
    with pytest.raises(NetslimError, match="weights_sha256"):
        bench(other, train, test, out, resume=True)
    with pytest.raises(NetslimError, match=r"test_data\.images: 60 → 30"):
        bench(model, train, calibration_subset(test, 30, seed=0), out, resume=True)
    with pytest.raises(NetslimError, match=r"schedule\.lr"):
        bench_mod.run_bench(model, "small_cnn", train, test, methods=["tp-random"],  # type: ignore[arg-type]
                            targets=[parse_target("params=0.5")], schedule=Schedule(epochs=0, lr=0.5), out=out,
                            calib_size=100, measure_latency=False, log=lambda *_: None, resume=True)
    assert siblings(out / "runs") == rows
    again = bench(model, train, test, out, resume=True)  # same inputs: the rows are reused
    assert len(again["rows"]) == 1 and siblings(out / "runs") == rows


def test_bench_resume_refuses_a_directory_that_is_not_a_bench(tmp_path: Path) -> None:
    out = tmp_path / "x"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = run("bench", "--model", "small_cnn", "--methods", "tp-random", "--out", out, "--resume",
                       "--no-latency", "--finetune-epochs", "0", "--repair", "none")
    refused(code, err, "bench.json")
    assert siblings(out) == ["notes.txt"]


def test_compress_run_directory_keeps_no_training_state(tmp_path: Path) -> None:
    weights = digits_file(tmp_path / "w.safetensors", DIGITS)
    out = tmp_path / "run"
    code, _, err = run("compress", "--weights", weights, "--method", "l1", "--target", "params=0.5", "--epochs", "1",
                       "--out", out, "--no-latency", "--repair", "none", "--calib-size", "200")
    assert code == 0, err
    assert ".train" not in siblings(out) and siblings(tmp_path) == ["run", "w.safetensors"]
    assert json.loads((out / "metrics.json").read_text())["data"] == "digits"


# ---------------------------------------------------------------- 4. mismatches found late
def test_image_shape_is_checked_before_any_work(tmp_path: Path) -> None:
    cifar = tmp_path / "vgg.safetensors"
    save_model(cifar, build("small_cnn", 10, 3), Plan("small_cnn", 10, (3, 32, 32)))
    code, _, err = run("evaluate", "--weights", cifar, "--data", "digits")
    refused(code, err, "3×32×32", "1×16×16")
    folder = image_folder(tmp_path / "rgb")
    code, _, err = run("evaluate", "--weights", digits_file(tmp_path / "d.safetensors"), "--data", folder,
                       "--cache-dir", tmp_path / "cache")
    refused(code, err, "1×16×16", "3×16×16")


@pytest.mark.parametrize(("plan", "words"), [
    ("{not json", ("not valid JSON",)),
    (json.dumps({"version": 1, "arch": "small_cnn", "num_classes": 10, "input_size": [1, 16, 16], "keep": 5}),
     ("'keep' must be",)),
    (json.dumps(["small_cnn"]), ("expected a JSON object",)),
    (json.dumps({"arch": "small_cnn", "num_classes": "ten"}), ("'num_classes' must be",)),
    (json.dumps({"arch": "small_cnn", "num_classes": 10, "input_size": [1, 16]}), ("'input_size' must be",)),
])
def test_malformed_plan_metadata_is_one_error_line(tmp_path: Path, plan: str, words: tuple[str, ...]) -> None:
    from safetensors.torch import save_file

    weights = tmp_path / "w.safetensors"
    state = {k: v.contiguous() for k, v in build("small_cnn", 10, 1).state_dict().items()}
    save_file(state, str(weights), metadata={"netslim_plan": plan, "arch": "small_cnn"})
    code, _, err = run("evaluate", "--weights", weights)
    refused(code, err, str(weights), *words)
    (tmp_path / "plan.json").write_text(plan)
    with pytest.raises(NetslimError, match="plan"):
        Plan.load(tmp_path / "plan.json")


def test_class_names_travel_with_the_weights_and_are_checked(tmp_path: Path) -> None:
    letters = list("abcdefghij")
    named = digits_file(tmp_path / "letters.safetensors", letters)
    for args in (["evaluate", "--weights", named],
                 ["compress", "--weights", named, "--method", "l1", "--out", tmp_path / "c", "--no-latency"]):
        code, _, err = run(*args)
        refused(code, err, "scores classes a, b, c", "digits has classes 0, 1, 2")
    assert not (tmp_path / "c").exists()
    code, _, err = run("evaluate", "--weights", named, "--classes", "1,2")
    refused(code, err, "subset of the model's classes")
    legacy = digits_file(tmp_path / "legacy.safetensors")  # no names stored: matched by position, as before
    assert run("evaluate", "--weights", legacy)[0] == 0
    digits = digits_file(tmp_path / "digits.safetensors", DIGITS)
    code, stdout, err = run("evaluate", "--weights", digits, "--classes", "3,7", "--json")
    assert code == 0 and json.loads(stdout)["params"] < 24058, err


def test_pack_and_export_refuse_data_with_other_class_names(tmp_path: Path) -> None:
    run_letters = tmp_path / "run"
    run_letters.mkdir()
    digits_file(run_letters / "model.safetensors", list("abcdefghij"))
    (run_letters / "metrics.json").write_text(json.dumps({"data": "digits"}))
    code, _, err = run("pack", run_letters, "--finetune-epochs", "0")
    refused(code, err, "scores classes a, b", "digits has classes 0, 1")
    code, _, err = run("export", run_letters, "--images", "20")
    refused(code, err, "scores classes a, b")
    assert siblings(run_letters) == ["metrics.json", "model.safetensors"]


def test_an_empty_class_folder_is_an_error(tmp_path: Path) -> None:
    folder = image_folder(tmp_path / "data", empty="zebra")
    with pytest.raises(NetslimError, match="class folder train/zebra has no images"):
        load_dataset(str(folder), "train", cache_dir=tmp_path / "cache")
    archive = tmp_path / "data.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(folder, arcname="top")
    with pytest.raises(NetslimError, match="class folder top/train/zebra has no images"):
        load_dataset(str(archive), "train", cache_dir=tmp_path / "cache")


def test_pack_uses_the_runs_own_data_or_asks_for_it(tmp_path: Path) -> None:
    folder = image_folder(tmp_path / "pets")
    run_pets = tmp_path / "run"
    run_pets.mkdir()
    save_model(run_pets / "model.safetensors", build("small_cnn", 2, 3), Plan("small_cnn", 2, (3, 16, 16)),
               classes=["cat", "dog"])
    (run_pets / "metrics.json").write_text(json.dumps({"data": str(folder), "command": "netslim compress"}))
    code, stdout, err = run("pack", run_pets, "--finetune-epochs", "0", "--cache-dir", tmp_path / "cache", "--json")
    assert code == 0, err
    assert json.loads(stdout)["verify"]["images"] == 4  # the pets' test split, not digits
    (run_pets / "metrics.json").write_text(json.dumps({"command": "netslim compress --method l1"}))
    code, _, err = run("pack", run_pets, "--out", tmp_path / "p2", "--finetune-epochs", "0")
    refused(code, err, "give --data")


def test_evaluate_accepts_only_train_or_test() -> None:
    code, _, err = run("evaluate", "--model", "small_cnn", "--split", "banana")
    refused(code, err, "--split must be train or test")


def test_train_and_pack_check_the_schedule_before_the_data(run_dir: Path, tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-data")
    code, _, err = run("train", "--lr", "-1", "--data", missing, "--out", tmp_path / "t")
    refused(code, err, "learning rate must be positive")
    code, _, err = run("pack", run_dir, "--lr", "0", "--data", missing, "--out", tmp_path / "p")
    refused(code, err, "learning rate must be positive")
