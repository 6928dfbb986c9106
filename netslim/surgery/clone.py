"""A deep copy of a model that also works after a forward pass with gradients left a computed tensor in a
module's attributes (timm's EfficientFormer caches its attention biases so): copy.deepcopy refuses non-leaf
tensors, so those are copied detached (a cache, rebuilt by the next forward, carries no gradient worth keeping)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


def clone(model: nn.Module) -> nn.Module:
    memo: dict[int, Any] = {}
    for m in model.modules():
        for value in vars(m).values():
            _detach_into(value, memo)
    return copy.deepcopy(model, memo)


def _detach_into(value: Any, memo: dict[int, Any]) -> None:
    if isinstance(value, torch.Tensor) and not value.is_leaf:
        memo[id(value)] = value.detach().clone()
    elif isinstance(value, dict) and not isinstance(value, nn.Module):
        for v in value.values():
            _detach_into(v, memo)
    elif isinstance(value, list | tuple):
        for v in value:
            _detach_into(v, memo)
