"""torch-pruning's criteria (the peers) cut whole heads of a ViT at the same ratio as channels: a head's score is
the criterion summed over its own weights, so a head whose weights are zero (L1) or whose output nothing reads
(Taylor) goes first; q, k and v lose the same heads, the cut network is sized exactly, a params budget below what
MLP widths alone reach is met, and heads=false leaves attention whole."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_vit import HEAD_DIM, HEADS, LAYERS, MLP, SIDE, D, att, small_vit
from torch import nn

from netslim.cost.size import meta_template, stored_params
from netslim.cost.sizemodel import fast_plan_size
from netslim.cost.targets import Target
from netslim.data import ImageSet
from netslim.errors import NetslimError
from netslim.methods import Context, MethodResult, get_method
from netslim.surgery.apply import apply_plan
from netslim.surgery.heads import CutAttention

torch.set_num_threads(1)






def images(n: int = 32) -> ImageSet:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, SIDE, SIDE), generator=g, dtype=torch.uint8)
    return ImageSet(x, torch.arange(n) % 10, [str(i) for i in range(10)], (0.5,) * 3, (0.25,) * 3)


def run(model: nn.Module, method: str, target: Target | None = None, **options: object) -> MethodResult:
    data = images()
    ctx = Context(model=model, arch="small_vit", num_classes=10, input_size=(3, SIDE, SIDE), calib=data,
                  train=data, target=target, options=dict(options))
    return get_method(method).fn(ctx)


def head_slices(mha: nn.MultiheadAttention, h: int) -> tuple[list[slice], slice]:
    e = mha.embed_dim
    return [slice(p * e + h * HEAD_DIM, p * e + (h + 1) * HEAD_DIM) for p in range(3)], \
        slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)


@pytest.mark.parametrize("method", ["tp-l1", "tp-random", "tp-taylor"])
def test_heads_follow_the_channel_ratio_and_the_cut_is_sized_exactly(method: str) -> None:
    model = small_vit()
    plan = run(model, method, ratio=0.5).plan
    assert set(plan.heads) == {att(0), att(1)}
    assert all(len(k) == HEADS // 2 for k in plan.heads.values())
    assert all(len(k) == MLP // 2 for k in plan.keep.values())
    cut = apply_plan(copy.deepcopy(model), plan)
    for i in range(LAYERS):
        a = cut.get_submodule(att(i))
        assert isinstance(a, CutAttention) and a.num_heads == HEADS // 2
        assert a.in_proj_weight.shape == (3 * HEADS // 2 * HEAD_DIM, D)  # q, k and v: the same heads
    assert stored_params(cut) == fast_plan_size(plan, meta_template(model))["params"]
    assert cut(torch.randn(2, 3, SIDE, SIDE)).shape == (2, 10)


def test_l1_cuts_the_head_with_the_smallest_weights_first() -> None:
    model = small_vit()
    mha = model.get_submodule(att(1))
    rows, cols = head_slices(mha, 2)
    with torch.no_grad():
        for r in rows:
            mha.in_proj_weight[r] *= 0.01
            mha.in_proj_bias[r] *= 0.01
        mha.out_proj.weight[:, cols] *= 0.01
    plan = run(model, "tp-l1", ratio=0.75).plan  # three of four heads stay: the shrunk one is the one that goes
    assert plan.heads[att(1)] == [0, 1, 3]


def test_taylor_cuts_a_head_nothing_reads_first() -> None:
    """out_proj's columns of head 0 zeroed: its q, k, v gradients and its columns' products are all zero."""
    model = small_vit(1)
    mha = model.get_submodule(att(0))
    with torch.no_grad():
        mha.out_proj.weight[:, head_slices(mha, 0)[1]] = 0
    plan = run(model, "tp-taylor", ratio=0.75, taylor_images=32).plan
    assert 0 not in plan.heads[att(0)] and len(plan.heads[att(0)]) == 3
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())  # gradients cleared after


def test_a_params_budget_below_the_mlp_floor_is_met_with_heads() -> None:
    model = small_vit()
    base = stored_params(model)
    with pytest.raises(NetslimError, match="unreachable"):  # MLP widths alone cannot get there
        run(model, "tp-l1", Target("params", 0.5), heads=False)
    plan = run(model, "tp-l1", Target("params", 0.5)).plan
    assert plan.heads
    assert stored_params(apply_plan(copy.deepcopy(model), plan)) <= 0.5 * base


def test_heads_false_keeps_attention_whole() -> None:
    plan = run(small_vit(), "tp-l1", ratio=0.5, heads=False).plan
    assert plan.heads == {} and plan.keep
