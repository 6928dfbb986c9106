"""A network's forward pass over the calibration set, stepped from one layer to the next.

Refitting layer by layer needs, at each layer, its input in both networks *after* the earlier refits. Re-running
both networks from the images for every layer costs about half a forward pass per layer (VGG-16: 13 layers,
several minutes on a CPU). Instead, each network is traced once (torch.fx) and its graph is interpreted node
by node for every calibration batch; at each layer the walk stops, and what stays in memory is only the values
still needed downstream (the current activation, plus a skip connection's input in a residual network). Each
node runs once per image in all, so the whole refit costs one forward pass of each network (and of the
held-out images), whatever the depth.

The memory is the live activations of every calibration image at once. `Walk.fits` estimates it from one
batch; when it exceeds the budget or the model cannot be traced (data-dependent control flow), the caller
falls back to stopping a full forward at each layer (netslim.repair.capture.paired_patches), which keeps only
one batch in memory.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from netslim.errors import NetslimError
from netslim.probe.traced import forward_inputs
from netslim.surgery.heads import CutAttention

ADDS = (operator.add, operator.iadd, torch.add, "add", "add_")  # how a residual sum appears in a graph
BUDGET_BYTES = 6 * 2**30  # live activations of all calibration images, both networks and the held-out set


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer, with a head-cut attention kept whole (as nn.MultiheadAttention is): its forward
    branches on the input's shape, and the refit needs its call's arguments (netslim.repair.attention)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, CutAttention) or super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> torch.fx.GraphModule | None:
    """The model's graph (leaf modules shared with `model`, so weights written later are seen), or None."""
    try:
        return torch.fx.GraphModule(model, _Tracer().trace(model), type(model).__name__)
    except Exception:  # noqa: BLE001  (any tracing failure means: use the fallback)
        return None


def _last_uses(nodes: list[torch.fx.Node]) -> dict[torch.fx.Node, int]:
    index = {n: i for i, n in enumerate(nodes)}
    last: dict[torch.fx.Node, int] = {}
    for n in nodes:
        for user in n.users:
            last[n] = max(last.get(n, -1), index.get(user, len(nodes)))
    return last


class Walk:
    """Every calibration batch's live values at one point of the graph; `inputs(name)` steps to a layer."""

    def __init__(self, gm: torch.fx.GraphModule, batches: Iterable[Any], device: str | torch.device) -> None:
        self.gm = gm
        self.nodes = [n for n in gm.graph.nodes if n.op != "output"]
        self.last = _last_uses(self.nodes)
        self.pos = 0
        self.envs: list[dict[torch.fx.Node, Any]] = []
        self.sizes: list[int] = []
        inputs = forward_inputs(self.nodes)
        if inputs is None:
            raise NetslimError("repair: the traced model must take exactly one input (others need defaults)")
        images, defaults = inputs
        for item in batches:
            x = (item[0] if isinstance(item, (tuple, list)) else item).to(device)
            self.envs.append({images: x, **defaults})
            self.sizes.append(int(x.shape[0]))
        self.pos = max(self.nodes.index(h) for h in (images, *defaults)) + 1

    @torch.no_grad()
    def _run(self, stop: int) -> None:
        interp = torch.fx.Interpreter(self.gm)
        for env in self.envs:
            interp.env = env
            for i in range(self.pos, stop):
                node = self.nodes[i]
                env[node] = interp.run_node(node)
                for arg in node.all_input_nodes:
                    if self.last.get(arg, -1) <= i:
                        env.pop(arg, None)
                if not node.users:
                    env.pop(node, None)
        self.pos = max(self.pos, stop)

    def _call(self, name: str) -> int:
        at = next((i for i in range(self.pos, len(self.nodes))
                   if self.nodes[i].op == "call_module" and self.nodes[i].target == name), None)
        if at is None:
            raise NetslimError(f"repair: layer {name!r} is not called after the walk's current point")
        return at

    def inputs(self, name: str) -> list[torch.Tensor]:
        """The input of layer `name` for every batch (the walk moves to just before the layer's call)."""
        at = self._call(name)
        self._run(at)
        arg = self.nodes[at].args[0]
        return [env[arg] for env in self.envs]

    def call(self, name: str) -> list[tuple[tuple, dict[str, Any]]]:
        """The arguments of module `name`'s call for every batch (the walk moves to just before the call)."""
        at = self._call(name)
        self._run(at)
        node = self.nodes[at]
        return [(tuple(torch.fx.node.map_arg(node.args, env.__getitem__)),
                 dict(torch.fx.node.map_arg(node.kwargs, env.__getitem__))) for env in self.envs]

    def residual(self, name: str) -> tuple[list[torch.Tensor], bool] | None:
        """The other operand of the residual sum that layer `name` feeds, directly or through its BatchNorm, for
        every batch, and whether a BatchNorm sits in between; None when the layer feeds no sum or the other
        operand is computed only after the layer (it is then the one fitted to the sum)."""
        at = self._call(name)
        node, via_bn = self.nodes[at], False
        if len(node.users) == 1 and next(iter(node.users)).op == "call_module":
            node = next(iter(node.users))
            if not isinstance(self.gm.get_submodule(str(node.target)), _BatchNorm):
                return None
            via_bn = True
        if len(node.users) != 1:
            return None
        add = next(iter(node.users))
        if add.target not in ADDS or len(add.args) != 2 or add.kwargs:
            return None
        other = add.args[1] if add.args[0] is node else add.args[0]
        if not isinstance(other, torch.fx.Node) or self.nodes.index(other) >= at:
            return None
        self._run(at)
        if any(other not in env for env in self.envs):
            return None
        return [env[other] for env in self.envs], via_bn

    @staticmethod
    @torch.no_grad()
    def peak_bytes(gm: torch.fx.GraphModule, x: torch.Tensor) -> int:
        """Largest total size of live values during one forward of batch `x`."""
        walk = Walk(gm, [x], x.device)
        peak = 0
        for i in range(walk.pos, len(walk.nodes)):
            walk._run(i + 1)
            live = sum(v.numel() * v.element_size() for v in walk.envs[0].values() if isinstance(v, torch.Tensor))
            peak = max(peak, live)
        return peak


def fits(models: list[torch.fx.GraphModule], x: torch.Tensor, images: int, budget: int = BUDGET_BYTES) -> bool:
    """Whether walking `images` images through every graph keeps its live values within `budget` bytes."""
    per_image = sum(Walk.peak_bytes(gm, x) for gm in models) / max(int(x.shape[0]), 1)
    return per_image * images <= budget
