"""The least-squares refit after a cut inside a transformer: an attention that lost heads gets its out_proj
refitted to the uncut attention's output (a copied head is merged back exactly), and fc2 after an MLP width cut
is refitted, all in forward order, on a random-init vit_tiny."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from tiny_vit import outputs_of, rel
from torch import nn

from netslim.data import load_dataset
from netslim.plan import Plan
from netslim.repair import compensate_bias, lsq_refit
from netslim.surgery.apply import apply_plan
from netslim.zoo import build

pytestmark = pytest.mark.usefixtures("one_thread")

D, HEAD_DIM, SIDE = 128, 32, 32
Data = list[tuple[torch.Tensor, torch.Tensor]]


def att(i: int) -> str:
    return f"encoder.layers.encoder_layer_{i}.self_attention"


def vit() -> nn.Module:
    """Random vit_tiny (4 heads of 32, width 128); its zero-initialised classifier made non-zero."""
    torch.manual_seed(0)
    model = build("vit_tiny").eval()
    nn.init.normal_(model.heads.head.weight, std=0.1)
    return model


def images(n: int, seed: int) -> Data:
    x = torch.randn(n, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))
    return [(x[i:i + 16], torch.zeros(len(x[i:i + 16]), dtype=torch.long)) for i in range(0, n, 16)]


def digits(n: int, start: int) -> Data:
    """`n` digit images from `start`, upsampled to the ViT's 32×32 and 3 channels, standardised."""
    x = load_dataset("digits", "train").images[start:start + n].float() / 255
    x = F.interpolate(x, size=SIDE, mode="bilinear").expand(-1, 3, -1, -1)
    x = (x - x.mean()) / x.std()
    return [(x[i:i + 16], torch.zeros(len(x[i:i + 16]), dtype=torch.long)) for i in range(0, n, 16)]


def cut_of(model: nn.Module, heads: dict[str, list[int]], keep: dict[str, list[int]] | None = None
           ) -> tuple[nn.Module, Plan]:
    plan = Plan("vit_tiny", 10, (3, SIDE, SIDE), keep=keep or {}, heads=heads)
    return apply_plan(copy.deepcopy(model), plan), plan


@pytest.mark.parametrize("walk", [True, False])
def test_a_cut_copy_of_a_head_is_merged_back_by_the_refit(walk: bool) -> None:
    """Head 3 a copy of head 1 (same q, k, v rows), cut with its out_proj columns simply dropped: the refit must
    find the merge (head 3's columns added to head 1's), so the block's output is the uncut one again."""
    model = vit()
    mha = model.get_submodule(att(2))
    one, three = slice(HEAD_DIM, 2 * HEAD_DIM), slice(3 * HEAD_DIM, 4 * HEAD_DIM)
    with torch.no_grad():
        for part in range(3):
            mha.in_proj_weight[part * D:(part + 1) * D][three] = mha.in_proj_weight[part * D:(part + 1) * D][one]
            mha.in_proj_bias[part * D:(part + 1) * D][three] = mha.in_proj_bias[part * D:(part + 1) * D][one]
    cut, plan = cut_of(model, {att(2): [0, 1, 2]})
    calib, held = images(48, 1), images(32, 2)
    block = "encoder.layers.encoder_layer_2"
    expected = outputs_of(model, block, held)
    assert rel(outputs_of(cut, block, held), expected) > 1e-2  # the plain cut does change the block's output
    report = lsq_refit(model, cut, lambda: calib, holdout=lambda: held, plan=plan, ridge=0.0, walk=walk)
    assert report.walked == walk and report.refitted == [f"{att(2)}.out_proj"]
    layer = report.layers[0]
    assert layer.error_before > 1e-2 and layer.error_after < 1e-4 and layer.dim == 3 * HEAD_DIM + 1
    assert rel(outputs_of(cut, block, held), expected) < 1e-4
    w, full = cut.get_submodule(att(2)).out_proj.weight.detach(), mha.out_proj.weight.detach()
    merged = torch.cat([full[:, :HEAD_DIM], full[:, one] + full[:, three], full[:, 2 * HEAD_DIM:3 * HEAD_DIM]], 1)
    torch.testing.assert_close(w, merged, rtol=0, atol=1e-3 * float(merged.abs().max()))


def test_a_head_cut_refit_halves_the_attention_error_on_held_out_images() -> None:
    """Heads cut in two blocks: each refitted out_proj reproduces its uncut attention's output at least twice as
    well as the cut alone, on digit images the fit did not see (random-noise images, with no structure for the
    kept heads to explain the cut ones by, give only ~1.5×); the bias-only repair handles the same jobs."""
    model = vit()
    heads = {att(0): [0, 2, 3], att(3): [1, 2]}
    cut, plan = cut_of(model, heads)
    plain = copy.deepcopy(cut)
    calib, held = digits(64, 0), digits(32, 64)
    report = lsq_refit(model, cut, lambda: calib, holdout=lambda: held, plan=plan)
    assert report.refitted == [f"{att(0)}.out_proj", f"{att(3)}.out_proj"]
    for name, r in zip(heads, report.layers, strict=True):
        assert r.error_after < 0.5 * r.error_before, r
        expected = outputs_of(model, name, held)
        before, after = rel(outputs_of(plain, name, held), expected), rel(outputs_of(cut, name, held), expected)
        assert after < 0.5 * before, (name, before, after)
    assert "self_attention.out_proj" in report.to_markdown()
    bias = compensate_bias(model, plain, lambda: calib, plan=plan)
    assert bias.refitted == report.refitted
    assert all(r.error_after <= r.error_before for r in bias.layers)


def test_fc2_and_out_proj_are_refitted_in_forward_order_after_mlp_and_head_cuts() -> None:
    """fc2 (mlp.3) of an MLP whose width was cut is refitted (its held-out error falls), and the jobs run in
    the order the forward pass calls them: block 0's fc2, block 1's attention, block 1's fc2."""
    model = vit()
    block: Callable[[int], str] = lambda i: f"encoder.layers.encoder_layer_{i}"  # noqa: E731
    keep = {f"{block(0)}.mlp.0": list(range(0, 256, 3)), f"{block(1)}.mlp.0": list(range(100))}
    cut, plan = cut_of(model, {att(1): [0, 3]}, keep)
    calib, held = images(48, 5), images(32, 6)
    fc2 = f"{block(1)}.mlp.3"
    plain = rel(outputs_of(cut, fc2, held), outputs_of(model, fc2, held))
    report = lsq_refit(model, cut, lambda: calib, holdout=lambda: held, plan=plan)
    assert report.walked
    assert report.refitted == [f"{block(0)}.mlp.3", f"{att(1)}.out_proj", fc2]
    assert all(r.error_after < 0.8 * r.error_before for r in report.layers), report.layers
    assert rel(outputs_of(cut, fc2, held), outputs_of(model, fc2, held)) < 0.8 * plain
