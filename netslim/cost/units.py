"""The units a network's latency is predicted from: each conv/linear layer with its BatchNorm and activation.

FLOPs are not time: a layer's latency depends on the kernel the runtime picks for its exact widths,
and a BatchNorm or activation right after it is often fused into that kernel. So the unit timed
(and looked up in the latency table) is the layer together with what directly follows it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from netslim.errors import NetslimError


@dataclass(frozen=True)
class Unit:
    """One conv/linear layer with the BatchNorm and activation that directly follow it."""

    kind: str  # "conv" | "linear"
    cin: int
    cout: int
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    spatial: tuple[int, ...] = ()  # input H, W per sample (conv) or the leading dims (linear)
    bias: bool = False
    bn: bool = False
    act: str | None = None

    @property
    def depthwise(self) -> bool:
        return self.kind == "conv" and self.groups > 1 and self.groups == self.cin == self.cout

    def signature(self) -> str:
        g = "dw" if self.depthwise else f"g{self.groups}"
        return (f"{self.kind}|k{self.kernel}|s{self.stride}|p{self.padding}|d{self.dilation}|{g}|in{self.spatial}"
                f"|b{int(self.bias)}|bn{int(self.bn)}|{self.act}").replace(" ", "")

    def input_shape(self, batch: int) -> tuple[int, ...]:
        """Shape of a batch of this unit's input."""
        return (batch, self.cin, *self.spatial) if self.kind == "conv" else (batch, *self.spatial, self.cin)

    def build(self) -> nn.Module:
        if self.kind == "conv":
            layer: nn.Module = nn.Conv2d(self.cin, self.cout, self.kernel, self.stride, self.padding, self.dilation,
                                         self.groups, self.bias)
        else:
            layer = nn.Linear(self.cin, self.cout, self.bias)
        mods = [layer]
        if self.bn:
            mods.append(nn.BatchNorm2d(self.cout) if self.kind == "conv" else nn.BatchNorm1d(self.cout))
        if self.act:
            mods.append(getattr(nn, self.act)())
        return nn.Sequential(*mods)


# Timed beside every batch of new table entries: it sets the scale that keeps entries comparable.
REFERENCE = Unit("conv", 32, 32, (3, 3), (1, 1), (1, 1), (1, 1), 1, (16, 16), False, True, "ReLU")


def network_units(model: nn.Module, input_size: Sequence[int]) -> list[Unit]:
    """The conv/linear units of `model` in call order, found by tracing one forward (works on meta)."""
    from netslim.probe.points import ACT_TYPES, trace_calls

    p = next(model.parameters())
    calls = trace_calls(model, torch.zeros((1, *input_size), device=p.device, dtype=p.dtype))

    def consumer(i: int, types: tuple) -> int | None:
        out = calls[i].out
        for j in range(i + 1, len(calls)):
            if calls[j].inp is out and calls[j].inp_version == calls[i].out_version:
                return j if isinstance(calls[j].module, types) else None
        return None

    units = []
    for i, call in enumerate(calls):
        m = call.module
        if not isinstance(m, (nn.Conv2d, nn.Linear)) or call.inp is None or call.out is None:
            continue
        j = consumer(i, (_BatchNorm,))
        last = j if j is not None else i
        k = consumer(last, ACT_TYPES)
        act = type(calls[k].module).__name__ if k is not None else None
        if isinstance(m, nn.Conv2d):
            if not isinstance(m.padding, tuple):
                raise NetslimError(f"latency table: padding {m.padding!r} of {call.name!r} is not supported")
            units.append(Unit("conv", m.in_channels, m.out_channels, tuple(m.kernel_size), tuple(m.stride),
                              tuple(m.padding), tuple(m.dilation), m.groups, tuple(call.inp.shape[2:]),
                              m.bias is not None, j is not None, act))
        else:
            units.append(Unit("linear", m.in_features, m.out_features, spatial=tuple(call.inp.shape[1:-1]),
                              bias=m.bias is not None, bn=j is not None, act=act))
    return units
