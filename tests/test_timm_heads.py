"""Whole heads of timm's own attention (one `qkv` Linear, `proj`, `num_heads`), as DeiT and timm's ViT build it:
every method picks heads of it, the cut slices q, k and v alike and keeps timm's class and keys, the cut network
is sized exactly, reloads from its file and exports to ONNX with the same outputs, a copied head is merged back
by the refit, and an attention with more than its projections (a gate) is refused with one error."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_vit import outputs_of, rel, reloads_and_exports
from torch import nn

from netslim.cost.size import meta_template, stored_params
from netslim.cost.sizemodel import fast_plan_size
from netslim.data import ImageSet
from netslim.errors import NetslimError
from netslim.methods import Context, MethodResult, get_method
from netslim.methods.common.heads import head_order
from netslim.plan import Plan
from netslim.probe import head_stats
from netslim.repair import lsq_refit
from netslim.surgery.apply import apply_plan

timm = pytest.importorskip("timm")
torch.set_num_threads(1)

SIDE, D, HEADS, HEAD_DIM, LAYERS = 16, 32, 4, 8, 2
ARCH = "timm:vit_tiny_patch16_224"  # 3 heads of 64, 12 blocks: the zoo rebuilds it for reloading


def att(i: int) -> str:
    return f"blocks.{i}.attn"


def small(seed: int = 0, **kw: object) -> nn.Module:
    """A 2-block timm ViT on 16 px (17 tokens of 32 channels, 4 heads of 8), its classifier re-drawn."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(img_size=SIDE, patch_size=4, embed_dim=D, depth=LAYERS, num_heads=HEADS, mlp_ratio=2,
                              num_classes=10, qkv_bias=True, **kw).eval()
    nn.init.normal_(model.head.weight, std=0.1)
    return model


def images(n: int = 48, seed: int = 0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, SIDE, SIDE), generator=g, dtype=torch.uint8)
    return ImageSet(x, torch.arange(n) % 10, [str(i) for i in range(10)], (0.5,) * 3, (0.25,) * 3)


def run(model: nn.Module, method: str, **options: object) -> MethodResult:
    data = images()
    ctx = Context(model=model, arch="timm_small", num_classes=10, input_size=(3, SIDE, SIDE), calib=data,
                  train=data, options=dict(options))
    return get_method(method).fn(ctx)


def copy_head(attn: nn.Module, src: int, dst: int) -> None:
    """Head `dst` made an exact copy of head `src`: the same rows of q, k and v (weights and biases)."""
    inner = attn.num_heads * attn.head_dim
    with torch.no_grad():
        for part in range(3):
            a, b = part * inner + src * attn.head_dim, part * inner + dst * attn.head_dim
            attn.qkv.weight[b:b + attn.head_dim] = attn.qkv.weight[a:a + attn.head_dim]
            attn.qkv.bias[b:b + attn.head_dim] = attn.qkv.bias[a:a + attn.head_dim]


@pytest.mark.parametrize("method", ["tp-l1", "tp-taylor"])
def test_peers_halve_the_heads_of_timm_attention_and_the_cut_is_sized_exactly(method: str) -> None:
    model = small()
    plan = run(model, method, ratio=0.5).plan
    assert set(plan.heads) == {att(0), att(1)} and all(len(k) == HEADS // 2 for k in plan.heads.values())
    cut = apply_plan(copy.deepcopy(model), plan)
    for i in range(LAYERS):
        a = cut.get_submodule(att(i))
        assert type(a).__name__ == "Attention" and a.num_heads == HEADS // 2 and a.attn_dim == HEADS // 2 * HEAD_DIM
        # rows: q, k, v of the kept heads; columns: the residual width, halved as a channel group of its own
        inner = HEADS // 2 * HEAD_DIM
        assert a.qkv.weight.shape == (3 * inner, D // 2) and a.proj.weight.shape == (D // 2, inner)
    assert stored_params(cut) == fast_plan_size(plan, meta_template(model))["params"] < stored_params(model)
    assert cut(torch.randn(2, 3, SIDE, SIDE)).shape == (2, 10)


def test_l1_drops_the_head_whose_weights_are_zero() -> None:
    model = small()
    a = model.get_submodule(att(1))
    inner = HEADS * HEAD_DIM
    with torch.no_grad():
        for part in range(3):
            a.qkv.weight[part * inner + 2 * HEAD_DIM:part * inner + 3 * HEAD_DIM] = 0
            a.qkv.bias[part * inner + 2 * HEAD_DIM:part * inner + 3 * HEAD_DIM] = 0
        a.proj.weight[:, 2 * HEAD_DIM:3 * HEAD_DIM] = 0
    plan = run(model, "tp-l1", ratio=0.75).plan
    assert 2 not in plan.heads[att(1)] and len(plan.heads[att(1)]) == 3


@pytest.mark.parametrize("method", ["pfa-kl", "pca", "car"])
def test_every_method_reads_and_cuts_timm_heads(method: str) -> None:
    """Head 3 of block 0 a copy of head 1, and block 1's head 2 reads as zero (its proj columns zeroed): each
    method sees the heads (the probe's recomputation reproduces timm's output, or it would refuse) and its Plan
    applies; the spectral methods and CAR drop a redundant head of block 0."""
    model = small()
    copy_head(model.get_submodule(att(0)), 1, 3)
    with torch.no_grad():
        model.get_submodule(att(1)).proj.weight[:, 2 * HEAD_DIM:3 * HEAD_DIM] = 0
    options: dict[str, object] = {"reduce": "spatial"} if method.startswith("pfa") else {}
    if method == "car":
        options = {"eval_size": 32, "keep_fraction": 0.75, "per_step": 100}
    plan = run(model, method, **options).plan
    assert att(0) in plan.heads and len(plan.heads[att(0)]) < HEADS
    assert not {1, 3} <= set(range(HEADS)) - set(plan.heads[att(0)])  # never both copies
    for name, kept in plan.heads.items():
        assert name in {att(0), att(1)} and 0 < len(kept) <= HEADS
    cut = apply_plan(copy.deepcopy(model), plan)
    assert stored_params(cut) == fast_plan_size(plan, meta_template(model))["params"]
    assert cut(torch.randn(2, 3, SIDE, SIDE)).shape == (2, 10)


def test_lda_traces_timm_heads_and_its_cuts_compose_in_place() -> None:
    """Block 1's head 2 reads as zero (its proj columns zeroed): its traced utility is exactly 0 and every other
    head's positive, so the η rule drops it first; two LDA steps cut a timm attention in place twice and equal
    the composed Plan applied once."""
    from netslim.methods.lda.heads import Cuts, apply_step
    from netslim.methods.lda.loop import validation_pass
    from netslim.methods.lda.options import LoopOptions
    from netslim.methods.lda.step import analyse_model, plan_at

    model = small()
    with torch.no_grad():
        model.get_submodule(att(1)).proj.weight[:, 2 * HEAD_DIM:3 * HEAD_DIM] = 0
    data = images(60)
    ctx = Context(model=model, arch="timm_small", num_classes=10, input_size=(3, SIDE, SIDE), calib=data,
                  train=data, val=data, options={"ft_epochs": 0, "verbose": False})
    o = LoopOptions(trace_images=5, verbose=False, threshold_origin="zero")
    a = analyse_model(ctx, o, validation_pass(model, data, ctx.classifier, "cpu", 64)[1], [att(0), att(1)])
    u = a.heads[att(1)]
    assert u.shape == (HEADS,) and float(u[2]) == 0.0 and bool((u[torch.arange(HEADS) != 2] > 0).all())
    assert plan_at(ctx, a, 1e-6, o).heads == {att(1): [0, 1, 3]}
    first = Plan("timm_small", 10, (3, SIDE, SIDE), heads={att(0): [0, 2, 3]})
    second = Plan("timm_small", 10, (3, SIDE, SIDE), heads={att(0): [1, 2], att(1): [0]})
    twice = apply_step(apply_step(copy.deepcopy(model), first), second)
    composed = Cuts({}, {att(0): HEADS, att(1): HEADS}).then(first).then(second).plan(ctx)
    assert composed.heads == {att(0): [2, 3], att(1): [0]}
    once = apply_plan(copy.deepcopy(model), composed)
    x = torch.randn(3, 3, SIDE, SIDE)
    with torch.no_grad():
        torch.testing.assert_close(twice(x), once(x), rtol=1e-5, atol=1e-6)


def test_pfa_order_drops_a_copied_head_first_and_the_refit_merges_it_back() -> None:
    """Head 3 an exact copy of head 1: PFA's head order removes one of the two first; cut with its proj columns
    simply dropped, the least-squares refit of proj (an ordinary Linear whose inputs were cut) finds the merge,
    so the block's output is the uncut one again."""
    model = small()
    attn = model.get_submodule(att(1))
    copy_head(attn, 1, 3)
    calib = [images(48, 1).images[i:i + 16].float().sub(128).div(64) for i in range(0, 48, 16)]
    held = [images(32, 2).images[i:i + 16].float().sub(128).div(64) for i in range(0, 32, 16)]
    labelled = lambda xs: [(x, torch.zeros(len(x), dtype=torch.long)) for x in xs]  # noqa: E731
    stats = head_stats(model, labelled(calib), [att(1)], "spatial")[att(1)]
    assert head_order(stats, HEADS)[0] in (1, 3)
    plan = Plan("timm_small", 10, (3, SIDE, SIDE), heads={att(1): [0, 1, 2]})
    cut = apply_plan(copy.deepcopy(model), plan)
    block = "blocks.1.attn"
    expected = outputs_of(model, block, labelled(held))
    assert rel(outputs_of(cut, block, labelled(held)), expected) > 1e-2  # the plain cut changes the attention's output
    report = lsq_refit(model, cut, lambda: labelled(calib), holdout=lambda: labelled(held), plan=plan, ridge=0.0)
    assert f"{att(1)}.proj" in report.refitted
    assert rel(outputs_of(cut, block, labelled(held)), expected) < 1e-4
    w, full = cut.get_submodule(att(1)).proj.weight.detach(), attn.proj.weight.detach()
    d = HEAD_DIM
    merged = torch.cat([full[:, :d], full[:, d:2 * d] + full[:, 3 * d:], full[:, 2 * d:3 * d]], 1)
    torch.testing.assert_close(w, merged, rtol=0, atol=1e-3 * float(merged.abs().max()))


def test_a_timm_vit_with_cut_heads_reloads_and_exports_with_the_same_outputs(tmp_path) -> None:
    from netslim.zoo import build

    torch.manual_seed(0)
    model = build(ARCH, num_classes=10, image_size=(32, 32)).eval()
    plan = Plan(ARCH, 10, (3, 32, 32), heads={"blocks.0.attn": [0, 2], "blocks.5.attn": [1]})
    cut = apply_plan(copy.deepcopy(model), plan).eval()
    assert cut.get_submodule("blocks.5.attn").num_heads == 1
    per_head = 64 * (3 * 193 + 192)  # its q, k, v rows (192 inputs and a bias each) and its 64 columns of proj
    assert stored_params(cut) == fast_plan_size(plan, meta_template(model))["params"] == \
        stored_params(model) - 3 * per_head
    reloads_and_exports(cut, plan, torch.randn(3, 3, 32, 32), tmp_path)


def test_a_gated_timm_attention_or_a_bad_head_index_is_one_error_and_nothing_cut() -> None:
    model = small()
    with pytest.raises(NetslimError, match="out of|in 0..3"):
        apply_plan(copy.deepcopy(model), Plan("timm_small", 10, (3, SIDE, SIDE), heads={att(0): [0, 4]}))
    from timm.layers import Attention

    gated = Attention(D, num_heads=HEADS, gated=True)
    model.blocks[0].attn = gated
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(NetslimError, match="cannot cut the heads of 'blocks.0.attn'"):
        apply_plan(model, Plan("timm_small", 10, (3, SIDE, SIDE), heads={att(0): [0, 1]}))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    plan = run(model, "tp-l1", ratio=0.5).plan
    assert att(0) not in plan.heads and att(1) in plan.heads  # the gated one is left whole by the methods
