"""The inputs of a torch.fx-traced forward: the images, and the defaults the other arguments take.

Graph walkers (CAR's split network, the repair's layer-by-layer walk) feed the images and must fill any
other argument of the forward (timm's `forward(x, attn_mask=None)`) with its default, or give up.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import fx


def forward_inputs(nodes: Iterable[fx.Node]) -> tuple[fx.Node, dict[fx.Node, Any]] | None:
    """The images' placeholder and {other placeholder: its default}; None when there is no input or another
    input has no default (the walk cannot fill it)."""
    holders = [n for n in nodes if n.op == "placeholder"]
    if not holders or any(not h.args for h in holders[1:]):
        return None
    return holders[0], {h: h.args[0] for h in holders[1:]}
