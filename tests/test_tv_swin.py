"""torchvision's Swin, built by netslim with a window attention that calls its Linear layers: the same function
as torchvision's (a torchvision checkpoint gives the same outputs), and a network torch-pruning can follow, so
its MLP widths are offered and cut to exactly the planned size; torchvision's own module stays refused. Its heads
are cut whole, with their column of the relative position bias: a copied head cut from a shifted-window attention
is merged back by the refit, every method reads a window attention's heads (a head whose output is zero goes
first where the rule sees it), and a tv:swin_t with cut heads reloads from its file and exports to ONNX."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from tiny_vit import outputs_of, rel, reloads_and_exports
from torch import nn
from torchvision.models import swin_t
from torchvision.models.swin_transformer import SwinTransformer

from netslim.cost.size import meta_template, stored_params
from netslim.cost.sizemodel import fast_plan_size
from netslim.data import ImageSet
from netslim.errors import NetslimError
from netslim.plan import Plan
from netslim.repair import lsq_refit
from netslim.surgery.apply import apply_plan
from netslim.surgery.graph import channel_groups
from netslim.surgery.trial import runnable_groups
from netslim.zoo import build
from netslim.zoo.swin import OpenWindowAttention, open_windows

pytestmark = pytest.mark.usefixtures("one_thread")
SHIFTED = "features.1.1.attn"  # small_swin's second block: shifted windows over 8×8 tokens, 2 heads of 12
LAST = "features.3.1.attn"  # its last: 4 heads of 12 over 4×4 tokens


def small_swin() -> nn.Module:
    """Two stages of two blocks (24 and 48 channels, windows of 4): shifted windows and a patch merging."""
    torch.manual_seed(0)
    return SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                           num_classes=10).eval()


def test_tv_swin_t_is_torchvisions_function_and_loads_its_checkpoint() -> None:
    torch.manual_seed(0)
    theirs = swin_t(num_classes=10).eval()
    ours = build("tv:swin_t", num_classes=10).eval()
    assert sum(isinstance(m, OpenWindowAttention) for m in ours.modules()) == 12
    ours.load_state_dict(theirs.state_dict(), strict=True)  # the same keys, parameters and buffers
    x = torch.randn(2, 3, 96, 96)  # 24×24 tokens: padded windows, shifted windows, then one window
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)


def test_opened_swin_offers_its_mlp_widths_and_is_cut_to_the_planned_size() -> None:
    model = small_swin()
    example = torch.zeros(1, 3, 32, 32)
    with pytest.raises(NetslimError, match="used without being called"):
        channel_groups(model, example, "head")
    reference = copy.deepcopy(model)
    assert open_windows(model) == 4
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    groups = runnable_groups(model, example, channel_groups(model, example, "head"), 10)
    roots = {g.root for g in groups}
    assert {"features.1.0.mlp.0", "features.1.1.mlp.0", "features.3.0.mlp.0", "features.3.1.mlp.0"} <= roots
    rng = random.Random(0)
    plan = Plan("small_swin", 10, (3, 32, 32))
    for g in groups:
        plan.keep.update(dict.fromkeys(g.layers, sorted(rng.sample(range(g.width), max(1, g.width // 2)))))
    cut = apply_plan(copy.deepcopy(model), plan).eval()
    assert stored_params(cut) == fast_plan_size(plan, meta_template(model))["params"] < stored_params(model)
    with torch.no_grad():
        assert cut(x).shape == (2, 10) and bool(torch.isfinite(cut(x)).all())


def copy_head(attn: nn.Module, src: int, dst: int) -> None:
    """Head `dst` of a window attention made an exact copy of head `src`: q, k, v rows and position bias column."""
    d, inner = attn.head_dim, attn.num_heads * attn.head_dim
    with torch.no_grad():
        for part in range(3):
            to, frm = slice(part * inner + dst * d, part * inner + (dst + 1) * d), \
                slice(part * inner + src * d, part * inner + (src + 1) * d)
            attn.qkv.weight[to] = attn.qkv.weight[frm]
            attn.qkv.bias[to] = attn.qkv.bias[frm]
        attn.relative_position_bias_table[:, dst] = attn.relative_position_bias_table[:, src]


def test_a_swin_head_cut_takes_its_bias_column_and_the_refit_merges_a_copied_head_back() -> None:
    model = small_swin()
    open_windows(model)
    attn = model.get_submodule(SHIFTED)
    copy_head(attn, 0, 1)
    plan = Plan("small_swin", 10, (3, 32, 32), heads={SHIFTED: [0]})
    cut = apply_plan(copy.deepcopy(model), plan).eval()
    kept = cut.get_submodule(SHIFTED)
    assert (kept.num_heads, kept.head_dim, kept.qkv.out_features, kept.proj.in_features) == (1, 12, 36, 12)
    torch.testing.assert_close(kept.relative_position_bias_table, attn.relative_position_bias_table[:, :1])
    per_head = 3 * 12 * (24 + 1) + 12 * 24 + 49  # q, k, v rows with their biases, proj columns, a bias column
    assert stored_params(cut) == fast_plan_size(plan, meta_template(model))["params"] == \
        stored_params(model) - per_head
    gen = torch.Generator().manual_seed(1)
    calib, held = ([(torch.randn(8, 3, 32, 32, generator=gen), torch.zeros(8, dtype=torch.long)) for _ in range(k)]
                   for k in (6, 3))
    expected = outputs_of(model, SHIFTED, held)
    assert rel(outputs_of(cut, SHIFTED, held), expected) > 1e-2  # the plain cut changes the attention's output
    report = lsq_refit(model, cut, lambda: calib, holdout=lambda: held, plan=plan, ridge=0.0)
    assert f"{SHIFTED}.proj" in report.refitted
    assert rel(outputs_of(cut, SHIFTED, held), expected) < 1e-4


def test_a_tv_swin_t_with_cut_heads_reloads_and_exports_with_the_same_outputs(tmp_path) -> None:
    torch.manual_seed(0)
    model = build("tv:swin_t", num_classes=10).eval()
    plan = Plan("tv:swin_t", 10, (3, 64, 64), heads={"features.1.1.attn": [2], "features.5.3.attn": [0, 5, 11]})
    cut = apply_plan(copy.deepcopy(model), plan).eval()
    assert stored_params(cut) == fast_plan_size(plan, meta_template(model))["params"] < stored_params(model)
    again = reloads_and_exports(cut, plan, torch.randn(2, 3, 64, 64), tmp_path)
    assert again.get_submodule("features.5.3.attn").num_heads == 3


def swin_images(n: int = 48) -> ImageSet:
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return ImageSet(x, torch.arange(n) % 10, [str(i) for i in range(10)], (0.5,) * 3, (0.25,) * 3)


@pytest.mark.parametrize("method", ["pfa-kl", "car", "lda", "tp-taylor"])
def test_every_method_reads_the_heads_of_a_window_attention(method: str) -> None:
    """LAST's head 2 is dead (zero output, zero proj columns): PFA drops it as inactive, LDA's traced utility of it
    is 0 so any η drops it, and CAR (heads masked in the window layout) and Taylor rank it; every Plan applies at
    its planned size."""
    from netslim.methods import Context, get_method

    model = small_swin()
    open_windows(model)
    attn = model.get_submodule(LAST)
    with torch.no_grad():  # head 2: v rows zero (its output is 0), proj columns zero (it feeds nothing)
        attn.qkv.weight[2 * 48 + 24:2 * 48 + 36] = 0
        attn.qkv.bias[2 * 48 + 24:2 * 48 + 36] = 0
        attn.proj.weight[:, 24:36] = 0
    options: dict[str, object] = {"pfa-kl": {"reduce": "spatial"}, "tp-taylor": {"ratio": 0.5},
                                  "car": {"eval_size": 32, "keep_fraction": 0.75, "per_step": 100},
                                  "lda": {"ft_epochs": 0, "verbose": False, "max_iters": 1, "eta_start": 1e-6,
                                          "max_drop": 1.0}}[method]
    data = swin_images()
    ctx = Context(model=model, arch="small_swin", num_classes=10, input_size=(3, 32, 32), calib=data, train=data,
                  val=data, options=options)
    plan = get_method(method).fn(ctx).plan
    if method in ("pfa-kl", "lda"):
        assert 2 not in plan.heads[LAST]
    assert plan.heads and all(0 < len(k) < model.get_submodule(n).num_heads for n, k in plan.heads.items())
    cut = apply_plan(copy.deepcopy(model), plan).eval()
    assert stored_params(cut) == fast_plan_size(plan, meta_template(model))["params"]
    assert cut(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_car_masks_a_head_of_a_window_attention_per_image() -> None:
    """CAR's masked attention on the (B, H, W, C) layout: image 0 without head 1 is the attention with head 1's
    proj columns zeroed, image 1 with every head is the attention itself."""
    from netslim.methods.car.heads import _MaskedAttention

    model = small_swin()
    open_windows(model)
    attn = model.get_submodule(LAST)
    zeroed = copy.deepcopy(attn)
    with torch.no_grad():
        zeroed.proj.weight[:, 12:24] = 0
    wrapped = _MaskedAttention(attn)
    wrapped.mask = torch.tensor([[1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    x = torch.randn(2, 4, 4, 48)
    with torch.no_grad():
        out = wrapped(x)
        torch.testing.assert_close(out[:1], zeroed(x[:1]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out[1:], attn(x[1:]), rtol=1e-5, atol=1e-6)
        assert (out[0] - attn(x[:1])[0]).abs().max() > 1e-3
