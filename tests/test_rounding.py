"""Width rounding: multiples of N, never past the original, coupled layers equal, extras by the method's ranking."""

from __future__ import annotations

import pytest
import torch

from netslim.cost.size import plan_size
from netslim.cost.targets import Target
from netslim.methods import Context, get_method
from netslim.methods.common.ranking import plan_from_widths, round_width, top_k
from netslim.zoo import build

torch.set_num_threads(1)


def test_round_width_up_nearest_and_capped() -> None:
    assert round_width(9, 64, 8) == 16  # up: never fewer filters than asked for
    assert round_width(9, 64, 8, nearest=True) == 8
    assert round_width(12, 64, 8, nearest=True) == 16  # halves go up
    assert round_width(3, 64, 8, nearest=True) == 8  # at least one multiple
    assert round_width(61, 64, 8) == 64
    assert round_width(11, 12, 8) == 12  # never past the original width
    assert round_width(5, 4, 8) == 4
    assert round_width(13, 64, 1) == 13
    for width in (10, 16, 24, 64, 100):
        for k in range(1, width + 1):
            for nearest in (False, True):
                r = round_width(k, width, 8, nearest)
                assert r <= width and (r % 8 == 0 or r == width)
                if not nearest:
                    assert r >= k


@pytest.fixture(scope="module")
def resnet_ctx() -> Context:
    model = build("resnet20", 10).eval()
    return Context(model=model, arch="resnet20", num_classes=10, input_size=(3, 32, 32), options={"round_to": 8})


def scores_for(ctx: Context) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {grp.root: torch.rand(grp.width, generator=g) for grp in ctx.groups()}


def test_rounded_plan_is_coupled_capped_and_extends_the_ranking(resnet_ctx: Context) -> None:
    ctx = resnet_ctx
    scores = scores_for(ctx)
    asked = {g.root: max(1, (g.width * 5) // 16 + 1) for g in ctx.groups()}  # odd widths: 6, 11, 21
    plan = plan_from_widths(ctx, "test", scores, asked)
    for g in ctx.groups():
        kept = [plan.keep.get(n, list(range(g.width))) for n in g.layers]
        assert all(k == kept[0] for k in kept), f"coupled layers of {g.root} differ"
        k = len(kept[0])
        assert k <= g.width and (k % 8 == 0 or k == g.width) and k >= asked[g.root]
        # the extra filters are the next best by the method's own scores: exactly the top-k
        assert kept[0] == top_k(scores[g.root], k)
        assert set(top_k(scores[g.root], asked[g.root])) <= set(kept[0])


def test_rounding_applies_on_the_real_network(resnet_ctx: Context) -> None:
    from netslim.surgery.apply import apply_plan

    ctx = resnet_ctx
    plan = plan_from_widths(ctx, "test", scores_for(ctx), {g.root: 5 for g in ctx.groups()})
    small = apply_plan(build("resnet20", 10).eval(), plan)
    widths = [m.out_channels for m in small.modules() if isinstance(m, torch.nn.Conv2d)]
    assert widths and all(w == 8 for w in widths)


def test_budget_with_rounding_still_meets_the_target() -> None:
    model = build("resnet20", 10).eval()
    ctx = Context(model=model, arch="resnet20", num_classes=10, input_size=(3, 32, 32),
                  target=Target("flops", 0.5), options={"round_to": 8})
    plan = get_method("tp-l1").fn(ctx).plan
    got = plan_size(plan, ctx.template())["flops"] / plan_size(ctx.base_plan("x"), ctx.template())["flops"]
    assert got <= 0.5
    assert got > 0.2  # rounding to the nearest keeps the budget in use
    assert all(w % 8 == 0 for w in plan.widths().values())
