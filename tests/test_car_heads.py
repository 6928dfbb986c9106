"""CAR cuts whole attention heads of a ViT: a head's ablation is its out_proj columns zeroed (also in the fused
eval path), a ViT's MLP units are masked on their token channels, a head that does nothing goes first and one
the network needs stays, a params budget is met with heads cut and sized exactly, and heads=false leaves
attention whole."""

from __future__ import annotations

import copy
import json

import pytest
import tiny_vit
import torch
from tiny_vit import HEADS, MLP, SIDE, att
from torch import nn
from typer.testing import CliRunner

from netslim.cost.size import meta_template, stored_params
from netslim.cost.sizemodel import fast_plan_size
from netslim.cost.targets import Target
from netslim.data import ImageSet, batches
from netslim.errors import NetslimError
from netslim.methods import Context, MethodResult, get_method
from netslim.methods.car import CAROptions
from netslim.methods.car.core import zero_channels
from netslim.methods.car.engine import AblationEngine
from netslim.methods.car.heads import HeadEngine, zero_heads
from netslim.methods.car.units import chosen_units, target_counts
from netslim.surgery.apply import apply_plan
from netslim.surgery.heads import CutAttention

torch.set_num_threads(1)




def small_vit(seed: int = 0) -> nn.Module:
    return tiny_vit.small_vit(seed, head_std=0.5)


def images(n: int, side: int = SIDE, model: nn.Module | None = None) -> ImageSet:
    """n random uint8 images; labelled by `model`'s own predictions when given (then it is 100% right)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, side, side), generator=g, dtype=torch.uint8)
    ds = ImageSet(x, torch.arange(n) % 10, [str(i) for i in range(10)], (0.5,) * 3, (0.25,) * 3)
    if model is not None:
        with torch.no_grad():
            ds.labels = torch.cat([model.eval()(xb).argmax(1) for xb, _ in batches(ds, 256)])
    return ds


def run(model: nn.Module, train: ImageSet, target: Target | None = None, **options: object) -> MethodResult:
    ctx = Context(model=model, arch="small_vit", num_classes=10, input_size=(3, SIDE, SIDE), train=train,
                  target=target, options=options)
    return get_method("car").fn(ctx)


def test_head_ablation_is_zeroing_its_out_proj_columns() -> None:
    model = small_vit()
    x, y = next(iter(batches(images(24), 24)))
    engine = HeadEngine(model, [att(0), att(1)], x, y, 10, batch_size=24, masks_per_pass=3)
    masks = torch.ones(3, 2 * HEADS)
    masks[1, 2] = 0  # head 2 of block 0
    masks[2, [HEADS + 0, HEADS + 3]] = 0  # heads 0 and 3 of block 1
    counts, loss = engine.evaluate(masks)
    for row, cut in ((1, {att(0): [2]}), (2, {att(1): [0, 3]})):
        baked = copy.deepcopy(model)
        for name, heads in cut.items():
            zero_heads(baked, name, heads)
        with torch.inference_mode():  # nn.MultiheadAttention's fused eval path: it reads out_proj's weight
            logits = baked(x)
        want = float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        assert float(loss[row]) == pytest.approx(want, rel=1e-4)
        assert counts[row].sum() == (logits.argmax(1) == y).sum()
        assert abs(float(loss[row]) - float(loss[0])) > 1e-3  # the ablation changes the network's output
    with torch.inference_mode():
        assert float(loss[0]) == pytest.approx(float(nn.functional.cross_entropy(model(x), y, reduction="sum")),
                                               rel=1e-4)


def test_vit_mlp_units_are_masked_on_the_token_channels() -> None:
    """A Linear on tokens has its channels last: the filter engine masks that dimension (as zero_channels cuts)."""
    model = small_vit()
    x, y = next(iter(batches(images(16), 16)))
    mlp = "encoder.layers.encoder_layer_0.mlp.0"
    engine = AblationEngine(model, [(mlp,)], x, y, 10, batch_size=16, masks_per_pass=2)
    mask = torch.ones(2, MLP)
    mask[1, [3, 10, 40]] = 0
    _, loss = engine.evaluate(mask)
    baked = copy.deepcopy(model)
    zero_channels(baked, (mlp,), [3, 10, 40], torch.zeros(1, 3, SIDE, SIDE))
    with torch.no_grad():
        want = float(nn.functional.cross_entropy(baked(x), y, reduction="sum"))
    assert float(loss[1]) == pytest.approx(want, rel=1e-4) and float(loss[1]) != pytest.approx(float(loss[0]))


def test_a_dead_head_goes_first_and_a_needed_head_stays() -> None:
    model = small_vit()
    mha = model.get_submodule(att(1))
    with torch.no_grad():
        mha.out_proj.weight[:, 1 * 8:2 * 8] = 0  # head 1 writes nothing: its ablation changes nothing
        mha.out_proj.weight[:, 3 * 8:4 * 8] *= 20  # head 3 dominates the block's output
    train = images(120, model=model)
    res = run(model, train, layers=att(1), eval_size=120, keep_fraction=0.5)
    (r,) = res.evidence["car_runs"]
    assert r.unit == "head" and r.width == HEADS and len(r.removed) == 2
    assert r.first_car[1] == 0 and 1 in r.removed
    assert r.first_car[3] == max(r.first_car) > 0 and 3 in r.kept
    assert res.plan.heads == {att(1): r.kept} and res.plan.keep == {}
    assert "A head is removed" in res.report[0]


def test_params_target_is_met_with_whole_heads_cut() -> None:
    model = small_vit()
    res = run(model, images(300), Target("params", 0.5), eval_size=48, per_step=16)
    plan = res.plan
    assert set(plan.heads) == {att(0), att(1)}
    cut = apply_plan(copy.deepcopy(model), plan)
    for name, kept in plan.heads.items():
        assert 1 <= len(kept) < HEADS and kept == sorted(set(kept))
        a = cut.get_submodule(name)
        assert isinstance(a, CutAttention) and a.num_heads == len(kept) and a.out_proj.in_features == 8 * len(kept)
    runs = {r.root: r for r in res.evidence["car_runs"]}
    assert [r.root for r in res.evidence["car_runs"]][:2] == [att(0), "encoder.layers.encoder_layer_0.mlp.0"]
    assert all(plan.heads[n] == runs[n].kept for n in plan.heads)
    base, got = stored_params(model), stored_params(cut)
    assert got == fast_plan_size(plan, meta_template(model))["params"]
    assert 0.4 * base < got <= 0.5 * base, (got, base)
    with torch.no_grad():
        assert cut(torch.randn(2, 3, SIDE, SIDE)).shape == (2, 10)


def test_vit_tiny_half_params_is_reachable_only_with_heads() -> None:
    from netslim.zoo import build

    model = build("vit_tiny", num_classes=10)
    for heads, reachable in ((True, True), (False, False)):
        ctx = Context(model=model, arch="vit_tiny", num_classes=10, input_size=(3, 32, 32),
                      target=Target("params", 0.5), opts=CAROptions(heads=heads))
        units = chosen_units(ctx)
        assert sum(u.heads for u in units) == (6 if heads else 0)
        if not reachable:
            with pytest.raises(NetslimError, match="unreachable.*heads are kept whole"):
                target_counts(ctx, units)
            continue
        counts = target_counts(ctx, units)
        assert all(1 <= counts[u.root] < u.width for u in units)


def test_heads_false_keeps_attention_whole() -> None:
    model = small_vit()
    plan = run(model, images(100), heads="false", eval_size=32, per_step=32).plan
    assert plan.heads == {} and "heads" not in plan.to_dict() and plan.keep
    from netslim.cli.commands import app

    res = CliRunner().invoke(app, ["methods", "car", "--json"])
    rows = {r["name"]: r for r in json.loads(res.stdout)["options"]}
    assert res.exit_code == 0 and rows["heads"]["type"] == "bool" and rows["heads"]["default"] is True
