"""Channel groups a transformer's own code lets netslim cut, found by cutting them on a weightless copy.

torch-pruning follows channels through the traced graph; a width a model's Python fixes (a window partition or a
head split that reshapes to the input's width, as Swin's and MaxViT's attention do) is invisible to it, so a
group it offers may give a network that does not run. For models with attention (a module with `num_heads`),
every offered group is cut by one channel on the meta device, all at once; when that network does not run, the
groups are halved until each one that breaks it is found, and only the others are offered. Models without
attention skip the trial: their groups come from the graph alone, and a cut is still checked when applied.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from netslim.errors import NetslimError
from netslim.plan import Plan
from netslim.surgery.apply import apply_plan
from netslim.surgery.clone import clone
from netslim.surgery.graph import ChannelGroup


def has_attention(model: nn.Module) -> bool:
    return any(isinstance(m, nn.MultiheadAttention) or hasattr(m, "num_heads") for m in model.modules())


def runnable_groups(model: nn.Module, example: torch.Tensor, groups: list[ChannelGroup],
                    num_classes: int) -> list[ChannelGroup]:
    """The groups whose one-channel cut leaves a network that runs (all of them for a model without attention)."""
    if not groups or not has_attention(model):
        return groups
    template = clone(model).to("meta")
    shape = tuple(example.shape[1:])

    def runs(part: list[ChannelGroup]) -> bool:
        plan = Plan(arch="trial", num_classes=num_classes, input_size=shape,  # type: ignore[arg-type]
                    keep={n: list(range(1, g.width)) for g in part for n in g.layers})
        try:
            apply_plan(copy.deepcopy(template), plan)
        except NetslimError:
            return False
        return True

    def keep(part: list[ChannelGroup]) -> list[ChannelGroup]:
        if runs(part):
            return part
        if len(part) == 1:
            return []
        mid = len(part) // 2
        return keep(part[:mid]) + keep(part[mid:])

    cuttable = [g for g in groups if g.width > 1]
    kept = set(map(id, keep(cuttable)))
    return [g for g in groups if g.width == 1 or id(g) in kept]
