"""Whole attention heads cut from vit_tiny: q, k and v lose the same heads, out_proj the matching inputs, the
residual width stays; the cut is sized exactly without weights, reloads from its file, exports to ONNX, and a
Plan that cannot apply is one clear error with the model left as it was."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from netslim.cost.size import count_flops, meta_template, model_size, plan_size, stored_params
from netslim.cost.sizemodel import fast_plan_size
from netslim.errors import NetslimError
from netslim.plan import Plan
from netslim.surgery.apply import apply_plan
from netslim.surgery.checkpoint import load_model, save_model
from netslim.surgery.heads import CutAttention
from netslim.zoo import build

torch.set_num_threads(1)

D, HEADS, HEAD_DIM, SIDE = 128, 4, 32, 32


def att(i: int) -> str:
    return f"encoder.layers.encoder_layer_{i}.self_attention"


def head_plan(heads: dict[str, list[int]], **kw: object) -> Plan:
    return Plan("vit_tiny", 10, (3, SIDE, SIDE), heads=heads, **kw)  # type: ignore[arg-type]


def vit() -> nn.Module:
    """Random vit_tiny; torchvision zeroes the classifier at init, which would make every output 0."""
    torch.manual_seed(0)
    model = build("vit_tiny").eval()
    nn.init.normal_(model.heads.head.weight, std=0.1)
    return model


def test_cut_heads_keep_q_k_v_alike_and_size_exactly() -> None:
    model = vit()
    heads = {att(0): [1, 3], att(4): [0, 1, 2]}
    plan = head_plan(heads, keep={"encoder.layers.encoder_layer_1.mlp.0": list(range(100))})
    cut = apply_plan(copy.deepcopy(model), plan)
    for name, kept in heads.items():
        a, orig = cut.get_submodule(name), model.get_submodule(name)
        assert isinstance(a, CutAttention) and (a.num_heads, a.head_dim, a.embed_dim) == (len(kept), HEAD_DIM, D)
        rows = [h * HEAD_DIM + j for h in kept for j in range(HEAD_DIM)]
        for part, (w, b) in enumerate(zip(a.in_proj_weight.chunk(3), a.in_proj_bias.chunk(3), strict=True)):
            assert w.shape == (len(kept) * HEAD_DIM, D)  # q, k and v: the same heads
            assert torch.equal(w, orig.in_proj_weight[part * D:(part + 1) * D][rows])
            assert torch.equal(b, orig.in_proj_bias[part * D:(part + 1) * D][rows])
        assert torch.equal(a.out_proj.weight, orig.out_proj.weight[:, rows]) and a.out_proj.out_features == D
    assert isinstance(cut.get_submodule(att(1)), nn.MultiheadAttention)
    per_head = 3 * (HEAD_DIM * D + HEAD_DIM) + D * HEAD_DIM
    mlp_cut = (256 - 100) * (D + 1 + D)
    assert stored_params(cut) == stored_params(model) - 3 * per_head - mlp_cut
    template = meta_template(model)
    assert model_size(cut, (3, SIDE, SIDE)) == plan_size(plan, template) == fast_plan_size(plan, template)
    assert count_flops(model, (3, SIDE, SIDE)) == count_flops(template, (3, SIDE, SIDE))  # CPU weighs as meta
    with torch.no_grad():
        assert cut(torch.randn(2, 3, SIDE, SIDE)).shape == (2, 10)


def test_a_duplicate_head_merged_into_its_copy_cuts_without_changing_outputs() -> None:
    """Head 3 made a copy of head 1: its out_proj columns summed into head 1's, cutting head 3 changes nothing,
    while cutting head 1 (the wrong slices) does."""
    model = vit()
    mha = model.get_submodule(att(2))
    one, three = slice(HEAD_DIM, 2 * HEAD_DIM), slice(3 * HEAD_DIM, 4 * HEAD_DIM)
    with torch.no_grad():
        for part in range(3):
            rows = mha.in_proj_weight[part * D:(part + 1) * D]
            rows[three] = rows[one]
            mha.in_proj_bias[part * D:(part + 1) * D][three] = mha.in_proj_bias[part * D:(part + 1) * D][one]
    merged = copy.deepcopy(model)
    with torch.no_grad():
        w = merged.get_submodule(att(2)).out_proj.weight
        w[:, one] += w[:, three]
    tokens = torch.randn(3, (SIDE // 4) ** 2 + 1, D)
    block = "encoder.layers.encoder_layer_2"
    right = apply_plan(copy.deepcopy(merged), head_plan({att(2): [0, 1, 2]})).get_submodule(block)
    wrong = apply_plan(copy.deepcopy(merged), head_plan({att(2): [0, 2, 3]})).get_submodule(block)
    with torch.no_grad():
        expected = model.get_submodule(block)(tokens)
        torch.testing.assert_close(right(tokens), expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(wrong(tokens), expected, rtol=1e-3, atol=1e-3)


def test_a_head_cut_reloads_from_its_file_alone(tmp_path: Path) -> None:
    plan = head_plan({att(0): [2], att(5): [0, 3]})
    cut = apply_plan(vit(), plan)
    save_model(tmp_path / "model.safetensors", cut, plan)
    again, read = load_model(tmp_path)
    assert read.heads == plan.heads and Plan.from_json(plan.to_json()) == plan
    x = torch.randn(2, 3, SIDE, SIDE)
    with torch.no_grad():
        assert torch.equal(again(x), cut(x))
    assert "heads" not in head_plan({}).to_dict()  # older plans (and readers) without the field are unchanged
    assert Plan.from_dict({"version": 1, "arch": "vit_tiny", "num_classes": 10}).heads == {}


def test_a_head_cut_exports_to_onnx(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from netslim.runtime.ort import OnnxRunner, export_onnx

    cut = apply_plan(vit(), head_plan({att(1): [0, 2], att(3): [3]}))
    export_onnx(cut, torch.zeros(1, 3, SIDE, SIDE), tmp_path / "cut.onnx")
    x = torch.randn(3, 3, SIDE, SIDE)
    with torch.no_grad():
        torch.testing.assert_close(OnnxRunner(tmp_path / "cut.onnx", 1)(x), cut(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch_first", [True, False])
def test_cut_attention_with_every_head_is_multihead_attention(batch_first: bool) -> None:
    """Every call form nn.MultiheadAttention takes (weights or not, sequence first, unbatched) gives its outputs."""
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    cut = CutAttention.of(mha, [0, 1, 2, 3])
    q, kv = torch.randn(2, 5, 16), torch.randn(2, 7, 16)  # (batch, tokens, width)
    batched = (q, kv, kv) if batch_first else (q.transpose(0, 1), kv.transpose(0, 1), kv.transpose(0, 1))
    with torch.no_grad():
        for args in (batched, (q[0], kv[0], kv[0])):
            for kw in ({"need_weights": False}, {}, {"average_attn_weights": False}):
                for got, want in zip(cut(*args, **kw), mha(*args, **kw), strict=True):
                    assert (got is None) == (want is None)
                    if got is not None:
                        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class _Odd(nn.Module):
    """Attention netslim cannot cut: separate key/value widths, or called with a mask."""

    def __init__(self, kdim: int | None = None, masked: bool = False) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, kdim=kdim, vdim=kdim, batch_first=True)
        self.masked, self.fc = masked, nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.flatten(2).transpose(1, 2)  # (N, 4, 8) tokens
        kv = t[..., : self.attn.kdim] if self.attn.kdim != 8 else t
        mask = torch.zeros(4, 4, dtype=torch.bool) if self.masked else None
        return self.fc(self.attn(t, kv, kv, attn_mask=mask, need_weights=False)[0].mean(1))


@pytest.mark.parametrize("heads, message", [
    ({att(0): [0, 4]}, "head indices for 'encoder.layers.encoder_layer_0.self_attention' must be distinct and in 0..3"),
    ({att(0): [1, 1]}, "must be distinct"),
    ({att(0): []}, "would have no heads left"),
    ({"encoder.layers.encoder_layer_0.mlp.0": [0]}, "is a Linear, not an nn.MultiheadAttention"),
    ({"encoder.nope": [0]}, "unknown layer 'encoder.nope'"),
])
def test_bad_head_plans_are_one_clear_error_and_change_nothing(heads: dict, message: str) -> None:
    model = vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for size in (lambda p: apply_plan(model, p), lambda p: plan_size(p, meta_template(model))):
        with pytest.raises(NetslimError, match=message) as err:
            size(head_plan(heads))
        assert "\n" not in str(err.value)
    after = model.state_dict()
    assert all(isinstance(model.get_submodule(att(i)), nn.MultiheadAttention) for i in range(6))
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("odd, message", [(_Odd(kdim=4), "separate key/value widths"),
                                          (_Odd(masked=True), "is called with a mask")])
def test_attention_netslim_cannot_cut_is_refused(odd: nn.Module, message: str) -> None:
    plan = Plan("odd", 3, (8, 2, 2), heads={"attn": [0]})
    with pytest.raises(NetslimError, match=message):
        apply_plan(odd, plan)
    assert isinstance(odd.attn, nn.MultiheadAttention) and odd.attn.num_heads == 2


@pytest.mark.parametrize("heads", [[1, 2], {"a": [-1]}, {"a": "0"}, {"a": [True]}])
def test_malformed_heads_in_a_plan_file_are_one_line(heads: object) -> None:
    with pytest.raises(NetslimError, match="'heads' must be an object mapping attention module names") as err:
        Plan.from_dict({"arch": "vit_tiny", "num_classes": 10, "heads": heads})
    assert "\n" not in str(err.value)
