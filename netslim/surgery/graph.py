"""Which layers' output channels are coupled, found once with torch-pruning's DependencyGraph.

Methods decide per *group*: a residual add or a depthwise conv ties the output channels of several
layers together, so they must keep the same channel indices. Every Plan is checked against these groups.

Only groups torch-pruning cuts consistently are offered: every layer the cut reaches must be one whose
pruning function keeps the network valid at any width (plain and depthwise convs, Linear, BatchNorm,
LayerNorm on its last axis, affine InstanceNorm, PReLU, bare parameters). A cut reaching a grouped conv
(it needs widths that are multiples of its groups, and torch-pruning's grouped in-channel cut picks the
wrong kernel slices), multi-head attention (widths must divide into heads), a group whose reshapes map a cut
onto more channels of some layer than it has, or any other module is left out, as are layers the forward
pass never calls (e.g. GoogLeNet's auxiliary heads in eval mode).
`group_effects` says how many channels of which layer one cut channel removes, so a Plan's size can be
computed by arithmetic (netslim.cost.sizemodel) instead of by surgery.
"""

from __future__ import annotations

import traceback
from collections import Counter
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.pruner import function as tpf

from netslim.errors import NetslimError
from netslim.surgery.tpwalk import out_channel_group, unchanged_graph

PRUNABLE = (nn.Conv2d, nn.Linear)

# torch-pruning's pruning functions netslim lets a group cut, by (pruner class, function name) -> kind
_KINDS: dict[tuple[type, str], str] = {
    (tpf.ConvPruner, "prune_out_channels"): "conv_out", (tpf.ConvPruner, "prune_in_channels"): "conv_in",
    (tpf.DepthwiseConvPruner, "prune_out_channels"): "depthwise",
    (tpf.LinearPruner, "prune_out_channels"): "linear_out", (tpf.LinearPruner, "prune_in_channels"): "linear_in",
    (tpf.BatchnormPruner, "prune_out_channels"): "norm", (tpf.InstanceNormPruner, "prune_out_channels"): "norm",
    (tpf.GroupNormPruner, "prune_out_channels"): "norm", (tpf.PReLUPruner, "prune_out_channels"): "norm",
    (tpf.LayernormPruner, "prune_out_channels"): "layernorm", (tpf.ParameterPruner, "prune_out_channels"): "param",
}


@dataclass(frozen=True)
class ChannelGroup:
    """Layers whose output channels are cut together (in model order); `width` is their channel count."""

    layers: tuple[str, ...]
    width: int

    @property
    def root(self) -> str:
        return self.layers[0]


@dataclass(frozen=True)
class Effect:
    """Cutting one channel of a group removes `per_channel` entries of `target`'s `kind` axis (`dim` for "param")."""

    target: str  # module name, or parameter name for a bare nn.Parameter
    kind: str  # conv_out | conv_in | depthwise | linear_out | linear_in | norm | layernorm | param
    per_channel: int
    dim: int = 0


def out_width(module: nn.Module) -> int:
    return module.out_channels if isinstance(module, nn.Conv2d) else module.out_features


def build_graph(model: nn.Module, example_input: torch.Tensor,
                ignored: list[nn.Module] | None = None) -> tp.DependencyGraph:
    """torch-pruning's dependency graph (quietly; works on the meta device too).

    A model torch-pruning cannot trace is one NetslimError line, not its traceback."""
    try:
        with torch.enable_grad():  # torch-pruning traces through autograd, also when called under no_grad
            return tp.DependencyGraph().build_dependency(
                model, example_inputs=example_input, ignored_layers=ignored or [], verbose=False
            )
    except NetslimError:
        raise
    except Exception as exc:
        check_forward(model, example_input)
        where = traceback.extract_tb(exc.__traceback__)[-1].name
        detail = " ".join(str(exc).split())[:160]
        raise NetslimError(f"torch-pruning cannot trace the channel dependencies of this model ({type(exc).__name__} "
                           f"in {where}: {detail}); a reshape that mixes channels, such as ShuffleNet's channel "
                           "shuffle, is one cause, so netslim cannot cut its channels") from None


def check_forward(model: nn.Module, example_input: torch.Tensor, what: str | None = None) -> None:
    """A NetslimError (`what`, or a default saying the input shape) when the model itself cannot run the
    example: a wrong input found here is one line, not a traceback from deep inside a later stage."""
    was = model.training
    try:
        with torch.no_grad():
            model.eval()(example_input)
    except Exception as exc:
        detail = " ".join(str(exc).split())[:200]
        what = what or f"the model does not accept an input of shape {tuple(example_input.shape[1:])}"
        raise NetslimError(f"{what}: {detail}") from None
    finally:
        model.train(was)


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


def _kind(dep: tp.Dependency) -> str | None:
    """What `dep` cuts: a kind of _KINDS, "" for a node without tensors, None when the cut is unsafe."""
    target = dep.target.module
    owner, func = getattr(dep.handler, "__self__", None), getattr(dep.handler, "__func__", None)
    kind = _KINDS.get((type(owner), getattr(func, "__name__", "")))
    if isinstance(target, nn.Parameter):
        return kind if kind == "param" else None
    if not isinstance(target, nn.Module):
        return None
    if next(target.parameters(recurse=False), None) is None and next(target.buffers(recurse=False), None) is None:
        return "" if next(target.children(), None) is None else None  # an op node (cat, add, view...) or a leaf
    if isinstance(target, nn.modules.conv._ConvNd):
        if target.transposed or (kind == "depthwise") != (target.groups > 1):
            return None  # grouped but not depthwise: widths must stay multiples of its groups
        if kind == "depthwise" and target.in_channels != target.out_channels:
            return None
    if isinstance(target, nn.GroupNorm) and target.num_groups != 1:
        return None
    if isinstance(target, nn.modules.instancenorm._InstanceNorm) and target.track_running_stats:
        return None  # torch-pruning does not cut its running statistics
    if isinstance(target, nn.PReLU) and target.num_parameters == 1:
        return ""
    if kind == "layernorm" and dep.target.pruning_dim not in (-1, len(target.normalized_shape) - 1):
        return None
    return kind


def _safe(group: tp.Group) -> bool:
    return all(_kind(dep) is not None for dep, _ in group)


def _any_width(graph: tp.DependencyGraph, group: tp.Group, width: int) -> bool:
    """Whether a group found for one of its root's `width` channels scales to all of them: torch-pruning's
    index maps are linear, so a layer that loses n channels per root channel loses n·width for the whole root.
    More than it has means the reshapes map the cut wrongly (its reading of MaxViT's attention)."""
    for dep, idxs in group:
        if graph.is_out_channel_pruning_fn(dep.handler):
            have = graph.get_out_channels(dep.target.module)
        elif graph.is_in_channel_pruning_fn(dep.handler):
            have = graph.get_in_channels(dep.target.module)
        else:
            continue
        if have is not None and len(idxs) * width > have:
            return False
    return True


def channel_groups(model: nn.Module, example_input: torch.Tensor, classifier: str,
                   graph: tp.DependencyGraph | None = None) -> list[ChannelGroup]:
    """Coupled groups of prunable output channels, excluding any group that reaches the classifier's outputs,
    a layer torch-pruning cannot cut to any width (see the module docstring), or layers never called."""
    names = {m: n for n, m in model.named_modules()}
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    graph = graph or build_graph(model, example_input)
    _check_uncalled(model, example_input, graph)
    seen: set[str] = set()
    groups: list[ChannelGroup] = []
    with unchanged_graph(graph):
        for name, module in model.named_modules():
            if not isinstance(module, PRUNABLE) or name == classifier or name in seen:
                continue
            if module not in graph.module2node:
                continue  # not on the forward path (an auxiliary head): left alone
            if isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels:
                continue  # depthwise: its channels follow the layer that feeds it
            group = out_channel_group(graph, module, [0])
            members = sorted(set(group_members(group, names)), key=order.__getitem__)
            seen.update(members)
            if classifier in members or not _safe(group) or not _any_width(graph, group, out_width(module)):
                continue
            groups.append(ChannelGroup(tuple(members), out_width(module)))
    return groups


def _check_uncalled(model: nn.Module, example_input: torch.Tensor, graph: tp.DependencyGraph) -> None:
    """Layers the graph lacks are left alone when the forward pass never uses them (an auxiliary head) or a
    traced module owns them (attention's out_proj); one whose weights the forward reads without calling it
    (Swin's attention passes them to F.linear) would keep input channels a cut removed: the model is refused."""
    modules = dict(model.named_modules())
    uncalled = {n: m for n, m in modules.items() if isinstance(m, PRUNABLE) and m not in graph.module2node
                and not _owned_by_node(n, modules, graph)}
    if not uncalled:
        return
    used = used_parameters(model, example_input)
    for name, m in uncalled.items():
        if any(id(p) in used for p in m.parameters()):
            raise NetslimError(f"layer {name!r} ({type(m).__name__}) is used without being called (its weights go "
                               "straight into a functional op, as in Swin's attention), so torch-pruning cannot "
                               "follow its channels; netslim cannot cut this model")


def _owned_by_node(name: str, modules: dict[str, nn.Module], graph: tp.DependencyGraph) -> bool:
    """Whether a module containing `name` is itself in the graph (nn.MultiheadAttention owns its out_proj)."""
    parts = name.split(".")
    return any(modules[".".join(parts[:i])] in graph.module2node for i in range(1, len(parts)))


def used_parameters(model: nn.Module, example_input: torch.Tensor) -> set[int]:
    """ids of the parameters one forward pass reads, from its autograd graph."""
    was = model.training
    try:
        with torch.enable_grad():
            out = model.eval()(example_input)
    finally:
        model.train(was)
    outs = out if isinstance(out, tuple | list) else [out]
    stack = [t.grad_fn for t in outs if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    seen: set = set()
    used: set[int] = set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            used.add(id(fn.variable))
        stack.extend(f for f, _ in fn.next_functions)
    return used


def group_effects(graph: tp.DependencyGraph, model: nn.Module, groups: list[ChannelGroup]) -> list[list[Effect] | None]:
    """Per group: every tensor-holding layer its cut reaches, with how many entries one cut channel removes.

    None for a group where that number is not the same for every channel (the cut's effect then depends on
    which channels go, not only on how many)."""
    names = {m: n for n, m in model.named_modules()}
    out: list[list[Effect] | None] = []
    with unchanged_graph(graph):
        for group in groups:
            root = model.get_submodule(group.root)
            items = list(out_channel_group(graph, root, list(range(group.width))))
            out.append(_effects(items, group.width, names, graph))
    return out


def _effects(items: list, width: int, names: dict[nn.Module, str], graph: tp.DependencyGraph) -> list[Effect] | None:
    effects: list[Effect] = []
    for item in items:
        kind = _kind(item.dep)
        if kind is None:
            return None
        if not kind:
            continue
        counts = Counter(item.root_idxs)
        per = set(counts.values())
        if len(counts) != width or len(per) != 1:
            return None
        target = item.dep.target.module
        name = graph._param_to_name[target] if isinstance(target, nn.Parameter) else names.get(target)
        if name is None:
            return None
        effects.append(Effect(name, kind, per.pop(), int(item.dep.target.pruning_dim)))
    return effects
