"""PCA design's depth rule on vision transformers: an encoder block whose output holds no dimension its input
lacked (its residual update adds nothing new) is dropped, a block that writes new directions stays, the first
block always stays, and dropping the block is exact when its update is zero; torchvision's and timm's blocks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from netslim.cost.size import meta_template, stored_params
from netslim.cost.sizemodel import fast_plan_size
from netslim.data import ImageSet
from netslim.methods import Context, get_method
from netslim.methods.pca.depth import structure, transformer_blocks
from netslim.plan import Plan
from netslim.surgery.apply import apply_plan
from netslim.surgery.graph import channel_groups

torch.set_num_threads(1)
SIDE, D, LOW, MID = 16, 32, 8, 16


def confine(rows: slice, *weights: torch.Tensor) -> None:
    """Zero every output row of these weights/biases but `rows`: they write only those residual dimensions."""
    keep = torch.zeros(D, dtype=torch.bool)
    keep[rows] = True
    with torch.no_grad():
        for w in weights:
            w[~keep] = 0


def tv_vit() -> tuple[nn.Module, list[str]]:
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    m = VisionTransformer(image_size=SIDE, patch_size=4, num_layers=3, num_heads=4, hidden_dim=D, mlp_dim=64,
                          num_classes=10).eval()
    nn.init.normal_(m.heads.head.weight, std=0.1)
    with torch.no_grad():
        m.class_token[..., LOW:] = 0
        m.encoder.pos_embedding[..., LOW:] = 0
    confine(slice(0, LOW), m.conv_proj.weight, m.conv_proj.bias)
    blocks = [f"encoder.layers.encoder_layer_{i}" for i in range(3)]
    writes = (slice(0, LOW), slice(0, 0), slice(LOW, MID))  # block 1 adds nothing, block 2 new directions
    for name, rows in zip(blocks, writes, strict=True):
        b = m.get_submodule(name)
        confine(rows, b.self_attention.out_proj.weight, b.self_attention.out_proj.bias, b.mlp[3].weight,
                b.mlp[3].bias)
    return m, blocks


def timm_vit() -> tuple[nn.Module, list[str]]:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    m = timm.models.vision_transformer.VisionTransformer(img_size=SIDE, patch_size=4, embed_dim=D, depth=3,
                                                         num_heads=4, mlp_ratio=2, num_classes=10).eval()
    nn.init.normal_(m.head.weight, std=0.1)
    with torch.no_grad():
        m.cls_token[..., LOW:] = 0
        m.pos_embed[..., LOW:] = 0
    confine(slice(0, LOW), m.patch_embed.proj.weight, m.patch_embed.proj.bias)
    blocks = [f"blocks.{i}" for i in range(3)]
    for name, rows in zip(blocks, (slice(0, LOW), slice(0, 0), slice(LOW, MID)), strict=True):
        b = m.get_submodule(name)
        confine(rows, b.attn.proj.weight, b.attn.proj.bias, b.mlp.fc2.weight, b.mlp.fc2.bias)
    with torch.no_grad():  # timm draws these at std 0.02: block 2's new directions made loud enough to count
        m.blocks[2].attn.proj.weight.mul_(20)
        m.blocks[2].mlp.fc2.weight.mul_(20)
    return m, blocks


def images(n: int = 64) -> ImageSet:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, SIDE, SIDE), generator=g, dtype=torch.uint8)
    return ImageSet(x, torch.arange(n) % 10, [str(i) for i in range(10)], (0.5,) * 3, (0.25,) * 3)


@pytest.mark.parametrize("build", [tv_vit, timm_vit], ids=["torchvision", "timm"])
def test_a_block_that_adds_no_dimension_is_dropped_and_dropping_it_is_exact(build) -> None:
    model, blocks = build()
    assert transformer_blocks(model) == blocks
    groups = channel_groups(model, torch.zeros(1, 3, SIDE, SIDE), "heads.head" if blocks[0][0] == "e" else "head")
    assert structure(model, groups)[0] == "residual"
    data = images()
    ctx = Context(model=model, arch="vit", num_classes=10, input_size=(3, SIDE, SIDE), calib=data, train=data)
    result = get_method("pca").fn(ctx)
    plan = result.plan
    assert plan.drop == [blocks[1]]  # block 0 is first, block 2 writes 8 new dimensions
    assert not any(n.startswith(blocks[1] + ".") for n in [*plan.keep, *plan.heads])
    assert "adds no dimensions" in "\n".join(str(s) for s in result.report)
    only_depth = Plan("vit", 10, (3, SIDE, SIDE), drop=list(plan.drop))
    shallow = apply_plan(copy.deepcopy(model), only_depth)
    assert isinstance(shallow.get_submodule(blocks[1]), nn.Identity)
    x = torch.randn(4, 3, SIDE, SIDE)
    with torch.no_grad():
        torch.testing.assert_close(shallow(x), model(x), rtol=1e-5, atol=1e-6)  # its update was zero
    cut = apply_plan(copy.deepcopy(model), plan)
    assert stored_params(cut) == fast_plan_size(plan, meta_template(model))["params"] < stored_params(shallow)
    assert cut(x).shape == (4, 10)


def test_depth_rule_off_keeps_every_block() -> None:
    model, _ = tv_vit()
    data = images()
    ctx = Context(model=model, arch="vit", num_classes=10, input_size=(3, SIDE, SIDE), calib=data, train=data,
                  options={"depth_rule": "none"})
    assert get_method("pca").fn(ctx).plan.drop == []
