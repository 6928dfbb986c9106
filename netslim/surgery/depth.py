"""Depth removal, which torch-pruning does not do: drop residual blocks or convs of a sequential stack.

A residual block can go when its shortcut is the identity (its output has its input's shape); a conv
in an nn.Sequential can go with the BatchNorm and activation that follow it, and the next layer is
rebuilt (fresh weights) to read the dropped layer's input width. A module the inference forward never uses
(an auxiliary head, `unused_modules`) can go as well.
"""

from __future__ import annotations

import torch
from torch import nn

from netslim.errors import NetslimError
from netslim.surgery.graph import used_parameters

_FOLLOWERS = (nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.LeakyReLU)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, leaf = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), leaf


def call_order(model: nn.Module, example: torch.Tensor, types: tuple[type, ...]) -> list[str]:
    """Names of modules of `types`, in the order the forward pass calls them."""
    names = {m: n for n, m in model.named_modules()}
    order: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda mod, _: order.append(names[mod]))
             for m in model.modules() if isinstance(m, types)]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in hooks:
            h.remove()
    return order


def io_shapes(model: nn.Module, example: torch.Tensor, names: list[str]) -> dict[str, tuple]:
    """Input and output shapes of the named modules for one example forward."""
    shapes: dict[str, tuple] = {}
    hooks = []
    for n in names:
        m = model.get_submodule(n)
        hooks.append(m.register_forward_hook(
            lambda mod, inp, out, n=n: shapes.__setitem__(n, (tuple(inp[0].shape), tuple(out.shape)))))
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _rebuilt(layer: nn.Module, in_width: int) -> nn.Module:
    device = next(layer.parameters()).device
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            raise NetslimError("cannot drop the layer feeding a grouped convolution")
        return nn.Conv2d(in_width, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                         layer.dilation, 1, layer.bias is not None, layer.padding_mode, device=device)
    if isinstance(layer, nn.Linear):
        if layer.in_features % _channels_of(layer) != 0:
            raise NetslimError("cannot drop a layer whose next Linear does not read whole channels")
        return nn.Linear(in_width * (layer.in_features // _channels_of(layer)), layer.out_features,
                         layer.bias is not None, device=device)
    raise NetslimError(f"cannot rebuild a {type(layer).__name__} after dropping its input layer")


def _channels_of(layer: nn.Linear) -> int:
    return getattr(layer, "_netslim_in_channels", layer.in_features)


def unused_modules(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Outermost parameter-holding modules that one eval forward of `example` never uses (e.g. GoogLeNet's and
    Inception's auxiliary heads, used only in training): never called, and none of their parameters read
    functionally (autograd does not reach them), so removing them cannot change the output."""
    called = set(call_order(model, example, (nn.Module,)))
    used = used_parameters(model, example)
    out: list[str] = []
    for name, m in model.named_modules():
        if not name or name in called or any(name.startswith(o + ".") for o in out):
            continue
        params = list(m.parameters())
        inner_called = any(f"{name}.{sub}" in called for sub, _ in m.named_modules() if sub)
        if params and not inner_called and not any(id(p) in used for p in params):
            out.append(name)
    return out


def drop_layers(model: nn.Module, names: list[str], example: torch.Tensor) -> None:
    """Remove the named blocks or sequential convs in place (see module docstring for the rules)."""
    if not names:
        return
    shapes = io_shapes(model, example, names)
    order = call_order(model, example, (nn.Conv2d, nn.Linear))
    unused = unused_modules(model, example) if set(names) - set(shapes) else []
    for name in names:
        module = model.get_submodule(name)
        if name not in shapes:
            if name not in unused:
                raise NetslimError(f"cannot drop {name}: it is not called in the forward pass, but its weights are")
            parent, leaf = _parent(model, name)
            setattr(parent, leaf, nn.Identity())  # never used at inference (an auxiliary head)
            continue
        inp, out = shapes[name]
        if isinstance(module, nn.Conv2d):
            _drop_conv(model, name, module, inp, out, order)
        else:
            if inp != out:
                raise NetslimError(f"cannot drop block {name}: its output shape {out} differs from its input "
                                   f"{inp} (only blocks with an identity shortcut can be removed)")
            parent, leaf = _parent(model, name)
            setattr(parent, leaf, nn.Identity())


def _drop_conv(model: nn.Module, name: str, conv: nn.Conv2d, inp: tuple, out: tuple, order: list[str]) -> None:
    parent, leaf = _parent(model, name)
    if not isinstance(parent, nn.Sequential):
        raise NetslimError(f"cannot drop {name}: only convs inside an nn.Sequential can be dropped")
    if inp[2:] != out[2:]:
        raise NetslimError(f"cannot drop {name}: it changes the spatial size {inp[2:]} -> {out[2:]}")
    keys = list(parent._modules)
    i = keys.index(leaf)
    parent._modules[keys[i]] = nn.Identity()
    for key in keys[i + 1:]:
        if not isinstance(parent._modules[key], _FOLLOWERS):
            break
        parent._modules[key] = nn.Identity()
    pos = order.index(name)
    if pos + 1 >= len(order):
        raise NetslimError(f"cannot drop {name}: no layer follows it")
    nxt = order[pos + 1]
    layer = model.get_submodule(nxt)
    if isinstance(layer, nn.Linear):
        layer._netslim_in_channels = conv.out_channels  # type: ignore[attr-defined]
    nparent, nleaf = _parent(model, nxt)
    setattr(nparent, nleaf, _rebuilt(layer, conv.in_channels))
