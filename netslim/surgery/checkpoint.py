"""Weights in and out: safetensors only (no pickle), the Plan travels in the file's metadata.

A compressed model is stored as base architecture id + Plan + tensors; loading builds the base on the
meta device, replays the Plan's structure, then materialises it with the stored tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from netslim.errors import NetslimError
from netslim.io import atomic_write_bytes
from netslim.plan import Plan

PLAN_KEY = "netslim_plan"
CLASSES_KEY = "netslim_classes"  # JSON list of the class names the outputs score, in output order


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, with one clear error for a missing or broken file."""
    path = Path(path)
    if not path.is_file():
        raise NetslimError(f"weights file {path} does not exist")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise NetslimError(f"weights file {path} is corrupt or truncated ({e})") from None
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise NetslimError(f"weights file {path}: tensor {key!r} contains NaN or Inf")
    return tensors, meta


def load_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], source: str, arch: str) -> None:
    """Strictly load `tensors` into `model`, naming what does not fit (wrong architecture or class count)."""
    own = model.state_dict()
    missing = [k for k in own if k not in tensors]
    unexpected = [k for k in tensors if k not in own]
    if missing or unexpected:
        raise NetslimError(f"{source} does not fit architecture {arch!r}: "
                           f"{len(missing)} missing keys (e.g. {missing[:3]}), "
                           f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
    for k, t in tensors.items():
        if tuple(own[k].shape) != tuple(t.shape):
            raise NetslimError(f"{source} does not fit architecture {arch!r}: {k!r} has shape {tuple(t.shape)}, "
                               f"the model expects {tuple(own[k].shape)} (wrong architecture or class count?)")
    model.load_state_dict({k: t.to(own[k].dtype) for k, t in tensors.items()}, strict=True, assign=False)


def save_model(path: Path, model: nn.Module, plan: Plan, extra: dict[str, str] | None = None,
               classes: list[str] | None = None) -> None:
    """Write the model's tensors with the Plan (and the class names its outputs score) in the metadata,
    atomically. Names are stored only when they fit the Plan's outputs, so a file never claims wrong ones."""
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    meta = {PLAN_KEY: plan.to_json(), "arch": plan.arch, "num_classes": str(plan.out_classes), **(extra or {})}
    meta |= classes_meta(classes, plan.out_classes)
    atomic_write_bytes(Path(path), save(state, metadata=meta))


def classes_meta(classes: list[str] | None, outputs: int) -> dict[str, str]:
    """The metadata entry recording class names, or nothing when they are unknown or do not fit `outputs`."""
    if classes is None or len(classes) != outputs:
        return {}
    return {CLASSES_KEY: json.dumps([str(c) for c in classes])}


def plan_of(meta: dict[str, str], source: str = "weights file") -> Plan | None:
    """The Plan in a file's metadata (None when there is none); malformed metadata is one clear error."""
    return Plan.from_json(meta[PLAN_KEY], source) if PLAN_KEY in meta else None


def classes_of(meta: dict[str, str], source: str = "weights file") -> list[str] | None:
    """The class names a file's outputs score, in output order (None for files written without them)."""
    if CLASSES_KEY not in meta:
        return None
    try:
        names = json.loads(meta[CLASSES_KEY])
    except json.JSONDecodeError as e:
        raise NetslimError(f"{source}: the stored class names are not valid JSON ({e})") from None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names) \
            or len(set(names)) != len(names):
        raise NetslimError(f"{source}: the stored class names must be a list of distinct strings")
    plan = plan_of(meta, source)
    if plan is not None and len(names) != plan.out_classes:
        raise NetslimError(f"{source}: {len(names)} class names are stored for {plan.out_classes} outputs")
    return names


def read_metadata(path: Path) -> dict[str, str]:
    """Only the metadata of a safetensors file (its header): cheap, for checks made before any work."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise NetslimError(f"weights file {path} does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise NetslimError(f"weights file {path} is corrupt or truncated ({e})") from None


def build_from_plan(plan: Plan, device: str | torch.device = "cpu", *, arch: str | None = None) -> nn.Module:
    """Base architecture + the Plan's structure, with uninitialised weights on `device`.

    A Plan read from a file may name a `module:function` factory; it is built only when the user names the
    same architecture as `arch` (the file's word alone never runs code).
    """
    from netslim.surgery.apply import apply_plan
    from netslim.zoo import build

    allow_code = arch is not None and arch.strip() == plan.arch.strip()
    with torch.device("meta"):
        model = build(plan.arch, num_classes=plan.num_classes, in_channels=plan.input_size[0], allow_code=allow_code,
                      image_size=tuple(plan.input_size[1:]))
    # Surgery outside the meta context (as in plan_size): torch-pruning builds its index tensors on the default
    # device and moves them to the weights'; a default of meta breaks its LayerNorm cut (a ViT's residual stream).
    apply_plan(model, plan)
    return model.to_empty(device=device)


def load_model(path: Path, device: str | torch.device = "cpu", *, arch: str | None = None) -> tuple[nn.Module, Plan]:
    """Rebuild a netslim model (any file written by save_model, or a run directory) from its files alone.

    `arch`: the user's own architecture name, needed (and checked) only for a `module:function` factory."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    tensors, meta = read_tensors(path)
    plan = plan_of(meta, str(path))
    if plan is None:
        raise NetslimError(f"{path} has no netslim plan in its metadata; load it with --model ARCH instead")
    model = build_from_plan(plan, device, arch=arch)
    load_tensors(model, tensors, str(path), plan.arch)
    return model.eval(), plan
