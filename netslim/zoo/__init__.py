"""Architecture registry: one string names a network, so a Plan or checkpoint can rebuild it later.

Accepted names: the built-in CIFAR-size networks (`list_archs()`), `tv:<name>` for any torchvision
classification model (random weights), `timm:<name>` for any timm model (random weights; timm is the
optional extra netslim[timm]), and `package.module:function` for a user factory that is
called as `function(num_classes=...)` (plus `in_channels=...` when it accepts that argument).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from netslim.errors import NetslimError
from netslim.zoo.alexnet import CifarAlexNet
from netslim.zoo.mobilenet import MobileNetV2
from netslim.zoo.resnet import DEPTHS, BasicBlock, CifarResNet, resnet
from netslim.zoo.small import SmallCNN
from netslim.zoo.swin import open_windows
from netslim.zoo.timm_models import PREFIX as _TIMM
from netslim.zoo.timm_models import build_timm, default_input
from netslim.zoo.vgg import CONFIGS, VGG, vgg
from netslim.zoo.vit import vit_tiny

__all__ = ["ArchInfo", "BasicBlock", "CifarAlexNet", "CifarResNet", "MobileNetV2", "SmallCNN", "VGG",
           "arch_info", "build", "list_archs", "vit_tiny"]


@dataclass(frozen=True)
class ArchInfo:
    """What callers need without reading the model: family, default (C, H, W) input, final classifier name."""

    name: str
    family: str  # "vgg" | "resnet" | "mobilenetv2" | "alexnet" | "small" | "vit" | "other"
    input_size: tuple[int, int, int]
    classifier: str


@dataclass(frozen=True)
class _Entry:
    factory: Callable[..., nn.Module]  # called as factory(num_classes, in_channels)
    family: str
    input_size: tuple[int, int, int]
    classifier: str


_REGISTRY: dict[str, _Entry] = {}
for _name in CONFIGS:
    _REGISTRY[_name] = _Entry(partial(vgg, _name), "vgg", (3, 32, 32), "classifier")
for _name in DEPTHS:
    _REGISTRY[_name] = _Entry(partial(resnet, _name), "resnet", (3, 32, 32), "fc")
_REGISTRY["mobilenetv2"] = _Entry(MobileNetV2, "mobilenetv2", (3, 32, 32), "classifier.1")
_REGISTRY["alexnet"] = _Entry(CifarAlexNet, "alexnet", (3, 32, 32), "classifier.4")
_REGISTRY["small_cnn"] = _Entry(SmallCNN, "small", (1, 16, 16), "classifier")
_REGISTRY["vit_tiny"] = _Entry(vit_tiny, "vit", (3, 32, 32), "heads.head")

# Names seen in checkpoint metadata ("vgg16_bn_cifar") map to the canonical ones.
_ALIASES = {f"{n}_cifar": n for n in _REGISTRY} | {"mobilenet_v2": "mobilenetv2", "small": "small_cnn"}

_TV_INPUT = (3, 224, 224)
_OTHER_INPUT = (3, 32, 32)


def list_archs() -> list[str]:
    """Canonical names of the built-in architectures (tv:, timm: and module:function forms are open-ended)."""
    return sorted(_REGISTRY)


def _canonical(arch: str) -> str:
    return _ALIASES.get(arch, arch)


def build(arch: str, num_classes: int = 10, in_channels: int | None = None, *, allow_code: bool = True,
          image_size: tuple[int, int] | None = None) -> nn.Module:
    """A freshly initialised network.

    `in_channels=None` means the architecture's default (1 for small_cnn, 3 otherwise). `allow_code=False`
    refuses a `package.module:function` name: a name read from a file must never make netslim import and
    call Python code; only the user's own --model (or Python call) may (a `timm:` name only selects a model
    timm registered, so it is built either way). `image_size` (H, W) reaches the timm models that fix their
    shapes to it (ViT position embeddings); the other architectures take any input size and ignore it.
    """
    if num_classes < 1:
        raise NetslimError(f"num_classes must be at least 1, got {num_classes}")
    arch = _canonical(arch.strip())
    if arch in _REGISTRY:
        entry = _REGISTRY[arch]
        channels = entry.input_size[0] if in_channels is None else in_channels
        return entry.factory(num_classes=num_classes, in_channels=channels)
    if arch.startswith("tv:"):
        return _build_torchvision(arch[3:], num_classes, in_channels)
    if arch.startswith(_TIMM):
        return build_timm(arch[len(_TIMM):], num_classes, in_channels, image_size)
    if ":" in arch:
        if not allow_code:
            raise NetslimError(f"architecture {arch!r} is a Python factory named by a file; netslim never imports "
                               f"code a file names: pass --model {arch} (or arch= in Python) to build it yourself")
        return _build_user(arch, num_classes, in_channels)
    raise NetslimError(_unknown_message(arch))


def arch_info(arch: str) -> ArchInfo:
    """Static facts about `arch`; torchvision, timm and user models are built (on the meta device) to find them."""
    name = _canonical(arch.strip())
    if name in _REGISTRY:
        e = _REGISTRY[name]
        return ArchInfo(name, e.family, e.input_size, e.classifier)
    if not name.startswith("tv:") and ":" not in name:
        raise NetslimError(_unknown_message(name))
    try:
        with torch.device("meta"):
            model = build(name)
    except NetslimError:
        raise
    except Exception:  # a factory that cannot run on the meta device: build it for real
        model = build(name)
    default = _TV_INPUT if name.startswith("tv:") else default_input(model) if name.startswith(_TIMM) else _OTHER_INPUT
    size = tuple(getattr(model, "input_size", default))
    return ArchInfo(name, "other", size, _final_layer(model))  # type: ignore[arg-type]


def _final_layer(model: nn.Module) -> str:
    """Name of the last registered Linear (or, for all-conv heads such as SqueezeNet, the last Conv2d)."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1]
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    return convs[-1] if convs else ""


def _build_torchvision(name: str, num_classes: int, in_channels: int | None) -> nn.Module:
    import torchvision.models as tvm

    if in_channels not in (None, 3):
        raise NetslimError(f"torchvision model {name!r} takes 3 input channels, not {in_channels}")
    known = tvm.list_models(module=tvm)
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise NetslimError(f"unknown torchvision classification model {name!r}{hint}; "
                           "torchvision.models.list_models() lists them")
    model = tvm.get_model(name, weights=None, num_classes=num_classes)
    open_windows(model)  # Swin v1: its window attention made to call its Linear layers (netslim.zoo.swin)
    return model


def _build_user(spec: str, num_classes: int, in_channels: int | None) -> nn.Module:
    module_name, _, func_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise NetslimError(f"cannot import {module_name!r} for architecture {spec!r}: {exc}") from exc
    factory = getattr(module, func_name, None)
    if not callable(factory):
        raise NetslimError(f"{module_name!r} has no callable {func_name!r} (architecture {spec!r})")
    kwargs: dict[str, int] = {"num_classes": num_classes}
    if in_channels is not None:
        try:
            accepts = "in_channels" in inspect.signature(factory).parameters
        except (TypeError, ValueError):
            accepts = False
        if accepts:
            kwargs["in_channels"] = in_channels
        elif in_channels != 3:
            raise NetslimError(f"factory {spec!r} takes no in_channels argument, so it cannot build a "
                               f"{in_channels}-channel model")
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise NetslimError(f"factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _unknown_message(arch: str) -> str:
    return (f"unknown architecture {arch!r}; valid names: {', '.join(list_archs())}, "
            "'tv:<torchvision model name>', 'timm:<timm model name>' or 'package.module:function'")
