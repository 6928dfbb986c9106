"""PFA keeps whole attention heads of a ViT: how many from the spectrum of the head outputs (out_proj's input,
recomputed and checked against the module), which by correlation between heads; q, k and v lose the same heads,
the cut is sized exactly, a copied head goes first, heads=false leaves attention whole, and a params budget is met
with the heads cut."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny_vit import HEAD_DIM, HEADS, LAYERS, SIDE, D, att, small_vit
from torch import nn
from typer.testing import CliRunner

from netslim.cost.size import meta_template, stored_params
from netslim.cost.sizemodel import fast_plan_size
from netslim.cost.targets import Target
from netslim.data import ImageSet
from netslim.errors import NetslimError
from netslim.methods import Context, MethodResult, get_method
from netslim.methods.common.heads import head_order
from netslim.probe import head_outputs, head_stats
from netslim.surgery.apply import apply_plan
from netslim.surgery.heads import CutAttention

torch.set_num_threads(1)






def images(n: int = 8) -> ImageSet:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, SIDE, SIDE), generator=g, dtype=torch.uint8)
    return ImageSet(x, torch.arange(n) % 10, [str(i) for i in range(10)], (0.5,) * 3, (0.25,) * 3)


def run(model: nn.Module, method: str = "pfa-kl", target: Target | None = None, **options: object) -> MethodResult:
    """17 tokens a sample each (reduce=spatial): 136 samples, more than the 32 head-output features."""
    ctx = Context(model=model, arch="small_vit", num_classes=10, input_size=(3, SIDE, SIDE), calib=images(),
                  target=target, options={"reduce": "spatial", **options})
    return get_method(method).fn(ctx)


def copy_head(mha: nn.MultiheadAttention, src: int, dst: int) -> None:
    """Head `dst` made an exact copy of head `src`: its q, k and v rows (and biases) set to src's."""
    e, d = mha.embed_dim, mha.head_dim
    with torch.no_grad():
        for part in range(3):
            rows = slice(part * e + dst * d, part * e + (dst + 1) * d)
            same = slice(part * e + src * d, part * e + (src + 1) * d)
            mha.in_proj_weight[rows] = mha.in_proj_weight[same]
            mha.in_proj_bias[rows] = mha.in_proj_bias[same]


@pytest.mark.parametrize("batch_first", [True, False])
def test_head_outputs_are_out_projs_input(batch_first: bool) -> None:
    """Recomputed from q/k/v and in_proj, out_proj of them is the module's own output, in every call layout."""
    torch.manual_seed(2)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    x = torch.randn(3, 5, 16)
    for inp in (x if batch_first else x.transpose(0, 1), x[0]):
        with torch.no_grad():
            heads = head_outputs(mha, inp, inp, inp)
            want = mha(inp, inp, inp, need_weights=False)[0]
        want = want.unsqueeze(0) if want.dim() == 2 else want if batch_first else want.transpose(0, 1)
        assert heads.shape[-1] == 16
        torch.testing.assert_close(mha.out_proj(heads), want, rtol=1e-5, atol=1e-5)


def test_pfa_kl_keeps_whole_heads_alike_in_q_k_v_and_sizes_the_cut_exactly() -> None:
    model = small_vit()
    res = run(model)
    plan = res.plan
    assert plan.heads and set(plan.heads) <= {att(i) for i in range(LAYERS)}
    assert set(plan.keep) <= {f"encoder.layers.encoder_layer_{i}.mlp.0" for i in range(LAYERS)}
    assert any("attention heads" in s for s in res.report)
    cut = apply_plan(copy.deepcopy(model), plan)
    for name, kept in plan.heads.items():
        assert 1 <= len(kept) < HEADS and kept == sorted(set(kept))
        a, orig = cut.get_submodule(name), model.get_submodule(name)
        assert isinstance(a, CutAttention) and a.num_heads == len(kept) and a.out_proj.in_features == len(kept) * 8
        rows = [h * HEAD_DIM + j for h in kept for j in range(HEAD_DIM)]
        for part, w in enumerate(a.in_proj_weight.chunk(3)):  # q, k and v: the same whole heads
            assert torch.equal(w, orig.in_proj_weight[part * D:(part + 1) * D][rows])
    assert stored_params(cut) == fast_plan_size(plan, meta_template(model))["params"] < stored_params(model)
    with torch.no_grad():
        assert cut(torch.randn(2, 3, SIDE, SIDE)).shape == (2, 10)


def test_a_copied_head_is_the_first_to_go() -> None:
    model = small_vit()
    copy_head(model.get_submodule(att(1)), 1, 3)
    stats = head_stats(model, [(torch.randn(8, 3, SIDE, SIDE), None)], [att(1)], "spatial")[att(1)]
    assert head_order(stats, HEADS)[0] in (1, 3) and head_order(stats, HEADS, "abs-max")[0] in (1, 3)
    kept = run(model).plan.heads[att(1)]
    assert len(kept) < HEADS and not {1, 3} <= set(kept)


def test_heads_false_leaves_attention_whole_and_bad_values_are_refused() -> None:
    model = small_vit()
    for method in ("pfa-kl", "pfa-en"):
        plan = run(model, method, heads="false").plan
        assert plan.heads == {} and plan.keep
    with pytest.raises(NetslimError, match="option heads for pfa-en: expected bool"):
        run(model, "pfa-en", heads="maybe")
    from netslim.cli.commands import app

    res = CliRunner().invoke(app, ["methods", "pfa-en", "--json"])
    rows = {r["name"]: r for r in json.loads(res.stdout)["options"]}
    assert res.exit_code == 0 and rows["heads"]["type"] == "bool" and rows["heads"]["default"] is True


def test_a_params_target_is_met_with_heads_cut() -> None:
    model = small_vit()
    plan = run(model, "pfa-en", Target("params", 0.5)).plan
    assert plan.heads
    base = stored_params(model)
    got = stored_params(apply_plan(copy.deepcopy(model), plan))
    assert got == fast_plan_size(plan, meta_template(model))["params"]
    assert got <= 0.5 * base and 0.5 * base - got <= 2 * D + 1, (got, 0.5 * base)  # within one MLP unit
