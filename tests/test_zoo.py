"""Architecture registry: shared checkpoints load key for key, every arch runs, hooks see each activation once."""

from __future__ import annotations

import pytest
import torch
from conftest import shared_path
from safetensors.torch import load_file
from torch import nn

from netslim.errors import NetslimError
from netslim.zoo import ArchInfo, arch_info, build, list_archs

torch.set_num_threads(1)


@pytest.mark.parametrize(("arch", "file"), [("vgg16_bn", "vgg16_bn_cifar10"), ("resnet56", "resnet56_cifar10")])
def test_shared_checkpoint_loads_strictly(arch: str, file: str) -> None:
    state = load_file(shared_path(f"models/{file}.safetensors"))
    model = build(arch)
    result = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(model.state_dict()["features.0.weight" if arch == "vgg16_bn" else "conv1.weight"],
                       state["features.0.weight" if arch == "vgg16_bn" else "conv1.weight"].float())
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_checkpoint_parameter_counts() -> None:
    count = {a: sum(p.numel() for p in build(a).parameters()) for a in ("vgg16_bn", "resnet56")}
    assert round(count["vgg16_bn"] / 1e6, 2) == 14.72
    assert round(count["resnet56"] / 1e6, 3) == 0.856


@pytest.mark.parametrize("arch", list_archs())
def test_forward_shape_and_classifier(arch: str) -> None:
    info = arch_info(arch)
    assert isinstance(info, ArchInfo) and info.name == arch
    model = build(arch, num_classes=7).eval()
    head = model.get_submodule(info.classifier)
    assert isinstance(head, nn.Linear) and head.out_features == 7
    with torch.no_grad():
        out = model(torch.randn(2, *info.input_size))
    assert out.shape == (2, 7)


@pytest.mark.parametrize("arch", list_archs())
def test_every_activation_is_its_own_module_and_fires_once(arch: str) -> None:
    info = arch_info(arch)
    model = build(arch).eval()
    acts = [m for _, m in model.named_modules(remove_duplicate=False) if isinstance(m, (nn.ReLU, nn.ReLU6, nn.GELU))]
    assert acts and len({id(m) for m in acts}) == len(acts)
    calls: dict[int, int] = {}
    for m in acts:
        m.register_forward_hook(lambda mod, i, o: calls.__setitem__(id(mod), calls.get(id(mod), 0) + 1))
    with torch.no_grad():
        model(torch.randn(1, *info.input_size))
    assert set(calls.values()) == {1} and len(calls) == len(acts)


def test_families_and_channels() -> None:
    assert {arch_info(a).family for a in list_archs()} == {"vgg", "resnet", "mobilenetv2", "alexnet", "small", "vit"}
    assert arch_info("small_cnn").input_size == (1, 16, 16)
    assert build("small_cnn").features[0].in_channels == 1
    assert build("small_cnn", in_channels=3).features[0].in_channels == 3
    assert build("resnet20", in_channels=1).conv1.in_channels == 1
    assert arch_info("vgg16_bn_cifar") == arch_info("vgg16_bn")  # checkpoint metadata name


def test_resnet_identity_block_can_be_removed() -> None:
    model = build("resnet20").eval()
    assert model.layer1[1].downsample is None and model.layer2[0].downsample is not None
    model.layer1[1] = nn.Identity()
    model.layer3[2] = nn.Identity()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_torchvision_model() -> None:
    info = arch_info("tv:resnet18")
    assert info.family == "other" and info.classifier == "fc" and info.input_size == (3, 224, 224)
    model = build("tv:resnet18", num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    with pytest.raises(NetslimError, match="resnet18"):
        build("tv:resnet_18")


def test_user_factory(tmp_path, monkeypatch) -> None:
    (tmp_path / "userfactory_mod.py").write_text(
        "from torch import nn\n"
        "def make(num_classes, in_channels=3):\n"
        "    return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),\n"
        "                         nn.Flatten(), nn.Linear(4, num_classes))\n"
        "def plain(num_classes):\n"
        "    return nn.Linear(3, num_classes)\n"
        "def bad(num_classes):\n"
        "    return 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build("userfactory_mod:make", num_classes=3, in_channels=2)
    assert model(torch.randn(1, 2, 8, 8)).shape == (1, 3)
    assert arch_info("userfactory_mod:make").classifier == "4"
    assert build("userfactory_mod:plain", num_classes=4).out_features == 4
    with pytest.raises(NetslimError, match="in_channels"):
        build("userfactory_mod:plain", in_channels=1)
    with pytest.raises(NetslimError, match="not a torch.nn.Module"):
        build("userfactory_mod:bad")
    with pytest.raises(NetslimError, match="no callable"):
        build("userfactory_mod:missing")
    with pytest.raises(NetslimError, match="cannot import"):
        build("no_such_module_xyz:make")


def test_unknown_arch_lists_valid_names() -> None:
    with pytest.raises(NetslimError, match="vgg16_bn.*resnet56|resnet56.*vgg16_bn") as err:
        build("vgg17")
    assert "tv:" in str(err.value)
    with pytest.raises(NetslimError):
        arch_info("resnet57")
    with pytest.raises(NetslimError):
        build("resnet20", num_classes=0)


def test_small_cnn_learns_digits() -> None:
    from netslim.data import batches, load_dataset

    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    model = build("small_cnn")
    epochs, steps = 6, batches(train, 64, shuffle=True, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=epochs * len(steps))
    model.train()
    for _ in range(epochs):
        for x, y in steps:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches(test, 360))
    assert correct / len(test) > 0.95
