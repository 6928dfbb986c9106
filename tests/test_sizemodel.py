"""The per-layer size model: exactly the sizes meta-device surgery gives, on every zoo model and a set of
torchvision ones, for random Plans; what it hands to surgery; PFA-En's budget search on it; unreachable targets."""

from __future__ import annotations

import copy
import gc
import random

import pytest
import torch
from torch import nn

from netslim.cost.size import meta_template, plan_size, stored_params
from netslim.cost.sizemodel import SizeModel, fast_plan_size, surgery_only
from netslim.cost.targets import Target
from netslim.data import ImageSet
from netslim.errors import NetslimError
from netslim.methods import Context, get_method
from netslim.plan import Plan
from netslim.surgery.apply import apply_plan
from netslim.zoo import arch_info, build, list_archs

torch.set_num_threads(1)

TV = ["tv:resnet18", "tv:mobilenet_v2", "tv:mobilenet_v3_small", "tv:densenet121", "tv:efficientnet_b0",
      "tv:regnet_x_400mf"]
ATTENTION = {"vit_tiny"}


def random_plan(sizes: SizeModel, arch: str, seed: int) -> Plan:
    """Random kept subsets for ~80% of the groups (the last seed also cuts classes)."""
    rng = random.Random(seed)
    plan = Plan(arch, 10, sizes.input_size)
    for g in sizes.groups:
        if rng.random() < 0.8:
            keep = sorted(rng.sample(range(g.width), rng.randint(1, g.width)))
            plan.keep.update({n: keep for n in g.layers})
    if seed == 2:
        plan.classes = [1, 4, 7]
    return plan


@pytest.mark.parametrize("arch", [*list_archs(), *TV])
def test_size_model_equals_surgery_on_random_plans(arch: str) -> None:
    size = arch_info(arch).input_size if not arch.startswith("tv:") else (3, 64, 64)
    model = build(arch, num_classes=10).eval()
    template = meta_template(model)
    sizes = SizeModel.of(template, size)
    if arch in ATTENTION:  # attention's matmuls are no Conv/Linear MACs: by design no SizeModel, surgery sizes
        assert sizes is None
        return
    assert sizes is not None and sizes.groups
    assert all(e is not None for e in sizes.effects)  # every group of these models is expressible
    for seed in range(3):
        plan = random_plan(sizes, arch, seed)
        assert sizes.size(plan) == plan_size(plan, template), seed
    plan = random_plan(sizes, arch, 0)  # and the real cut network, with weights
    assert stored_params(apply_plan(copy.deepcopy(model), plan)) == sizes.size(plan)["params"]


def test_plans_it_cannot_express_go_to_surgery() -> None:
    template = meta_template(build("resnet20", num_classes=10))
    sizes = SizeModel.of(template, (3, 32, 32))
    assert sizes is not None
    drop = Plan("resnet20", 10, (3, 32, 32), drop=["layer1.1"])
    assert sizes.size(drop) is None
    assert fast_plan_size(drop, template) == plan_size(drop, template)
    first = sizes.groups[0]
    empty = Plan("resnet20", 10, (3, 32, 32), keep={n: [0] for n in first.layers}, classes=[])
    with pytest.raises(NetslimError):  # refused exactly as surgery refuses it
        sizes.size(empty)
    with surgery_only():
        assert fast_plan_size(drop, template) == plan_size(drop, template)


def test_size_models_are_forgotten_with_their_model() -> None:
    from netslim.cost import sizemodel

    alive = len(sizemodel._MODELS)
    template = meta_template(build("vgg11_bn", num_classes=10))
    assert SizeModel.of(template, (3, 32, 32)) is not None and len(sizemodel._MODELS) == alive + 1
    del template
    gc.collect()
    assert len(sizemodel._MODELS) == alive


def test_attention_flops_get_no_size_model() -> None:
    class Attn(nn.Module):  # a matmul outside Conv/Linear: its FLOPs depend on widths the model does not track
        def __init__(self) -> None:
            super().__init__()
            self.q, self.fc = nn.Linear(8, 16), nn.Linear(16, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q = self.q(x.flatten(1)).unsqueeze(2)
            return self.fc((q @ q.transpose(1, 2)).sum(2))

    assert SizeModel.of(meta_template(Attn()), (8,)) is None


def images(n: int, size: int, channels: int = 3) -> ImageSet:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    return ImageSet(x, torch.randint(0, 10, (n,), generator=g), [str(i) for i in range(10)], (0.5,) * channels,
                    (0.25,) * channels)


def context(arch: str, data: ImageSet, target: Target, **options: object) -> Context:
    model = build(arch, num_classes=10).eval()
    return Context(model=model, arch=arch, num_classes=10, input_size=data.input_size, calib=data, target=target,
                   options=dict(options))


def test_pfa_en_plans_the_same_with_and_without_the_size_model() -> None:
    ctx = context("small_cnn", images(300, 16, channels=1), Target("params", 0.3))
    fast = get_method("pfa-en").fn(ctx).plan
    ctx.cache.derived.clear()
    with surgery_only():
        slow = get_method("pfa-en").fn(ctx).plan
    assert fast.to_json() == slow.to_json()
    assert fast.meta["topped_up_filters"] >= 0


def test_unreachable_target_says_which_layers_are_kept_whole_and_why() -> None:
    ctx = context("small_cnn", images(20, 16, channels=1), Target("params", 0.2))
    with pytest.raises(NetslimError) as err:
        get_method("pfa-en").fn(ctx)
    text = str(err.value)
    assert "\n" not in text and "unreachable" in text
    assert "kept whole because they have no more calibration samples (20) than channels" in text
    assert "--calib-size" in text


def test_unreachable_target_names_the_floor() -> None:
    ctx = context("small_cnn", images(300, 16, channels=1), Target("params", 0.05), min_fraction=0.9)
    with pytest.raises(NetslimError, match="min_fraction=0.9"):
        get_method("pfa-en").fn(ctx)
