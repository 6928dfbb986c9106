"""PFA: widths from spectra (known rank, flat and rank-1 spectra), selection by correlation, budget bisection."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from netslim.cost.size import plan_size
from netslim.cost.targets import Target
from netslim.data import ImageSet
from netslim.methods import Context, get_method
from netslim.methods.common.selection import elimination_order, select_filters
from netslim.methods.common.spectral import eigenvalues, energy_width, kl_divergence, kl_width
from netslim.zoo import build

torch.set_num_threads(1)


def images(n: int, channels: int, size: int = 8, seed: int = 0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (n,), generator=g)
    return ImageSet(x, y, [str(i) for i in range(10)], (0.5,) * channels, (0.25,) * channels)


def mixing_net(sources: int, channels: int) -> nn.Module:
    """r independent sources mixed into C channels: every response has rank r exactly."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(sources, channels, 1, bias=False), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(channels, 10)).eval()


def context(model: nn.Module, data: ImageSet, **options) -> Context:
    return Context(model=model, arch="custom", num_classes=10, input_size=tuple(data.images.shape[1:]),
                   calib=data, options=options)


def test_energy_keeps_the_rank_of_mixed_sources() -> None:
    ctx = context(mixing_net(5, 24), images(400, 5), energy=0.999999, reduce="mean")
    plan = get_method("pfa-en").fn(ctx).plan
    assert plan.widths() == {"0": 5}


def test_kl_flat_spectrum_keeps_all_and_rank_one_keeps_one() -> None:
    assert kl_width(torch.ones(64)) == 64
    assert kl_divergence(torch.ones(64)) == pytest.approx(0.0)
    one = torch.zeros(64)
    one[0] = 3.0
    assert kl_divergence(one) == pytest.approx(math.log(64))
    assert kl_width(one) == 1
    ctx = context(mixing_net(1, 16), images(300, 1), reduce="mean")
    assert get_method("pfa-kl").fn(ctx).plan.widths() == {"0": 1}


def test_energy_width_counts_eigenvalues() -> None:
    eigs = eigenvalues(torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)))
    assert eigs.tolist() == [4.0, 3.0, 2.0, 1.0]
    assert energy_width(eigs, 0.7) == 2  # 7/10 reached with two
    assert energy_width(eigs, 0.71) == 3
    assert energy_width(eigs, 1.0) == 4


def test_duplicate_filter_is_dropped_before_any_other() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 12, generator=g, dtype=torch.float64)
    x[:, 7] = 2.0 * x[:, 3] + 1.0  # filter 7 duplicates filter 3
    corr = torch.corrcoef(x.T)
    order = elimination_order(corr, torch.zeros(12, dtype=torch.bool))
    assert order[0] in (3, 7)
    assert sorted(order) == list(range(12))
    keep = select_filters(corr, torch.zeros(12, dtype=torch.bool), 11)
    assert len(keep) == 11 and len({3, 7} & set(keep)) == 1


def test_inactive_filters_go_first() -> None:
    corr = torch.eye(6, dtype=torch.float64)
    dead = torch.tensor([False, False, True, False, True, False])
    assert elimination_order(corr, dead)[:2] == [2, 4]


def test_abs_max_selection_also_drops_the_duplicate() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, 8, generator=g, dtype=torch.float64)
    x[:, 5] = -x[:, 1]
    order = elimination_order(torch.corrcoef(x.T), torch.zeros(8, dtype=torch.bool), "abs-max")
    assert order[0] in (1, 5)


def test_budget_bisection_meets_params_within_one_filter() -> None:
    model = build("resnet20", num_classes=10).eval()
    ctx = context(model, images(300, 3, size=32), reduce="max")
    ctx.target = Target("params", 0.4)
    plan = get_method("pfa-en").fn(ctx).plan
    base = plan_size(ctx.base_plan("pfa-en"), ctx.template())["params"]
    got = plan_size(plan, ctx.template())["params"]
    one_filter = 64 * 9 * 2 + 64 * 9 + 2 + 10  # widest conv: its own kernel, the next layer's inputs, BN, fc
    assert got <= 0.4 * base
    assert 0.4 * base - got <= one_filter, (got, 0.4 * base)
    # coupled residual layers keep identical channels
    for names in (g.layers for g in ctx.groups() if len(g.layers) > 1):
        kept = [plan.keep.get(n) for n in names]
        assert all(k == kept[0] for k in kept)


def test_floor_keeps_a_fraction_of_every_layer() -> None:
    model, data = mixing_net(3, 32), images(400, 3)
    for fraction, want in ((0.0, 3), (0.25, 8), (0.5, 16)):
        plan = get_method("pfa-en").fn(context(model, data, energy=0.999999, reduce="mean", min_fraction=fraction)).plan
        assert len(plan.keep["0"]) == want
    # the default floor is 1/8 of the width; the paper's rule (no floor) is min_fraction=0
    assert len(get_method("pfa-en").fn(context(model, data, energy=0.999999, reduce="mean")).plan.keep["0"]) == 4
    with pytest.raises(Exception, match="min_fraction"):
        get_method("pfa-en").fn(context(model, data, min_fraction=2))
