"""Training checkpoints without pickle: tensors in safetensors, bookkeeping in JSON, both renamed into place.

The JSON is written last and acts as the commit marker. The same JSON also rides in the safetensors
metadata, so a crash between the two renames leaves a tensor file that still describes itself.
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
_MODEL, _MOMENTUM = "model/", "momentum/"


def _fsync_replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)


def save_state(directory: Path, module: nn.Module, optimizer: torch.optim.Optimizer, meta: dict) -> None:
    """Write model weights, SGD momentum buffers and `meta` (epoch, step, history, ...) atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for key, value in module.state_dict().items():  # copies: safetensors rejects shared or strided storage
        tensors[_MODEL + key] = value.detach().to("cpu", copy=True).contiguous()
    for name, param in module.named_parameters():
        buf = optimizer.state.get(param, {}).get("momentum_buffer")
        if buf is not None:
            tensors[_MOMENTUM + name] = buf.detach().to("cpu", copy=True).contiguous()
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
    """Load weights and momentum buffers into existing objects (they keep their device and layout)."""
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
    for name, param in module.named_parameters():
        buf = tensors.get(_MOMENTUM + name)
        if buf is not None:
            optimizer.state[param]["momentum_buffer"] = torch.empty_like(param).copy_(buf)
