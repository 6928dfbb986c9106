"""The Python entry points: load a trained model and data by name, then compress in one call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from netslim.cost.targets import Target, parse_target
from netslim.data import ImageSet, load_dataset
from netslim.errors import NetslimError
from netslim.methods.base import MethodResult
from netslim.plan import Plan
from netslim.surgery.checkpoint import build_from_plan, load_tensors, plan_of, read_tensors
from netslim.train import Schedule
from netslim.workflows.compress import Result
from netslim.workflows.compress import compress as _compress
from netslim.workflows.stages import analyse as _analyse


def pick_device(device: str = "auto") -> str:
    """"cuda" when there is a GPU and `device` is auto, else `device` checked to exist (a name, not a torch.device)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    from netslim.train.distributed import resolve_device as check  # fails clearly without a GPU

    check(device)
    return device


def load_trained(weights: Path | None, arch: str | None, num_classes: int, in_channels: int | None = None,
                 image_size: tuple[int, int] | None = None) -> tuple[nn.Module, str, Plan | None]:
    """A model from a weights file: a netslim file carries its own architecture and Plan;
    a plain state dict needs `arch`. Without weights, a freshly initialised `arch`. `image_size` (H, W) of the
    data: the timm models whose shapes depend on it (ViTs) are built for it."""
    from netslim.zoo import build

    if weights is None:
        if arch is None:
            raise NetslimError("give --model ARCH (and --weights FILE for a trained network)")
        return build(arch, num_classes=num_classes, in_channels=in_channels, image_size=image_size), arch, None
    tensors, meta = read_tensors(Path(weights))
    plan = plan_of(meta, str(weights))
    if plan is not None:
        if arch is not None and arch != plan.arch:
            raise NetslimError(f"{weights} holds a {plan.arch!r} network, not {arch!r}")
        model = build_from_plan(plan, arch=arch)
        load_tensors(model, tensors, str(weights), plan.arch)
        return model.eval(), plan.arch, plan
    if arch is None and meta.get("arch") is None:
        raise NetslimError(f"{weights} does not say its architecture; give --model ARCH")
    given = arch is not None
    arch = arch if given else meta["arch"]
    model = build(arch, num_classes=num_classes, in_channels=in_channels, allow_code=given, image_size=image_size)
    load_tensors(model, tensors, str(weights), arch)
    return model.eval(), arch, None


def load_data(spec: str, classes: list[str] | None = None, cache_dir: Path | None = None,
              download: bool = False) -> tuple[ImageSet, ImageSet, list[int] | None, int]:
    """Train and test splits; with `classes`, only those (in the base label order) and their base indices."""
    full = load_dataset(spec, "train", cache_dir=cache_dir, download=download)
    if not classes:
        return full, load_dataset(spec, "test", cache_dir=cache_dir, download=download), None, len(full.classes)
    unknown = [c for c in classes if c not in full.classes]
    if unknown:
        raise NetslimError(f"unknown class {unknown[0]!r}; the data has {', '.join(full.classes)}")
    ordered = sorted(dict.fromkeys(classes), key=full.classes.index)
    idx = [full.classes.index(c) for c in ordered]
    train = load_dataset(spec, "train", classes=ordered, cache_dir=cache_dir, download=download)
    test = load_dataset(spec, "test", classes=ordered, cache_dir=cache_dir, download=download)
    return train, test, idx, len(full.classes)


def _inputs(model: nn.Module | str, data: str | tuple[ImageSet, ImageSet], weights: Path | None,
            arch: str | None) -> tuple[nn.Module, str, ImageSet, ImageSet]:
    if isinstance(data, str):
        train, test, _, n = load_data(data)
    else:
        train, test = data
        n = len(train.classes)
    if isinstance(model, str):
        model, arch, _ = load_trained(weights, model, n, train.images.shape[1], tuple(train.images.shape[2:]))
    if arch is None:
        raise NetslimError("give arch=... (a zoo name, 'tv:<name>', 'timm:<name>' or 'module:function') "
                           "so the result can reload")
    return model, arch, train, test


def analyse(model: nn.Module | str, data: str | tuple[ImageSet, ImageSet], method: str = "pfa-kl",
            target: str | Target | None = None, *, weights: Path | None = None, arch: str | None = None,
            device: str = "auto", options: dict[str, Any] | None = None, calib_size: int = 5000) -> MethodResult:
    """A method's Plan and evidence (report sections, plots) for a trained model, without touching the model."""
    model, arch, train, _ = _inputs(model, data, weights, arch)
    tgt = parse_target(target) if isinstance(target, str) else target
    result, _, _ = _analyse(model, arch, train, method, tgt, dict(options or {}), pick_device(device),
                            calib_size=calib_size)
    return result


def compress(model: nn.Module | str, data: str | tuple[ImageSet, ImageSet], method: str = "pfa-kl",
             target: str | Target | None = None, *, weights: Path | None = None, arch: str | None = None,
             finetune_epochs: int = 0, lr: float = 0.01, out: Path | None = None, device: str = "auto",
             options: dict[str, Any] | None = None, **kwargs: Any) -> Result:
    """Compress a trained model on data in one call (see `netslim compress --help` for the options).

    `model` is an nn.Module (give `arch` so that the result can be rebuilt from its files) or an arch
    name with `weights`; `data` a dataset spec ("digits", an archive path, ...) or (train, test) sets.
    Further keywords go to netslim.workflows.compress.compress (schedule=Schedule(...), calib_size, init, ...).
    """
    model, arch, train, test = _inputs(model, data, weights, arch)
    tgt = parse_target(target) if isinstance(target, str) else target
    schedule = kwargs.pop("schedule", None) or Schedule(epochs=finetune_epochs, lr=lr)
    return _compress(model, arch, train, test, method=method, target=tgt, options=options, schedule=schedule,
                     device=pick_device(device), out=out, **kwargs)
