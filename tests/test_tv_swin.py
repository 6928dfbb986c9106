"""torchvision's Swin, built by netslim with a window attention that calls its Linear layers: the same function
as torchvision's (a torchvision checkpoint gives the same outputs), and a network torch-pruning can follow, so
its MLP widths are offered and cut to exactly the planned size; torchvision's own module stays refused."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch import nn
from torchvision.models import swin_t
from torchvision.models.swin_transformer import SwinTransformer

from netslim.cost.size import meta_template, stored_params
from netslim.cost.sizemodel import fast_plan_size
from netslim.errors import NetslimError
from netslim.plan import Plan
from netslim.surgery.apply import apply_plan
from netslim.surgery.graph import channel_groups
from netslim.surgery.trial import runnable_groups
from netslim.zoo import build
from netslim.zoo.swin import OpenWindowAttention, open_windows

pytestmark = pytest.mark.usefixtures("one_thread")


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
