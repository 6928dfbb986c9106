"""Surgery over every zoo model and a few torchvision ones: random Plans give exactly the planned network."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from netslim.cost.size import plan_size
from netslim.errors import NetslimError
from netslim.plan import Plan
from netslim.surgery.apply import apply_plan, find_classifier
from netslim.surgery.graph import channel_groups, out_width
from netslim.zoo import arch_info, build, list_archs

torch.set_num_threads(1)

ARCHS = [*list_archs(), "tv:resnet18", "tv:mobilenet_v2", "tv:densenet121"]


def random_plan(model: nn.Module, arch: str, size: tuple[int, int, int], seed: int) -> Plan:
    rng = random.Random(seed)
    plan = Plan(arch=arch, num_classes=10, input_size=size, method="random-test")
    for g in channel_groups(model, torch.zeros(1, *size), find_classifier(model)):
        if rng.random() < 0.8:
            keep = sorted(rng.sample(range(g.width), rng.randint(1, g.width)))
            for name in g.layers:
                plan.keep[name] = keep
    return plan


@pytest.mark.parametrize("arch", ARCHS)
def test_random_plan_gives_planned_network(arch: str) -> None:
    size = arch_info(arch).input_size if not arch.startswith("tv:") else (3, 32, 32)
    model = build(arch, num_classes=10).eval()
    x = torch.randn(2, *size)
    plan = random_plan(model, arch, size, seed=len(arch))
    predicted = plan_size(plan)  # meta device, no weights
    apply_plan(model, plan)
    y = model(x)
    assert y.shape == (2, 10)
    assert torch.isfinite(y).all()
    assert sum(p.numel() for p in model.parameters()) == predicted["params"]
    for name, keep in plan.keep.items():
        assert out_width(model.get_submodule(name)) == len(keep)


def test_kept_channels_keep_their_weights() -> None:
    model = build("vgg11_bn", num_classes=10).eval()
    w0 = model.features[0].weight.detach().clone()
    w1 = model.features[4].weight.detach().clone()
    keep = [1, 5, 9, 63]
    apply_plan(model, Plan(arch="vgg11_bn", num_classes=10, keep={"features.0": keep}))
    assert torch.equal(model.features[0].weight, w0[keep])
    assert torch.equal(model.features[4].weight, w1[:, keep])  # next layer's inputs follow


def test_pruning_a_channel_equals_zeroing_its_response() -> None:
    """Cutting a filter gives the same outputs as silencing it after BN+ReLU in the full model."""
    model = build("vgg11_bn", num_classes=10).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.bias.uniform_(-0.2, 0.2)
    x = torch.randn(3, 3, 32, 32)
    drop = [3, 7]
    hook = model.features[2].register_forward_hook(lambda m, i, o: o.index_fill(1, torch.tensor(drop), 0.0))
    expected = model(x)
    hook.remove()
    keep = [i for i in range(64) if i not in drop]
    apply_plan(model, Plan(arch="vgg11_bn", num_classes=10, keep={"features.0": keep}))
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)


def test_resnet_coupled_channels_must_agree() -> None:
    model = build("resnet20", num_classes=10)
    groups = channel_groups(model, torch.zeros(1, 3, 32, 32), "fc")
    coupled = next(g for g in groups if len(g.layers) > 1)
    plan = Plan(arch="resnet20", num_classes=10, keep={coupled.layers[0]: [0, 1], coupled.layers[1]: [0, 2]})
    with pytest.raises(NetslimError, match="coupled layers"):
        apply_plan(model, plan)


@pytest.mark.parametrize(("keep", "message"), [
    ({"nope.0": [0]}, "unknown layer"),
    ({"features.0": []}, "no channels left"),
    ({"features.0": [0, 64]}, "in 0..63"),
    ({"features.0": [1, 1]}, "distinct"),
    ({"features.1": [0]}, "not a Conv2d or Linear"),
    ({"classifier": [0, 1]}, "cannot be pruned"),
])
def test_invalid_plans_are_refused(keep: dict, message: str) -> None:
    model = build("vgg11_bn", num_classes=10)
    with pytest.raises(NetslimError, match=message):
        apply_plan(model, Plan(arch="vgg11_bn", num_classes=10, keep=keep))


def test_class_cut_keeps_the_chosen_rows() -> None:
    model = build("resnet20", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    full = model(x)
    apply_plan(model, Plan(arch="resnet20", num_classes=10, classes=[3, 5, 7]))
    torch.testing.assert_close(model(x), full[:, [3, 5, 7]])


def test_drop_identity_residual_block() -> None:
    model = build("resnet56", num_classes=10).eval()
    before = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in model.layer2[4].parameters())
    plan = Plan(arch="resnet56", num_classes=10, drop=["layer2.4"])
    assert plan_size(plan)["params"] == before - block
    apply_plan(model, plan)
    assert isinstance(model.layer2[4], nn.Identity)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_drop_downsampling_block_is_refused() -> None:
    with pytest.raises(NetslimError, match="identity shortcut"):
        apply_plan(build("resnet20"), Plan(arch="resnet20", num_classes=10, drop=["layer2.0"]))


def test_drop_sequential_conv_rebuilds_next_layer() -> None:
    model = build("vgg16_bn", num_classes=10).eval()
    plan = Plan(arch="vgg16_bn", num_classes=10, drop=["features.40"], keep={"features.37": list(range(100))})
    predicted = plan_size(plan)["params"]
    apply_plan(model, plan)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert model.classifier.in_features == 100
    assert sum(p.numel() for p in model.parameters()) == predicted


def test_plan_json_round_trip(tmp_path) -> None:
    plan = Plan(arch="resnet20", num_classes=10, keep={"layer1.0.conv1": [0, 3]}, drop=["layer3.2"],
                classes=[1, 2], method="x", meta={"energy": 0.9})
    plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json") == plan
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(NetslimError, match="not valid JSON"):
        Plan.load(tmp_path / "bad.json")
