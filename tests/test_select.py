"""ThiNet channel selection: the greedy on the consumers' error, and its re-choice of a Plan's kept channels."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from netslim.plan import Plan
from netslim.repair import thinet_select
from netslim.repair.select import greedy_keep
from netslim.surgery.apply import apply_plan

pytestmark = pytest.mark.usefixtures("one_thread")


def test_greedy_removes_the_weakest_channel_then_its_cancelling_partner() -> None:
    """Channels 3 and 4 cancel (z4 = −z3): removing both costs nothing, so after the first removal (the
    weakest channel, 3 or 4) its partner follows, although alone it costs more than channel 0."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(200, 6, generator=gen, dtype=torch.float64) * torch.tensor([1.5, 3, 3, 1, 1, 3])
    z[:, 4] = -z[:, 3]
    keep = greedy_keep(z.T @ z, 4)
    assert keep == [0, 1, 2, 5]


def _net() -> nn.Sequential:
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 10))
    with torch.no_grad():
        net[0].weight[2].zero_()  # channel 2 is dead after BN (beta 0) and ReLU: it feeds conv2 nothing
        net[0].bias[2] = 0.0
        net[1].running_var.fill_(1.0)
        net[1].weight[5] *= 0.05  # channel 5 is weak
    return net.eval()


def _error(net: nn.Module, cut: nn.Module, data: list) -> float:
    """Relative error of conv2's output (its kept channels: all of them here), cut against original."""
    with torch.no_grad():
        num = den = 0.0
        for x, _ in data:
            a, b = net[:4](x), cut[:4](x)
            num, den = num + float((a - b).pow(2).sum()), den + float(a.pow(2).sum())
    return (num / den) ** 0.5


def test_thinet_keeps_the_widths_and_drops_dead_and_weak_channels() -> None:
    net = _net()
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 3, 12, 12, generator=gen), torch.zeros(16, dtype=torch.long)) for _ in range(4)]
    plan = Plan("seq", 10, (3, 12, 12), keep={"0": [0, 1, 2, 5]})  # a method's poor choice
    chosen = copy.deepcopy(plan)
    rep = thinet_select(net, chosen, lambda: data, positions=None)
    assert rep["groups"] == 1 and rep["skipped"] == {} and chosen.meta["selection"] == "thinet"
    assert len(chosen.keep["0"]) == 4 and not {2, 5} & set(chosen.keep["0"])
    assert rep["channels_changed"] >= 2
    before = _error(net, apply_plan(copy.deepcopy(net), plan), data)
    after = _error(net, apply_plan(copy.deepcopy(net), chosen), data)
    assert after < 0.9 * before


def test_a_group_the_plan_does_not_cut_is_left_alone() -> None:
    net = _net()
    data = [(torch.randn(8, 3, 12, 12), torch.zeros(8, dtype=torch.long))]
    plan = Plan("seq", 10, (3, 12, 12), keep={"3": [0, 2, 4]})
    rep = thinet_select(net, plan, lambda: data)
    assert rep["groups"] == 1 and "0" not in plan.keep and len(plan.keep["3"]) == 3
