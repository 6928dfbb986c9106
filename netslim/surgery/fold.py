"""Fold inference-mode BatchNorm into the conv or linear layer that feeds it.

At inference a BatchNorm is a per-channel affine map, so `bn(conv(x))` equals one conv with scaled
weights and a shifted bias: one op fewer per layer, and the form exporters and runtimes expect. The
pairs are found by tracing one forward pass (tensor identity between a layer's output and the BN's
input), so it works for any model built from modules (VGG, ResNet, MobileNetV2, ...), and every fold
is checked numerically against the original before it is kept.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from netslim.errors import NetslimError
from netslim.probe.points import trace_calls

RTOL = 1e-5  # largest relative change of the outputs a fold may cause (float32)


def foldable_pairs(model: nn.Module, example_input: torch.Tensor) -> list[tuple[str, str]]:
    """(layer, batchnorm) names where the BN directly and only normalises that layer's output."""
    calls = trace_calls(model, example_input)
    counts: dict[int, int] = {}
    for c in calls:
        counts[id(c.module)] = counts.get(id(c.module), 0) + 1
    pairs = []
    for i, call in enumerate(calls):
        if not isinstance(call.module, (nn.Conv2d, nn.Linear)) or call.out is None or counts[id(call.module)] != 1:
            continue
        for nxt in calls[i + 1:]:
            if nxt.inp is call.out and nxt.inp_version == call.out_version:
                if isinstance(nxt.module, _BatchNorm) and counts[id(nxt.module)] == 1 and _fits(call, nxt.module):
                    pairs.append((call.name, nxt.name))
                break
    return pairs


def _fits(call, bn: _BatchNorm) -> bool:  # noqa: ANN001 (a probe trace record)
    if bn.running_mean is None or bn.running_var is None:
        return False  # batch statistics at inference: not an affine map
    out = call.out
    channels = call.module.out_channels if isinstance(call.module, nn.Conv2d) else call.module.out_features
    if isinstance(call.module, nn.Linear) and out.dim() != 2:
        return False  # BatchNorm1d on (N, C, L) normalises dim 1, a Linear's features are the last dim
    return bn.num_features == channels and out.dim() >= 2 and out.shape[1] == channels


@torch.no_grad()
def fold_into(layer: nn.Conv2d | nn.Linear, bn: _BatchNorm) -> None:
    """Scale `layer`'s weights and set its bias so that it computes bn(layer(x)) (in place)."""
    w = layer.weight
    mean, var = bn.running_mean.double(), bn.running_var.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)
    bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(mean)
    shape = (-1,) + (1,) * (w.dim() - 1)
    layer.weight.copy_((w.double() * scale.reshape(shape)).to(w.dtype))
    new_bias = ((bias - mean) * scale + beta).to(w.dtype)
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias, requires_grad=w.requires_grad)
    else:
        layer.bias.copy_(new_bias)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    scale = float(b.abs().max()) or 1.0
    return float((a - b).abs().max()) <= rtol * scale


def fold_batchnorm(model: nn.Module, example_input: torch.Tensor | None = None,
                   input_size: Sequence[int] | None = None, rtol: float = RTOL) -> nn.Module:
    """A new eval-mode model with every foldable BatchNorm merged into its layer (the BN becomes Identity).

    The input is not changed. Give an `example_input` (a batch) or an `input_size` (C, H, W). A pair
    whose fold would change the outputs by more than `rtol` (relative to the largest output) is left
    unfolded: the hooks cannot see a layer output that is also used elsewhere, the check can.
    """
    if example_input is None:
        if input_size is None:
            raise NetslimError("fold_batchnorm needs an example input or an input size (C, H, W)")
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
        example_input = torch.randn((2, *input_size), generator=torch.Generator().manual_seed(0)).to(device)
    net = copy.deepcopy(model).eval()
    with torch.no_grad():
        reference = net(example_input)
    pairs = foldable_pairs(net, example_input)
    folded = copy.deepcopy(net)
    for layer, bn in pairs:
        fold_into(folded.get_submodule(layer), folded.get_submodule(bn))
        _set(folded, bn, nn.Identity())
    with torch.no_grad():
        if _close(folded(example_input), reference, rtol):
            return folded
    for layer, bn in pairs:  # one at a time, keeping only the folds that leave the outputs unchanged
        trial = copy.deepcopy(net)
        fold_into(trial.get_submodule(layer), trial.get_submodule(bn))
        _set(trial, bn, nn.Identity())
        with torch.no_grad():
            if _close(trial(example_input), reference, rtol):
                net = trial
    return net


def count_batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, _BatchNorm) for m in model.modules())
