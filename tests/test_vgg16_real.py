"""The shared VGG-16 on the real CIFAR-10 archive: accuracy, and an 8x L1 compression that reloads exactly."""

from __future__ import annotations

import pytest
import torch
from conftest import shared_path

from netslim.cost.targets import parse_target
from netslim.data import calibration_subset
from netslim.surgery.checkpoint import load_model
from netslim.workflows.api import load_data, load_trained
from netslim.workflows.compress import compress
from netslim.workflows.stages import accuracy

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def vgg():
    train, test, _, n = load_data(str(shared_path("data/cifar10-jpeg.tar.gz")))
    model, arch, _ = load_trained(shared_path("models/vgg16_bn_cifar10.safetensors"), "vgg16_bn", n)
    return model, arch, calibration_subset(train, 1000, seed=0), calibration_subset(test, 1000, seed=0)


def test_shared_vgg16_accuracy(vgg) -> None:
    model, _, _, test = vgg
    assert accuracy(model, test, "cpu") == pytest.approx(0.9065, abs=0.025)  # 1,000-image subset of the test split


def test_l1_to_one_eighth_reloads_with_identical_outputs(vgg, tmp_path) -> None:
    model, arch, train, test = vgg
    res = compress(model, arch, train, test, method="l1", target=parse_target("params=0.125"), calib_size=256,
                   out=tmp_path / "run", measure_latency=False)
    base = sum(p.numel() for p in model.parameters())
    assert res.metrics["after"]["params"] <= 0.125 * base
    assert res.metrics["after"]["params"] >= 0.11 * base  # the bisection uses the budget, not far below it
    loaded, plan = load_model(tmp_path / "run")
    x = torch.randn(8, 3, 32, 32)
    assert torch.equal(loaded(x), res.model.eval()(x))
    assert res.metrics["before"]["accuracy"] > 0.85
    assert "accuracy right after surgery" in (tmp_path / "run" / "report.md").read_text()
