"""torch-pruning's group walk as netslim runs it: index maps computed once while nothing is cut, and cuts
compared as sets of indices, so that a network with many reshapes (MaxViT) is walked in seconds."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch_pruning as tp
from torch import nn
from torch_pruning.dependency import index_mapping as tp_index_mapping


@contextlib.contextmanager
def unchanged_graph(graph: tp.DependencyGraph) -> Iterator[None]:
    """Inside this block nothing is cut, so torch-pruning's index maps (concat offsets, flatten strides) need not
    be recomputed on every get_pruning_group: that recomputation is O(graph) per group, most of the time it
    takes to group a DenseNet. They are computed once on entry, and recomputed as usual after the block."""
    tp_index_mapping.update_index_mapping(graph)
    original = tp_index_mapping.update_index_mapping
    tp_index_mapping.update_index_mapping = lambda g: None if g is graph else original(g)
    try:
        yield
    finally:
        tp_index_mapping.update_index_mapping = original


def _set_compared_ops() -> Callable[[tp.Group, tp.Dependency, list], bool]:
    """torch-pruning's Group.has_pruning_op, with index lists compared as sets: its reshape mappings return
    indices in set order, so the same cut reached along another path looked new and was walked again (a
    MaxViT's channel groups took more than 25 minutes to find; 7 s with this). Each list's set is made once."""
    sets: dict[int, tuple[list, frozenset]] = {}  # id -> (the list, kept alive so its id stays its own; its set)

    def as_set(idxs: list) -> frozenset:
        if id(idxs) not in sets:
            sets[id(idxs)] = (idxs, frozenset(idxs))
        return sets[id(idxs)][1]

    def has_pruning_op(self: tp.Group, dep: tp.Dependency, idxs: list) -> bool:
        return any(have.target == dep.target and have.handler == dep.handler and len(have_idxs) == len(idxs)
                   and as_set(have_idxs) == as_set(idxs) for have, have_idxs in self)

    return has_pruning_op


def out_channel_group(graph: tp.DependencyGraph, module: nn.Module, idxs: list[int]) -> tp.Group:
    """torch-pruning's group that cuts output channels `idxs` of `module` (a Conv2d or Linear), found with
    index lists compared as sets (`_set_compared_ops`)."""
    handler = tp.prune_conv_out_channels if isinstance(module, nn.Conv2d) else tp.prune_linear_out_channels
    original = tp.Group.has_pruning_op
    tp.Group.has_pruning_op = _set_compared_ops()  # type: ignore[method-assign]
    try:
        return graph.get_pruning_group(module, handler, idxs=idxs)
    finally:
        tp.Group.has_pruning_op = original  # type: ignore[method-assign]
