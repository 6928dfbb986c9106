"""Training checkpoints without pickle: tensors in safetensors, bookkeeping in JSON, both renamed into place.

The JSON is written last and acts as the commit marker. The same JSON also rides in the safetensors
metadata, so a crash between the two renames leaves a tensor file that still describes itself. The optimizer's
per-parameter state rides along: SGD's momentum buffers under "momentum/<param>" (as always), any other state
(AdamW's moments and step) under "optim/<key>/<param>".
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from netslim.errors import NetslimError

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
_META_KEY = "netslim_train_state"
_MODEL, _MOMENTUM, _OPTIM = "model/", "momentum/", "optim/"


def _state_name(key: str, param: str) -> str:
    return _MOMENTUM + param if key == "momentum_buffer" else f"{_OPTIM}{key}/{param}"


def _parse_state_name(name: str) -> tuple[str, str] | None:
    """(state key, parameter name) of a stored optimizer tensor; None for model weights."""
    if name.startswith(_MOMENTUM):
        return "momentum_buffer", name[len(_MOMENTUM) :]
    if name.startswith(_OPTIM):
        key, _, param = name[len(_OPTIM) :].partition("/")
        return key, param
    return None


def _fsync_replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)


def save_state(directory: Path, module: nn.Module, optimizer: torch.optim.Optimizer, meta: dict) -> None:
    """Write model weights, the optimizer's state and `meta` (epoch, step, history, ...) atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for key, value in module.state_dict().items():  # copies: safetensors rejects shared or strided storage
        tensors[_MODEL + key] = value.detach().to("cpu", copy=True).contiguous()
    for name, param in module.named_parameters():
        for key, value in optimizer.state.get(param, {}).items():
            if isinstance(value, torch.Tensor):
                tensors[_state_name(key, name)] = value.detach().to("cpu", copy=True).contiguous()
    text = json.dumps(meta, indent=1, allow_nan=False)
    suffix = f".tmp{os.getpid()}"
    tmp = directory / (STATE_TENSORS + suffix)
    save_file(tensors, str(tmp), metadata={_META_KEY: text})
    _fsync_replace(tmp, directory / STATE_TENSORS)
    tmp = directory / (STATE_JSON + suffix)
    tmp.write_text(text + "\n")
    _fsync_replace(tmp, directory / STATE_JSON)


def read_meta(directory: Path) -> dict | None:
    """The newest complete bookkeeping in `directory`, or None when no checkpoint was ever committed."""
    directory = Path(directory)
    json_path, tensor_path = directory / STATE_JSON, directory / STATE_TENSORS
    if not json_path.exists():
        return None
    try:
        meta = json.loads(json_path.read_text())
    except (OSError, ValueError) as exc:
        raise NetslimError(f"training checkpoint {json_path} is unreadable: {exc}") from exc
    if not tensor_path.exists():
        raise NetslimError(f"training checkpoint {directory} has {STATE_JSON} but no {STATE_TENSORS}")
    try:
        with safe_open(str(tensor_path), framework="pt") as fh:
            embedded = json.loads((fh.metadata() or {}).get(_META_KEY, "null"))
    except Exception as exc:  # safetensors raises its own error types for truncated files
        raise NetslimError(f"training checkpoint {tensor_path} is corrupt: {exc}") from exc
    if embedded and embedded.get("step", -1) > meta.get("step", -1):
        return embedded  # tensors were renamed into place, the JSON was not: the tensors are the truth
    if not embedded or embedded.get("step") != meta.get("step"):
        raise NetslimError(f"training checkpoint {directory}: {STATE_JSON} and {STATE_TENSORS} disagree")
    return meta


def restore_training(directory: Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load weights and optimizer state into existing objects (they keep their device and layout; a 0-dim state
    such as AdamW's step count stays on the CPU, where torch keeps it)."""
    path = Path(directory) / STATE_TENSORS
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise NetslimError(f"training checkpoint {path} is corrupt: {exc}") from exc
    weights = {k[len(_MODEL) :]: v for k, v in tensors.items() if k.startswith(_MODEL)}
    try:
        module.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise NetslimError(f"training checkpoint {path} does not match this model: {exc}") from exc
    params = dict(module.named_parameters())
    for stored, value in tensors.items():
        parsed = _parse_state_name(stored)
        if parsed is None:
            continue
        key, name = parsed
        if name not in params:
            raise NetslimError(f"training checkpoint {path} holds optimizer state of {name!r}, which this model lacks")
        param = params[name]
        optimizer.state[param][key] = value if value.dim() == 0 else torch.empty_like(param).copy_(value)
