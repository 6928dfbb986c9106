"""lrs on a ViT's attention: an opened attention computes what nn.MultiheadAttention does, with in_proj and
out_proj as Linear modules, so lrs factorizes them like the MLP's layers; surgery opens the attentions a Plan
factorizes, the Plan is sized exactly and the network reloads from its file."""

from __future__ import annotations

import copy

import pytest
import tiny_vit
import torch
from tiny_vit import LAYERS, SIDE, att
from torch import nn

from netslim.cost.size import plan_size, stored_params
from netslim.cost.sizemodel import fast_plan_size
from netslim.cost.targets import Target
from netslim.data import ImageSet, batches
from netslim.errors import NetslimError
from netslim.plan import Plan
from netslim.surgery.apply import apply_plan
from netslim.surgery.attention import OpenAttention
from netslim.surgery.checkpoint import load_model, save_model
from netslim.surgery.factorized import LowRankSparseLinear
from netslim.surgery.heads import CutAttention
from netslim.zoo import build

pytestmark = pytest.mark.usefixtures("one_thread")

ARCH = "tiny_vit:small_vit"  # the tests' own factory (Plans name it; sized from a template)


def images(n: int, side: int = SIDE) -> ImageSet:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, side, side), generator=g, dtype=torch.uint8)
    return ImageSet(x, torch.arange(n) % 10, [str(i) for i in range(10)], (0.5,) * 3, (0.25,) * 3)


def _mha(batch_first: bool, bias: bool = True) -> nn.MultiheadAttention:
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(24, 4, bias=bias, batch_first=batch_first).eval()
    with torch.no_grad():
        for p in mha.parameters():
            p.normal_(0, 0.3)  # biases are zero at init; make every part count
    return mha


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_open_attention_equals_multihead_attention(batch_first: bool, bias: bool) -> None:
    mha = _mha(batch_first, bias)
    opened = OpenAttention.of(mha)
    assert isinstance(opened.in_proj, nn.Linear) and opened.in_proj.weight.shape == (72, 24)
    x, k, v = torch.randn(5, 7, 24), torch.randn(5, 9, 24), torch.randn(5, 9, 24)  # batch, tokens, embed
    if not batch_first:
        x, k, v = x.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    with torch.no_grad():
        for args in ((x, x, x), (x, k, v), (x[0], x[0], x[0])):  # self-attention, cross-attention, unbatched
            for need in (False, True):
                want, want_w = mha(*args, need_weights=need)
                got, got_w = opened(*args, need_weights=need)
                assert got.shape == want.shape
                assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
                assert (got_w is None) == (want_w is None)
                if need:
                    assert torch.allclose(got_w, want_w, atol=1e-6)
        mha.train(), opened.train()  # dropout 0: training mode computes the same
        assert torch.allclose(opened(x, x, x, need_weights=False)[0], mha(x, x, x, need_weights=False)[0],
                              atol=1e-5, rtol=1e-5)
    with pytest.raises(NetslimError, match="no masks"):
        opened(x, x, x, attn_mask=torch.zeros(7, 7))


def test_open_cut_attention_equals_it_and_in_proj_is_called_once() -> None:
    cut = CutAttention.of(_mha(True), [0, 3])
    opened = OpenAttention.of(cut)
    seen = []
    opened.in_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    x = torch.randn(2, 6, 24)
    with torch.no_grad():
        assert torch.allclose(opened(x, x, x)[0], cut(x, x, x)[0], atol=1e-6)
    assert seen == [(2, 6, 24)]  # self-attention: one call, so hooks see each token once


def test_plan_opens_factorized_attention_after_its_head_cut_and_sizes_exactly() -> None:
    model = tiny_vit.small_vit()
    plan = Plan(ARCH, 10, (3, SIDE, SIDE), heads={att(0): [1, 2]},
                factorize={f"{att(0)}.in_proj": {"rank": 4, "nnz": 30, "kind": "linear"},
                           f"{att(1)}.out_proj": {"rank": 3, "nnz": 0, "kind": "linear"}})
    out = apply_plan(copy.deepcopy(model), plan)
    a0, a1 = out.get_submodule(att(0)), out.get_submodule(att(1))
    assert isinstance(a0, OpenAttention) and a0.num_heads == 2 and isinstance(a0.in_proj, LowRankSparseLinear)
    assert a0.in_proj.out_dim == 3 * 2 * tiny_vit.HEAD_DIM and isinstance(a0.out_proj, nn.Linear)
    assert isinstance(a1, OpenAttention) and isinstance(a1.out_proj, LowRankSparseLinear)
    template = copy.deepcopy(model).to("meta")
    assert plan_size(plan, template)["params"] == fast_plan_size(plan, template)["params"] == stored_params(out)
    x = torch.randn(2, 3, SIDE, SIDE)
    with torch.no_grad():
        assert out(x).shape == (2, 10)
    bad = Plan(ARCH, 10, (3, SIDE, SIDE), factorize={f"{att(0)}.q_proj": {"rank": 1, "kind": "linear"}})
    with pytest.raises(NetslimError, match="unknown layer"):
        apply_plan(copy.deepcopy(model), bad)


def _lrs(model: nn.Module, arch: str, data: ImageSet, options: dict, target: Target | None = None):
    from netslim.workflows.stages import analyse

    return analyse(model, arch, data, "lrs", target, options, "cpu", calib_size=len(data.labels))


def test_lrs_factorizes_attention_projections_and_reloads(tmp_path) -> None:
    """vit_tiny (6 blocks, width 128): at half the parameters every attention's in_proj and out_proj is factorized."""
    torch.manual_seed(0)
    model = build("vit_tiny", num_classes=10).eval()
    nn.init.normal_(model.heads.head.weight, std=0.1)  # torchvision zeroes it: every output would be 0
    result, ctx, _ = _lrs(model, "vit_tiny", images(200, 32), {"images": 128}, Target("params", 0.5))
    plan, small = result.plan, result.model
    for i in range(6):
        assert {f"{att(i)}.in_proj", f"{att(i)}.out_proj"} <= set(plan.factorize)
        a = small.get_submodule(att(i))
        assert isinstance(a, OpenAttention)
        assert isinstance(a.in_proj, LowRankSparseLinear) and isinstance(a.out_proj, LowRankSparseLinear)
        assert (a.in_proj.out_dim, a.in_proj.in_dim) == (3 * 128, 128)
    assert isinstance(model.get_submodule(att(0)), nn.MultiheadAttention)  # the base is left as it was
    size = plan_size(plan, ctx.template())["params"]
    assert stored_params(small) == size == fast_plan_size(plan, ctx.template())["params"] == plan_size(plan)["params"]
    assert size <= 0.5 * stored_params(model)
    replayed = apply_plan(copy.deepcopy(model), plan)
    shapes = {k: tuple(v.shape) for k, v in small.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in replayed.state_dict().items()}
    x = next(iter(batches(images(8, 32), 8)))[0]
    with torch.no_grad():
        base, mine, svd = model(x), small.eval()(x), replayed.eval()(x)
        assert (mine - base).norm() < (svd - base).norm()  # fitted to the feature maps: closer than truncated SVD
        save_model(tmp_path / "model.safetensors", small, plan)
        again, plan2 = load_model(tmp_path / "model.safetensors")
        assert plan2.factorize == plan.factorize
        assert torch.equal(again(x), mine)


def test_lrs_compressed_inputs_chain_through_opened_attention() -> None:
    model = tiny_vit.small_vit()
    opts = {"rank_ratio": 0.25, "sparsity": 0.9, "images": 64, "inputs": "compressed"}
    result = _lrs(model, ARCH, images(100), opts)[0]
    rows = {r["layer"]: r for r in result.plan.meta["layers"]}
    assert "feature_error_chained" in rows[f"{att(0)}.out_proj"]
    assert f"{att(LAYERS - 1)}.in_proj" in result.plan.factorize
