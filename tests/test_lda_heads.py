"""Deep LDA on vision transformers: whole attention heads ranked by their traced utility, cut by the η rule,
composed across iterations in the base numbering, sized exactly, and left whole with --opt heads=false."""

from __future__ import annotations

import copy

import pytest
import tiny_vit
import torch
from tiny_vit import HEAD_DIM, HEADS, LAYERS, MLP, SIDE, D, att
from torch import nn

from netslim.cost.size import meta_template, plan_size, stored_params
from netslim.cost.targets import Target
from netslim.data import ImageSet, batches
from netslim.methods import Context, get_method
from netslim.methods.lda.heads import Cuts, apply_step
from netslim.methods.lda.loop import validation_pass
from netslim.methods.lda.options import LoopOptions
from netslim.methods.lda.step import analyse_model, plan_at
from netslim.methods.lda.trace import trace
from netslim.plan import Plan
from netslim.probe.heads import head_outputs
from netslim.surgery.apply import apply_plan
from netslim.surgery.heads import CutAttention

torch.set_num_threads(1)

SILENT, LOUD = 1, 3



def small_vit(seed: int = 0) -> nn.Module:
    return tiny_vit.small_vit(seed, num_classes=3)


def tuned_vit() -> nn.Module:
    """small_vit whose last attention has a silent head (out_proj columns zero: it cannot reach the class token)
    and a loud one (columns ×20: it carries most of what the class token's discriminant neurons receive)."""
    model = small_vit()
    out = model.get_submodule(att(LAYERS - 1)).out_proj.weight
    with torch.no_grad():
        out[:, SILENT * HEAD_DIM:(SILENT + 1) * HEAD_DIM] = 0.0
        out[:, LOUD * HEAD_DIM:(LOUD + 1) * HEAD_DIM] *= 20.0
    return model


def images(n: int, side: int = SIDE, classes: int = 3) -> ImageSet:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, side, side), generator=g, dtype=torch.uint8)
    return ImageSet(x, torch.arange(n) % classes, [str(i) for i in range(classes)], (0.5,) * 3, (0.25,) * 3)


def context(model: nn.Module, data: ImageSet, arch: str = "small_vit", target: Target | None = None,
            **options: object) -> Context:
    return Context(model=model, arch=arch, num_classes=model.heads.head.out_features,
                   input_size=tuple(data.images.shape[1:]), calib=data, train=data, val=data, target=target,
                   options={"ft_epochs": 0, "verbose": False, **options})


@pytest.mark.parametrize("tokens", ["max", "cls"])
def test_head_features_get_autograds_signal_at_the_recomputed_head_outputs(tokens: str) -> None:
    """The trace reads a head feature's signal as out_projᵀ times the attention output's; autograd at head
    outputs recomputed in the open (and fed to out_proj as a module) must give the same utility."""
    model, data = small_vit(), images(12)
    x = next(iter(batches(data, 12)))[0]
    mask = (torch.arange(D) % 3 == 0).float()
    got = trace(model, [x[:5], x[5:]], mask, "heads.head", attentions=[att(0), att(1)], tokens=tokens)

    class Open(nn.Module):
        def __init__(self, mha: nn.MultiheadAttention, sink: list[torch.Tensor]) -> None:
            super().__init__()
            self.mha, self.sink = mha, sink

        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **_: object) -> tuple:
            heads = head_outputs(self.mha, q, k, v)
            heads.register_hook(self.sink.append)
            return self.mha.out_proj(heads), None

    for i in range(LAYERS):
        net, sink, top = copy.deepcopy(model), [], []
        block = net.get_submodule(f"encoder.layers.encoder_layer_{i}")
        block.self_attention = Open(block.self_attention, sink)
        net.heads.head.register_forward_pre_hook(lambda m, a, seen=top: seen.append(a[0]))
        net(x.requires_grad_(True))
        torch.autograd.backward(top[0], top[0].detach() * mask)
        g = sink[0].clamp_min(0.0)
        want = (g[:, 0] if tokens == "cls" else g.amax(1)).double().mean(0)
        torch.testing.assert_close(got[att(i)], want, rtol=1e-4, atol=1e-7)
    assert set(got) >= {att(0), att(1), "encoder.layers.encoder_layer_0.mlp.0"}  # heads beside the MLP units


def test_a_silent_head_goes_first_and_the_loud_one_stays() -> None:
    model, data = tuned_vit(), images(60)
    ctx, o = context(model, data), LoopOptions(trace_images=5, verbose=False, threshold_origin="zero")
    a = analyse_model(ctx, o, validation_pass(model, data, ctx.classifier, "cpu", 64)[1], [att(0), att(1)])
    last = a.heads[att(1)]
    assert last.shape == (HEADS,) and a.heads[att(0)].shape == (HEADS,)
    assert float(last[SILENT]) == 0.0 and bool((last[torch.arange(HEADS) != SILENT] > 0).all())
    assert int(last.argmax()) == LOUD
    mlps = {g.root for g in ctx.groups() if g.root.endswith("mlp.0")}
    assert mlps and a.smooth == mlps  # the MLP units sit behind GELU
    assert plan_at(ctx, a, 1e-6, o).heads == {att(1): [h for h in range(HEADS) if h != SILENT]}  # first to go
    most = plan_at(ctx, a, 1e3, o)  # nothing passes: one head per attention stays, the highest
    assert most.heads[att(1)] == [LOUD] and most.heads[att(0)] == [int(a.heads[att(0)].argmax())]
    # measured from the smallest utility (auto, for heads): att(1)'s origin is its silent head's 0, so the same
    # head goes; att(0), with no silent head, loses its weakest
    auto = plan_at(ctx, a, 1e-6, LoopOptions(trace_images=5, verbose=False)).heads
    assert auto[att(1)] == [h for h in range(HEADS) if h != SILENT]
    assert auto[att(0)] == [h for h in range(HEADS) if h != int(a.heads[att(0)].argmin())]


def test_head_cuts_compose_across_steps_into_base_numbering() -> None:
    base = small_vit()
    mlp = "encoder.layers.encoder_layer_0.mlp.0"
    plan = Plan("small_vit", 3, (3, SIDE, SIDE))
    first = Plan(**{**plan.__dict__, "keep": {mlp: list(range(0, MLP, 2))}, "heads": {att(0): [0, 2, 3]}})
    second = Plan(**{**plan.__dict__, "keep": {mlp: list(range(10))}, "heads": {att(0): [1, 2], att(1): [0]}})
    twice = apply_step(apply_step(copy.deepcopy(base), first), second)
    cuts = Cuts({mlp: MLP}, {att(0): HEADS, att(1): HEADS}).then(first).then(second)
    composed = cuts.plan(Context(model=base, arch="small_vit", num_classes=3, input_size=(3, SIDE, SIDE)))
    assert composed.heads == {att(0): [2, 3], att(1): [0]} and composed.keep == {mlp: list(range(0, 20, 2))}
    once = apply_plan(copy.deepcopy(base), composed)
    assert isinstance(twice.get_submodule(att(0)), CutAttention) and twice.get_submodule(att(0)).num_heads == 2
    x = torch.randn(3, 3, SIDE, SIDE)
    with torch.no_grad():
        torch.testing.assert_close(twice(x), once(x), rtol=1e-5, atol=1e-6)


def test_vit_tiny_reaches_half_its_parameters_with_whole_heads() -> None:
    from netslim.zoo import build

    torch.manual_seed(0)
    base = build("vit_tiny", num_classes=10).eval()
    nn.init.normal_(base.heads.head.weight, std=0.1)
    ctx = context(copy.deepcopy(base), images(200, 32, 10), "vit_tiny", Target("params", 0.5), max_iters=2,
                  trace_images=2, eta_start=0.5, eta_step=0.5, bn_recal=0)
    res = get_method("lda").fn(ctx)
    plan = res.plan
    assert plan.heads  # 0.5 is out of reach of the MLP units alone (0.518 at least)
    for name, kept in plan.heads.items():
        assert name.endswith("self_attention") and kept == sorted(set(kept)) and 1 <= len(kept) < 4
        assert all(0 <= h < 4 for h in kept)
    cut = apply_plan(copy.deepcopy(base), plan)
    size = plan_size(plan, meta_template(base))
    assert stored_params(cut) == size["params"] == stored_params(res.model) <= 0.5 * stored_params(base)
    shapes = {k: v.shape for k, v in cut.state_dict().items()}
    assert shapes == {k: v.shape for k, v in res.model.state_dict().items()}  # the handed-over net is the Plan's
    for name, kept in plan.heads.items():
        for net in (cut, res.model):
            assert isinstance(net.get_submodule(name), CutAttention) and net.get_submodule(name).num_heads == len(kept)
    assert sum(r["heads_removed"] for r in plan.meta["iterations"]) == sum(4 - len(k) for k in plan.heads.values())
    with torch.no_grad():
        assert res.model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("heads", [True, False])
def test_heads_false_keeps_every_attention_whole(heads: bool) -> None:
    model, data = tuned_vit(), images(60)
    ctx = context(model, data, max_iters=1, max_drop=1.0, trace_images=5, heads=heads)
    plan = get_method("lda").fn(ctx).plan
    if heads:
        assert SILENT not in plan.heads[att(1)]  # the silent head goes at the first η
    else:
        assert plan.heads == {} and "heads" not in plan.to_dict()
