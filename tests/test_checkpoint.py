"""Checkpoints: Plan + safetensors reload from files alone; bad files get one clear error."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from netslim.errors import NetslimError
from netslim.io import atomic_dir
from netslim.plan import Plan
from netslim.surgery.apply import apply_plan
from netslim.surgery.checkpoint import load_model, save_model
from netslim.workflows.api import load_trained
from netslim.zoo import build

torch.set_num_threads(1)


def test_compressed_model_reloads_with_identical_outputs(tmp_path) -> None:
    model = build("resnet20", num_classes=10).eval()
    plan = Plan(arch="resnet20", num_classes=10, keep={"layer1.0.conv1": [0, 2, 4]}, drop=["layer3.2"],
                classes=[0, 4, 9])
    apply_plan(model, plan)
    with torch.no_grad():  # make BN statistics non-trivial so that they must be saved too
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
    save_model(tmp_path / "m.safetensors", model, plan)
    loaded, plan2 = load_model(tmp_path / "m.safetensors")
    assert plan2 == plan
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(loaded(x), model(x))


def _write_state(path, model) -> None:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def test_missing_file(tmp_path) -> None:
    with pytest.raises(NetslimError, match="does not exist"):
        load_trained(tmp_path / "nope.safetensors", "vgg11_bn", 10)


def test_truncated_and_corrupt_files(tmp_path) -> None:
    path = tmp_path / "w.safetensors"
    _write_state(path, build("small_cnn"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(NetslimError, match="corrupt or truncated"):
        load_trained(path, "small_cnn", 10)
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(NetslimError, match="corrupt or truncated"):
        load_trained(path, "small_cnn", 10)


def test_weights_for_another_architecture(tmp_path) -> None:
    path = tmp_path / "w.safetensors"
    _write_state(path, build("resnet20"))
    with pytest.raises(NetslimError, match="does not fit architecture 'resnet56'"):
        load_trained(path, "resnet56", 10)


def test_weights_for_another_class_count(tmp_path) -> None:
    path = tmp_path / "w.safetensors"
    _write_state(path, build("resnet20", num_classes=100))
    with pytest.raises(NetslimError, match="class count"):
        load_trained(path, "resnet20", 10)


def test_nan_weights_are_named(tmp_path) -> None:
    model = build("small_cnn")
    with torch.no_grad():
        model.classifier.weight[0, 0] = math.nan
    path = tmp_path / "w.safetensors"
    _write_state(path, model)
    with pytest.raises(NetslimError, match="'classifier.weight' contains NaN"):
        load_trained(path, "small_cnn", 10)


def test_atomic_dir_leaves_nothing_on_failure(tmp_path) -> None:
    target = tmp_path / "run"
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "half.txt").write_text("x")
        raise RuntimeError("boom")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_refuses_then_replaces(tmp_path) -> None:
    target = tmp_path / "run"
    target.mkdir()
    (target / "old.txt").write_text("keep me")
    with pytest.raises(NetslimError, match="already exists"), atomic_dir(target):
        pass
    assert (target / "old.txt").read_text() == "keep me"
    with pytest.raises(ValueError), atomic_dir(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("x")
        raise ValueError
    assert (target / "old.txt").exists()  # a failed overwrite loses nothing
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("x")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
