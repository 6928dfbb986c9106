"""timm models by `timm:<name>`: three families (ResNet, MobileNetV3, ViT) random-init at 32 px are cut to
exactly the planned size and reload from their own files; a missing timm or an unknown name is one error line."""

from __future__ import annotations

import copy
import random
import sys

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from netslim.cost.size import meta_template, plan_size, stored_params
from netslim.cost.sizemodel import fast_plan_size
from netslim.errors import NetslimError
from netslim.plan import Plan
from netslim.surgery.apply import apply_plan, find_classifier
from netslim.surgery.checkpoint import load_model, save_model
from netslim.surgery.graph import channel_groups
from netslim.zoo import arch_info, build

torch.set_num_threads(1)
SIDE = 32
MODELS = {  # timm name -> its classifier, as find_classifier names it
    "resnet10t": "fc",
    "mobilenetv3_small_050": "classifier",  # squeeze-excite convs, hard-swish, a conv_head before the Linear
    "vit_tiny_patch16_224": "head",  # position embeddings sized to the 32 px input through img_size
}


def half_plan(arch: str, model: nn.Module) -> Plan:
    """Half of every channel group, chosen at random: surgery on every coupling timm's code has."""
    rng = random.Random(0)
    plan = Plan(arch, 10, (3, SIDE, SIDE))
    for g in channel_groups(model, torch.zeros(1, 3, SIDE, SIDE), find_classifier(model)):
        plan.keep.update(dict.fromkeys(g.layers, sorted(rng.sample(range(g.width), max(1, g.width // 2)))))
    return plan


@pytest.mark.parametrize("name", list(MODELS))
def test_cut_to_the_planned_size_and_reloaded_from_its_file(name: str, tmp_path) -> None:
    pytest.importorskip("timm")
    arch = f"timm:{name}"
    model = build(arch, num_classes=10, image_size=(SIDE, SIDE)).eval()
    assert find_classifier(model) == MODELS[name] == arch_info(arch).classifier
    plan = half_plan(arch, model)
    assert plan.keep
    planned = fast_plan_size(plan, meta_template(model))["params"]
    assert plan_size(plan)["params"] == planned  # the zoo rebuilds it (at the Plan's input size) alike
    cut = apply_plan(copy.deepcopy(model), plan).eval()
    assert stored_params(cut) == planned < stored_params(model)
    x = torch.randn(2, 3, SIDE, SIDE)
    save_model(tmp_path / "cut.safetensors", cut, plan)
    again, stored = load_model(tmp_path / "cut.safetensors")
    assert stored.arch == arch
    with torch.no_grad():
        out = cut(x)
        assert out.shape == (2, 10)
        torch.testing.assert_close(again(x), out, rtol=0, atol=0)


def test_a_timm_name_in_a_file_is_built_a_bad_one_refused(tmp_path) -> None:
    """A plain state dict naming its timm architecture loads without --model (the name imports no user code);
    the data's image size reaches the ViT, whose position embeddings depend on it."""
    pytest.importorskip("timm")
    from netslim.workflows.api import load_trained

    arch = "timm:vit_tiny_patch16_224"
    model = build(arch, num_classes=10, image_size=(SIDE, SIDE)).eval()
    path = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata={"arch": arch})
    again, got, plan = load_trained(path, None, 10, 3, (SIDE, SIDE))
    assert got == arch and plan is None
    x = torch.randn(1, 3, SIDE, SIDE)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
    save_file({"w": torch.zeros(1)}, str(path), metadata={"arch": "timm:os.system:echo"})
    with pytest.raises(NetslimError, match="not a timm model name"):
        load_trained(path, None, 10, 3)


def test_arch_info_reads_timm_config() -> None:
    pytest.importorskip("timm")
    info = arch_info("timm:resnet10t")
    assert info.family == "other" and info.classifier == "fc" and info.input_size == (3, 176, 176)
    assert build("timm:resnet10t", in_channels=1).conv1[0].in_channels == 1


def test_missing_timm_is_one_line(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    with pytest.raises(NetslimError) as err:
        build("timm:resnet18")
    assert str(err.value) == "timm models need timm: pip install 'netslim[timm]'"


@pytest.mark.parametrize(("arch", "match"), [
    ("timm:resnet_18", r"unknown timm model 'resnet_18' \(did you mean .*resnet18.*timm.list_models\('\*resnet\*'\)"),
    ("timm:resnet18.no_such_tag", "unknown pretrained tag 'no_such_tag' of timm model 'resnet18'"),
    ("timm:../evil", "not a timm model name"),
    ("timm:", "not a timm model name"),
])
def test_bad_timm_name_is_one_line(arch: str, match: str) -> None:
    pytest.importorskip("timm")
    with pytest.raises(NetslimError, match=match) as err:
        build(arch)
    assert "\n" not in str(err.value)


def test_swin_groups_its_window_code_breaks_are_not_offered() -> None:
    """timm's Swin reshapes to its stage width in Python (window partition, patch merging), which torch-pruning's
    graph does not see: a cut of the residual stream gives a network that does not run. The trial on the meta
    device finds exactly those groups; the MLP widths it leaves are cut to the planned size and run."""
    import timm

    from netslim.surgery.trial import runnable_groups

    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=10, img_size=SIDE,
                              patch_size=2, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(2, 2)).eval()
    example = torch.zeros(1, 3, SIDE, SIDE)
    found = channel_groups(model, example, find_classifier(model))
    ok = runnable_groups(model, example, found, 10)
    dropped = {g.root for g in found} - {g.root for g in ok}
    assert "patch_embed.proj" in dropped and all("mlp" not in r for r in dropped)
    assert {g.root for g in ok} >= {"layers.0.blocks.0.mlp.fc1", "layers.1.blocks.0.mlp.fc1"}
    everything = Plan("swin", 10, (3, SIDE, SIDE), keep={n: list(range(1, g.width)) for g in found for n in g.layers})
    with pytest.raises(NetslimError, match="does not run"):
        apply_plan(copy.deepcopy(model), everything)
    plan = Plan("swin", 10, (3, SIDE, SIDE), keep={n: list(range(g.width // 2)) for g in ok for n in g.layers})
    cut = apply_plan(copy.deepcopy(model), plan)
    assert cut(example).shape == (1, 10)
    assert stored_params(cut) == plan_size(plan, meta_template(model))["params"] < stored_params(model)


def test_a_model_caching_a_computed_tensor_is_still_copied_and_cut() -> None:
    """EfficientFormer's attention caches its biases (a tensor computed from a parameter) on an eval forward; after a
    forward with gradients that cache is a non-leaf tensor, which copy.deepcopy refuses. netslim's clone copies it
    detached, so the meta template, the trial cut and the cut itself still work."""
    from netslim.surgery.clone import clone

    model = build("timm:efficientformer_l1", num_classes=10).eval()
    with torch.enable_grad():
        model(torch.zeros(1, 3, 224, 224))
    with pytest.raises(RuntimeError, match="deepcopy"):
        copy.deepcopy(model)
    twin = clone(model)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(twin(x), model(x))
    assert meta_template(model) is not None
