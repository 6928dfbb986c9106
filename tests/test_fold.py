"""BatchNorm folding: outputs unchanged (< 1e-5 relative), every conv→BN pair found, unsafe pairs left alone."""

from __future__ import annotations

import pytest
import torch
from conftest import shared_path
from torch import nn

from netslim.surgery.fold import count_batchnorms, fold_batchnorm, foldable_pairs
from netslim.zoo import build

torch.set_num_threads(1)


def randomise_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    """Non-trivial statistics and affine parameters, so a wrong fold cannot pass by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.5, generator=g)
                m.running_var.uniform_(0.3, 3.0, generator=g)
                m.weight.uniform_(0.3, 1.7, generator=g)
                m.bias.normal_(0, 0.3, generator=g)
    return model.eval()


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("arch", ["vgg11_bn", "resnet20", "mobilenetv2"])
def test_fold_keeps_outputs_and_removes_every_batchnorm(arch: str) -> None:
    model = randomise_bn(build(arch, 10))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    folded = fold_batchnorm(model, input_size=(3, 32, 32))
    with torch.no_grad():
        assert rel_diff(folded(x), model(x)) < 1e-5
    assert count_batchnorms(model) > 0 and count_batchnorms(folded) == 0
    assert folded is not model and count_batchnorms(model) > 0  # the input is untouched


def test_resnet_pairs_are_found_by_tracing() -> None:
    model = build("resnet20", 10).eval()
    pairs = dict(foldable_pairs(model, torch.zeros(1, 3, 32, 32)))
    assert pairs["conv1"] == "bn1"
    assert pairs["layer1.0.conv2"] == "layer1.0.bn2"
    assert pairs["layer2.0.downsample.0"] == "layer2.0.downsample.1"
    assert len(pairs) == 1 + 3 * 3 * 2 + 2  # stem, two per block, two downsample shortcuts


def test_conv_bias_and_linear_batchnorm1d_fold() -> None:
    model = randomise_bn(nn.Sequential(nn.Conv2d(3, 8, 3, bias=True), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                                       nn.Linear(8 * 6 * 6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4)))
    x = torch.randn(5, 3, 8, 8)
    folded = fold_batchnorm(model, x)
    assert count_batchnorms(folded) == 0
    with torch.no_grad():
        assert rel_diff(folded(x), model(x)) < 1e-5


class SharedOutput(nn.Module):
    """The conv's raw output is used twice: folding its BN would change the skip path."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        z = self.bn(y) + y
        return self.head(z.mean((2, 3)))


def test_a_layer_output_used_elsewhere_is_not_folded() -> None:
    model = randomise_bn(SharedOutput())
    x = torch.randn(3, 4, 6, 6)
    folded = fold_batchnorm(model, x)
    with torch.no_grad():
        assert rel_diff(folded(x), model(x)) < 1e-5
    assert count_batchnorms(folded) == 1


def test_batchnorm_without_running_statistics_is_left() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 2)).eval()
    assert foldable_pairs(model, torch.zeros(1, 3, 8, 8)) == []
    assert count_batchnorms(fold_batchnorm(model, torch.randn(2, 3, 8, 8))) == 1


def test_fold_on_the_shared_resnet56_with_real_images() -> None:
    from netslim.data import batches, calibration_subset, load_dataset
    from netslim.workflows.api import load_trained

    model, _, _ = load_trained(shared_path("models/resnet56_cifar10.safetensors"), "resnet56", 10, 3)
    test = calibration_subset(load_dataset(str(shared_path("data/cifar10-jpeg.tar.gz")), "test"), 256)
    x = next(iter(batches(test, 256)))[0]
    folded = fold_batchnorm(model, x[:8])
    with torch.no_grad():
        ref, got = model(x), folded(x)
    assert rel_diff(got, ref) < 1e-5
    assert bool((got.argmax(1) == ref.argmax(1)).all())
    assert count_batchnorms(folded) == 0
