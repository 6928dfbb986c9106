"""Structurally distinct torchvision models, random-init at the smallest input, through PFA-En to a params target:
each is cut to exactly the planned size, or refused with one NetslimError line; never a traceback.
(benchmarks/speed/tv_coverage.py runs every torchvision classification model.)"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch import nn

from netslim.cost.size import stored_params
from netslim.cost.sizemodel import fast_plan_size
from netslim.cost.targets import Target
from netslim.data import ImageSet
from netslim.errors import NetslimError
from netslim.methods import Context, get_method
from netslim.plan import Plan
from netslim.surgery.apply import apply_plan, find_classifier
from netslim.surgery.graph import channel_groups
from netslim.zoo import build

torch.set_num_threads(1)

MODELS = {  # model -> what it exercises
    "densenet121": "concatenations",
    "mobilenet_v2": "depthwise pairs",
    "mobilenet_v3_small": "squeeze-excite scaling, hardswish",
    "shufflenet_v2_x0_5": "channel shuffle (torch-pruning cannot trace it: a clear refusal)",
    "convnext_tiny": "LayerNorm on permuted tensors, a bare layer-scale parameter",
    "googlenet": "auxiliary heads off the eval forward path",
}
SIDE = 32


def random_images(n: int) -> ImageSet:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, SIDE, SIDE), generator=g, dtype=torch.uint8)
    return ImageSet(x, torch.randint(0, 10, (n,), generator=g), [str(i) for i in range(10)], (0.5,) * 3, (0.25,) * 3)


def assert_cut_as_planned(model: nn.Module, plan: Plan, template: nn.Module) -> int:
    """The real cut network has the planned parameter count and runs; that count."""
    planned = fast_plan_size(plan, template)["params"]
    cut = apply_plan(copy.deepcopy(model), plan)
    assert stored_params(cut) == planned
    with torch.no_grad():
        assert cut(torch.zeros(2, 3, SIDE, SIDE)).shape == (2, 10)
    return planned


@pytest.mark.parametrize("name", list(MODELS))
def test_compressed_to_the_planned_size_or_refused_in_one_line(name: str) -> None:
    torch.manual_seed(0)
    model = build(f"tv:{name}", num_classes=10).eval()
    ctx = Context(model=model, arch=f"tv:{name}", num_classes=10, input_size=(3, SIDE, SIDE), calib=random_images(16),
                  target=Target("params", 0.5), options={"reduce": "spatial"})
    try:
        plan = get_method("pfa-en").fn(ctx).plan
        assert assert_cut_as_planned(model, plan, ctx.template()) <= 0.5 * stored_params(model)
    except NetslimError as exc:  # 16 images leave most wide layers unanalysed: the target is then unreachable
        assert "\n" not in str(exc)
        assert ("channel shuffle" in str(exc)) == (name == "shufflenet_v2_x0_5")
    if name == "shufflenet_v2_x0_5":
        return
    # whatever the calibration allowed, surgery itself is exercised: half of every group, at random
    rng = random.Random(0)
    plan = Plan(f"tv:{name}", 10, (3, SIDE, SIDE))
    for g in ctx.groups():
        plan.keep.update(dict.fromkeys(g.layers, sorted(rng.sample(range(g.width), max(1, g.width // 2)))))
    assert plan.keep and assert_cut_as_planned(model, plan, ctx.template()) < stored_params(model)


def test_googlenet_auxiliary_heads_are_left_alone() -> None:
    model = build("tv:googlenet", num_classes=10).eval()
    groups = channel_groups(model, torch.zeros(1, 3, SIDE, SIDE), find_classifier(model))
    assert groups and not any(n.startswith(("aux1", "aux2")) for g in groups for n in g.layers)


def test_googlenet_auxiliary_heads_are_removed_when_asked(tmp_path) -> None:
    """--unused remove: the heads inference never calls go with the cut, the outputs do not change, and the run
    directory reloads to the same network."""
    from netslim.cost.targets import parse_target
    from netslim.repair import Repair
    from netslim.surgery.depth import unused_modules
    from netslim.workflows.api import load_trained
    from netslim.workflows.compress import compress

    torch.manual_seed(0)
    model = build("tv:googlenet", num_classes=10).eval()
    assert unused_modules(model, torch.zeros(1, 3, SIDE, SIDE)) == ["aux1", "aux2"]
    aux = sum(p.numel() for n in ("aux1", "aux2") for p in model.get_submodule(n).parameters())
    data = random_images(16)
    kept = compress(copy.deepcopy(model), "tv:googlenet", data, None, method="tp-l1", target=parse_target("params=0.5"),
                    calib_size=16, measure_latency=False, repair=Repair(mode="none"))
    gone = compress(copy.deepcopy(model), "tv:googlenet", data, None, method="tp-l1", target=parse_target("params=0.5"),
                    calib_size=16, measure_latency=False, repair=Repair(mode="none"), unused="remove",
                    out=tmp_path / "run")
    assert [r["module"] for r in gone.metrics["unused_removed"]] == ["aux1", "aux2"]
    assert stored_params(gone.model) == stored_params(kept.model) - aux
    x = torch.randn(2, 3, SIDE, SIDE)
    with torch.no_grad():
        torch.testing.assert_close(gone.model.eval()(x), kept.model.eval()(x))
        again, _, _ = load_trained(tmp_path / "run" / "model.safetensors", None, 10)
        torch.testing.assert_close(again.eval()(x), gone.model(x))


def _tiny_maxvit() -> nn.Module:
    from torchvision.models.maxvit import MaxVit

    torch.manual_seed(0)
    return MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[8, 16], block_layers=[2, 2],
                  head_dim=4, stochastic_depth_prob=0.0, num_classes=10).eval()


def test_group_walk_does_not_revisit_a_cut_reached_in_another_index_order(monkeypatch):
    """MaxViT's window partitions reach the same cut along many paths with the indices in another order;
    torch-pruning's own walk took each for new (maxvit_t: > 25 minutes). out_channel_group finds the same group
    in fewer steps."""
    import torch_pruning as tp

    from netslim.surgery.graph import build_graph, out_channel_group

    model = _tiny_maxvit()
    graph = build_graph(model, torch.zeros(1, 3, 32, 32))
    steps = {"n": 0}
    add = tp.Group.add_dep

    def counted(self, dep, idxs):
        steps["n"] += 1
        return add(self, dep, idxs)

    monkeypatch.setattr(tp.Group, "add_dep", counted)
    qkv = model.get_submodule("blocks.1.layers.0.layers.grid_attention.attn_layer.1.to_qkv")
    own = graph.get_pruning_group(qkv, tp.prune_linear_out_channels, idxs=[0, 5])
    own_steps, steps["n"] = steps["n"], 0
    ours = out_channel_group(graph, qkv, [0, 5])
    assert [(d.target, d.handler, sorted(i)) for d, i in ours] == [(d.target, d.handler, sorted(i)) for d, i in own]
    assert steps["n"] < 0.6 * own_steps  # 444 against 899 walk steps for one channel
    assert tp.Group.has_pruning_op is not None and "netslim" not in tp.Group.has_pruning_op.__module__


def test_a_cut_the_model_code_cannot_run_is_refused_in_one_line():
    """MaxViT's attention reshapes its output to the width of its input, a coupling torch-pruning cannot see:
    cutting the residual stream yields a network that does not run, which is named as such, not as a bad input."""
    from netslim.cost.size import meta_template, plan_size

    model = _tiny_maxvit()
    stream = next(g for g in channel_groups(model, torch.zeros(1, 3, 32, 32), find_classifier(model))
                  if "blocks.0.layers.0.layers.window_attention.attn_layer.1.merge" in g.layers)
    plan = Plan("custom", 10, (3, 32, 32))
    plan.keep.update({n: list(range(stream.width // 2)) for n in stream.layers})
    for sizing in (lambda: plan_size(plan, meta_template(model)), lambda: apply_plan(copy.deepcopy(model), plan)):
        with pytest.raises(NetslimError, match="cut to this Plan does not run.*cannot cut these layers"):
            sizing()


def test_tiny_maxvit_mlp_cut_runs_at_the_planned_size():
    from netslim.cost.size import meta_template, plan_size

    model = _tiny_maxvit()
    x = torch.zeros(1, 3, 32, 32)
    plan = Plan("custom", 10, (3, 32, 32))
    groups = [g for g in channel_groups(model, x, find_classifier(model)) if len(g.layers) == 1]
    assert not any("to_qkv" in g.root for g in groups)  # torch-pruning maps its cut onto too many channels
    for g in groups:
        plan.keep[g.root] = list(range(0, g.width, 2))
    planned = plan_size(plan, meta_template(model))["params"]
    cut = apply_plan(copy.deepcopy(model), plan)
    assert stored_params(cut) == planned < stored_params(model)
    with torch.no_grad():
        assert cut(x).shape == (1, 10)
