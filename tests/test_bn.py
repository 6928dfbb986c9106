"""BatchNorm recalibration and variance restoration after surgery."""

from __future__ import annotations

import copy

import torch
from torch import nn

from netslim.train.bn import recalibrate_bn, restore_scale


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def _data(n: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 3, 8, 8, generator=g), torch.zeros(16, dtype=torch.long)) for _ in range(n // 16)]


def test_recalibration_averages_the_batch_statistics_exactly() -> None:
    net, data = _net(), _data()
    assert recalibrate_bn(net, data, max_images=64) == 64
    with torch.no_grad():
        pre = [net[0](x) for x, _ in data]
    assert torch.allclose(net[1].running_mean, torch.stack([p.mean((0, 2, 3)) for p in pre]).mean(0), atol=1e-5)
    assert torch.allclose(net[1].running_var, torch.stack([p.var((0, 2, 3)) for p in pre]).mean(0), rtol=1e-4)


def test_restore_scale_revives_a_layer_whose_variance_fell_below_eps() -> None:
    net, data = _net(), _data()
    recalibrate_bn(net, data, max_images=64)
    x = data[0][0]
    with torch.no_grad():
        want = net.eval()(x)
    faded = copy.deepcopy(net)
    with torch.no_grad():
        faded[3].weight.mul_(1e-3)  # pre-BN variance ~1e-6 x smaller: far below eps
        faded[3].bias.mul_(1e-3)
    plain = copy.deepcopy(faded)
    recalibrate_bn(plain, data, max_images=64)
    with torch.no_grad():
        assert (plain.eval()(x) - want).abs().max() > 0.1 * want.abs().max()  # eps swallowed the signal
    info = restore_scale(faded, lambda: data, max_images=64)
    assert info["layers"] == 2 and 900 < info["max_gain"] < 1100
    with torch.no_grad():
        assert torch.allclose(faded.eval()(x), want, rtol=1e-3, atol=1e-4)


def test_restore_scale_leaves_a_calibrated_network_as_it_is() -> None:
    net, data = _net(), _data()
    recalibrate_bn(net, data, max_images=64)
    x = data[0][0]
    with torch.no_grad():
        want = net.eval()(x)
    info = restore_scale(net, lambda: data, max_images=64)
    assert abs(info["max_gain"] - 1) < 1e-3 and abs(info["median_gain"] - 1) < 1e-3
    with torch.no_grad():
        assert torch.allclose(net(x), want, atol=1e-5)
