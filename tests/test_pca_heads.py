"""PCA design counts whole attention heads of a ViT from the significant dimensions of the head outputs (every
token a sample): two heads copied onto the other two leave half the dimensions, so half the heads, and not two
copies of one head; the cut network is sized exactly; heads=false leaves attention whole."""

from __future__ import annotations

import copy

import torch
from test_peer_heads import images
from test_vit_head_select import copy_head
from tiny_vit import HEADS, SIDE, att, small_vit

from netslim.cost.size import meta_template, stored_params
from netslim.cost.sizemodel import fast_plan_size
from netslim.methods import Context, MethodResult, get_method
from netslim.surgery.apply import apply_plan

torch.set_num_threads(1)


def run(model: torch.nn.Module, **options: object) -> MethodResult:
    ctx = Context(model=model, arch="small_vit", num_classes=10, input_size=(3, SIDE, SIDE), calib=images(),
                  options={"depth_rule": "none", **options})
    return get_method("pca").fn(ctx)


def test_copied_heads_halve_the_heads_pca_keeps() -> None:
    model = small_vit()
    mha = model.get_submodule(att(0))
    copy_head(mha, 0, 2)
    copy_head(mha, 1, 3)
    result = run(model, variance=0.999)
    kept = result.plan.heads[att(0)]
    assert len(kept) == HEADS // 2 and sorted(h % 2 for h in kept) == [0, 1]  # one of each pair of copies
    assert att(1) not in result.plan.heads  # four distinct heads hold more than three heads' dimensions
    assert any("attention heads" in s for s in result.report)
    cut = apply_plan(copy.deepcopy(model), result.plan)
    assert stored_params(cut) == fast_plan_size(result.plan, meta_template(model))["params"]


def test_heads_false_keeps_attention_whole() -> None:
    model = small_vit()
    copy_head(model.get_submodule(att(0)), 0, 2)
    plan = run(model, variance=0.5, heads=False).plan
    assert plan.heads == {} and plan.keep
