"""PCA design's depth rule: which conv layers or residual blocks add no new dimensions.

Units are the things depth surgery (netslim.surgery.depth) can remove: convs of a plain sequential stack
(VGG, AlexNet) or residual blocks with an identity shortcut (ResNets, and the encoder blocks of a vision
transformer: attention and MLP each add an update to the residual stream of tokens, so a block whose output
holds no dimension its input lacked is an Identity away). A *stage* is a run of units
with the same output resolution. Within a stage, significant dimensions grow while layers add new
directions; a unit whose dimension does not rise above the largest reached by the kept units before
it adds nothing and is dropped. The first unit of every stage is always kept, so each resolution
keeps at least one layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from netslim.probe.qkv import is_qkv
from netslim.surgery.depth import call_order, io_shapes
from netslim.surgery.graph import ChannelGroup

RULES = ("grow", "none")
SCOPES = ("stage", "network")
SATURATED = ("keep", "drop")


@dataclass
class DropUnit:
    """One removable-or-not step of the network, in forward order, with the dimension of its output."""

    name: str
    kind: str  # "conv" | "block"
    channels: int
    resolution: tuple[int, ...]
    stage: int
    droppable: bool
    why_not: str = ""  # why it cannot be removed, when it cannot
    dims: int | None = None  # significant dimensions of its output (None: not analysed)
    decision: str = "keep"
    reason: str = ""


def structure(model: nn.Module, groups: list[ChannelGroup]) -> tuple[str, str]:
    """("residual" | "sequential" | "width-only", why): which depth rule the network admits."""
    if transformer_blocks(model):
        return "residual", "transformer blocks (residual attention and MLP) can be removed"
    if residual_blocks(model):
        return "residual", "residual blocks with identity shortcuts can be removed"
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        return "width-only", "the network has no convolutions"
    if any(m.groups != 1 for m in convs):
        return "width-only", "grouped/depthwise convolutions: removing a layer would change the block structure"
    if any(len(g.layers) > 1 for g in groups):
        return "width-only", "coupled channels (residual adds or concatenations) without removable blocks"
    return "sequential", "a plain stack of convolutions: single conv layers can be removed"


def residual_blocks(model: nn.Module) -> list[str]:
    """ResNet-style blocks (a module with a `downsample` shortcut attribute) held in an nn.Sequential stage."""
    out = []
    for name, m in model.named_modules():
        parent = name.rpartition(".")[0]
        if not name or not hasattr(m, "downsample") or not any(isinstance(c, nn.Conv2d) for c in m.modules()):
            continue
        if isinstance(model.get_submodule(parent) if parent else model, nn.Sequential):
            out.append(name)
    return out


def transformer_blocks(model: nn.Module) -> list[str]:
    """Encoder blocks of a vision transformer: members of an nn.Sequential holding an attention (an
    nn.MultiheadAttention or a timm-style qkv one) and a Linear of their own."""
    out = []
    for name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        for leaf, block in seq.named_children():
            inner = list(block.modules())
            if any(isinstance(m, nn.MultiheadAttention) or is_qkv(m) for m in inner) \
                    and any(isinstance(m, nn.Linear) for m in inner):
                out.append(f"{name}.{leaf}" if name else leaf)
    return out


def _stages(resolutions: list[tuple[int, ...]]) -> list[int]:
    stage, out = -1, []
    for i, r in enumerate(resolutions):
        if i == 0 or r != resolutions[i - 1]:
            stage += 1
        out.append(stage)
    return out


def sequential_units(model: nn.Module, example: torch.Tensor) -> list[DropUnit]:
    """Every conv in forward order; droppable when netslim.surgery.depth can remove it and rebuild its successor."""
    order = call_order(model, example, (nn.Conv2d, nn.Linear))
    convs = [n for n in order if isinstance(model.get_submodule(n), nn.Conv2d)]
    shapes = io_shapes(model, example, convs)
    res = [tuple(shapes[n][1][2:]) for n in convs]
    units = []
    for name, stage, r in zip(convs, _stages(res), res, strict=True):
        conv = model.get_submodule(name)
        parent = name.rpartition(".")[0]
        inp, out = shapes[name]
        nxt = order[order.index(name) + 1] if order.index(name) + 1 < len(order) else None
        nxt_mod = model.get_submodule(nxt) if nxt else None
        why = ""
        if not isinstance(model.get_submodule(parent) if parent else model, nn.Sequential):
            why = "not inside an nn.Sequential"
        elif inp[2:] != out[2:]:
            why = "changes the resolution"
        elif nxt_mod is None or (isinstance(nxt_mod, nn.Conv2d) and nxt_mod.groups != 1):
            why = "no plain layer follows it"
        units.append(DropUnit(name, "conv", conv.out_channels, r, stage, not why, why))
    return units


def block_units(model: nn.Module, example: torch.Tensor) -> list[DropUnit]:
    """Residual (or transformer) blocks in forward order; droppable when the shortcut is the identity. A
    transformer block's output is (batch, tokens, channels): its resolution is its token count."""
    tokens = transformer_blocks(model)
    blocks = tokens or residual_blocks(model)
    shapes = io_shapes(model, example, blocks)
    blocks = sorted((b for b in blocks if b in shapes), key=list(shapes).index)
    res = [(shapes[b][1][1],) if tokens else tuple(shapes[b][1][2:]) for b in blocks]
    units = []
    for name, stage, r in zip(blocks, _stages(res), res, strict=True):
        inp, out = shapes[name]
        block = model.get_submodule(name)
        why = "" if getattr(block, "downsample", None) is None and inp == out else "its shortcut is not the identity"
        units.append(DropUnit(name, "block", int(out[-1] if tokens else out[1]), r, stage, not why, why))
    return units


def decide(units: list[DropUnit], rule: str = "grow", threshold: float = 0.0, scope: str = "stage",
           saturated: str = "keep") -> list[str]:
    """Mark each unit keep/drop (with its reason) and return the names to drop.

    grow: a unit other than the first of its stage is dropped when dims <= (1 + threshold) * (largest dims of
    the kept units before it, in its stage or, with scope="network", anywhere before it). A saturated unit
    (dims == channels) cannot show growth, so saturated="keep" keeps it.
    """
    best: int | None = None
    stage = None
    for u in units:
        first = u.stage != stage
        if first and scope == "stage":
            best = None
        stage = u.stage
        u.decision, u.reason = "keep", ""
        if rule == "none":
            u.reason = "depth rule off"
        elif first:
            u.reason = "first layer of its resolution stage"
        elif u.dims is None:
            u.reason = "not analysed"
        elif best is not None and u.dims <= (1 + threshold) * best:
            if not u.droppable:
                u.reason = f"adds no dimensions ({u.dims} <= {best}) but cannot be removed: {u.why_not}"
            elif saturated == "keep" and u.dims >= u.channels:
                u.reason = f"saturated ({u.dims} = width): growth cannot be seen"
            else:
                u.decision, u.reason = "drop", f"adds no dimensions ({u.dims} <= {best})"
        else:
            u.reason = f"adds dimensions ({u.dims} > {best})" if best is not None else "first analysed layer"
        if u.decision == "keep" and u.dims is not None:
            best = u.dims if best is None else max(best, u.dims)
    return [u.name for u in units if u.decision == "drop"]
