"""Modules the inference forward pass never touches (e.g. GoogLeNet's and Inception's auxiliary heads, used only
in training): found, so that a user can have them removed with the cut, or left as they are (the default).

A module counts as unused when it holds parameters, no hook sees it called during one eval forward, and none
of its parameters is read functionally (autograd does not reach them): removing it cannot change the output.
"""

from __future__ import annotations

import torch
from torch import nn

from netslim.surgery.graph import used_parameters


def unused_modules(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the outermost parameter-holding modules that one eval forward of `example` never uses."""
    called: set[nn.Module] = set()
    hooks = [m.register_forward_pre_hook(lambda mod, _: called.add(mod)) for m in model.modules()]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in hooks:
            h.remove()
    used = used_parameters(model, example)
    out: list[str] = []
    for name, m in model.named_modules():
        if not name or m in called or any(name.startswith(o + ".") for o in out):
            continue
        params = list(m.parameters())
        if params and not any(sub in called for sub in m.modules()) and not any(id(p) in used for p in params):
            out.append(name)
    return out


def removable(model: nn.Module, name: str, example: torch.Tensor) -> bool:
    return name in unused_modules(model, example)
