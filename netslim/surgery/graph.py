"""Which layers' output channels are coupled, found once with torch-pruning's DependencyGraph.

Methods decide per *group*: a residual add or a depthwise conv ties the output channels of several
layers together, so they must keep the same channel indices. Every Plan is checked against these groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

PRUNABLE = (nn.Conv2d, nn.Linear)


@dataclass(frozen=True)
class ChannelGroup:
    """Layers whose output channels are cut together (in model order); `width` is their channel count."""

    layers: tuple[str, ...]
    width: int

    @property
    def root(self) -> str:
        return self.layers[0]


def out_width(module: nn.Module) -> int:
    return module.out_channels if isinstance(module, nn.Conv2d) else module.out_features


def build_graph(model: nn.Module, example_input: torch.Tensor,
                ignored: list[nn.Module] | None = None) -> tp.DependencyGraph:
    """torch-pruning's dependency graph (quietly; works on the meta device too)."""
    return tp.DependencyGraph().build_dependency(
        model, example_inputs=example_input, ignored_layers=ignored or [], verbose=False
    )


def group_members(group: tp.Group, names: dict[nn.Module, str]) -> list[str]:
    """Names of Conv/Linear layers whose *output* channels are cut by this group."""
    out = []
    for dep, _ in group:
        mod = dep.target.module
        if isinstance(mod, PRUNABLE) and mod in names and dep.handler in (
            tp.prune_conv_out_channels, tp.prune_linear_out_channels, tp.prune_depthwise_conv_out_channels
        ):
            out.append(names[mod])
    return out


def channel_groups(model: nn.Module, example_input: torch.Tensor, classifier: str,
                   graph: tp.DependencyGraph | None = None) -> list[ChannelGroup]:
    """Coupled groups of prunable output channels, excluding any group that reaches the classifier's outputs."""
    names = {m: n for n, m in model.named_modules()}
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    graph = graph or build_graph(model, example_input)
    seen: set[str] = set()
    groups: list[ChannelGroup] = []
    for name, module in model.named_modules():
        if not isinstance(module, PRUNABLE) or name == classifier or name in seen:
            continue
        if isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels:
            continue  # depthwise: its channels follow the layer that feeds it
        handler = tp.prune_conv_out_channels if isinstance(module, nn.Conv2d) else tp.prune_linear_out_channels
        group = graph.get_pruning_group(module, handler, idxs=[0])
        members = sorted(set(group_members(group, names)), key=order.__getitem__)
        seen.update(members)
        if classifier in members:
            continue
        groups.append(ChannelGroup(tuple(members), out_width(module)))
    return groups
