"""Apply a Plan to a model: depth first, then channel cuts, the class cut, head cuts, then factorization (an
attention whose in_proj or out_proj is factorized is opened first: netslim.surgery.attention).

Channel cuts go through torch-pruning's DependencyGraph, which carries a cut to BatchNorm, the next
layer's inputs, residual adds, concatenations and depthwise convs. Works on the meta device, so a
Plan's size can be computed without weights.
"""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from netslim.errors import NetslimError
from netslim.plan import Plan
from netslim.surgery.attention import attention_of, check_open_calls, check_projections, open_attentions
from netslim.surgery.depth import drop_layers
from netslim.surgery.graph import (
    PRUNABLE,
    ChannelGroup,
    build_graph,
    channel_groups,
    check_forward,
    group_members,
    out_channel_group,
    out_width,
)
from netslim.surgery.heads import check_head_calls, check_heads, cut_heads


def find_classifier(model: nn.Module) -> str:
    """The final Linear layer: the one whose outputs are the class scores."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise NetslimError("model has no nn.Linear classifier; netslim needs one to name the classes")
    return linears[-1]


def example_input(model: nn.Module, plan: Plan) -> torch.Tensor:
    p = next(model.parameters())
    return torch.zeros(1, *plan.input_size, device=p.device, dtype=p.dtype)


def check_plan(plan: Plan, model: nn.Module, groups: list[ChannelGroup] | None = None) -> None:
    """Raise NetslimError for a Plan that cannot apply to `model` (before anything is changed)."""
    modules = dict(model.named_modules())
    for section, names in (("keep", plan.keep), ("drop", plan.drop), ("factorize", plan.factorize)):
        for name in names:
            if (name not in modules or name == "") and not (section == "factorize" and attention_of(name, modules)):
                raise NetslimError(f"plan {section}: unknown layer {name!r} in {plan.arch}")
    for name in plan.drop:
        for other in (*plan.keep, *plan.factorize, *plan.heads):
            if other == name or other.startswith(name + "."):
                raise NetslimError(f"plan: layer {other!r} is kept, factorized or head-cut but {name!r} is dropped")
    for name, idx in plan.keep.items():
        mod = modules[name]
        if not isinstance(mod, PRUNABLE):
            raise NetslimError(f"plan keep: {name!r} is a {type(mod).__name__}, not a Conv2d or Linear")
        if not idx:
            raise NetslimError(f"plan keep: layer {name!r} would have no channels left (keep at least one)")
        width = out_width(mod)
        if len(set(idx)) != len(idx) or min(idx) < 0 or max(idx) >= width:
            raise NetslimError(f"plan keep: indices for {name!r} must be distinct and in 0..{width - 1}")
    check_heads(plan.heads, modules, plan.arch)
    check_projections(plan.factorize, modules)
    if plan.classes is not None:
        if not plan.classes or min(plan.classes) < 0 or max(plan.classes) >= plan.num_classes:
            raise NetslimError(f"plan classes must be a non-empty subset of 0..{plan.num_classes - 1}")
    if groups is not None:
        _check_coupling(plan, groups)


def _check_coupling(plan: Plan, groups: list[ChannelGroup]) -> None:
    grouped = {n for g in groups for n in g.layers}
    for name in plan.keep:
        if name not in grouped:
            raise NetslimError(f"plan keep: the output channels of {name!r} cannot be pruned "
                               "(they are the model's outputs or tied to them)")
    for g in groups:
        kept = [(n, plan.keep[n]) for n in g.layers if n in plan.keep]
        for n, idx in kept[1:]:
            if idx != kept[0][1]:
                raise NetslimError(f"plan keep: coupled layers {kept[0][0]!r} and {n!r} keep different channels; "
                                   f"they share one channel set ({', '.join(g.layers)})")


def apply_plan(model: nn.Module, plan: Plan) -> nn.Module:
    """Reshape `model` in place to the Plan's structure and return it (weights of kept channels survive)."""
    check_plan(plan, model)
    example = example_input(model, plan)
    if plan.heads:
        check_head_calls(model, plan.heads, example)
    check_open_calls(model, plan.factorize, example)
    drop_layers(model, plan.drop, example)
    classifier = find_classifier(model)
    graph = build_graph(model, example)
    groups = channel_groups(model, example, classifier, graph)
    _check_coupling(plan, groups)
    names = {m: n for n, m in model.named_modules()}
    for g in groups:
        kept = next((plan.keep[n] for n in g.layers if n in plan.keep), None)
        if kept is None or len(kept) == g.width:
            continue
        _prune_out(graph, model.get_submodule(g.root), sorted(set(range(g.width)) - set(kept)), names)
    if plan.classes is not None and len(plan.classes) != plan.num_classes:
        drop = sorted(set(range(plan.num_classes)) - set(plan.classes))
        tp.prune_linear_out_channels(model.get_submodule(classifier), drop)
    cut_heads(model, plan.heads)  # after the channel cuts: torch-pruning's graph need not trace a CutAttention
    if plan.factorize:
        from netslim.surgery.factorized import factorize_layers  # lazy: only low-rank plans need it

        open_attentions(model, plan.factorize)  # after the head cuts: a CutAttention is opened
        factorize_layers(model, plan.factorize)
    _check_widths(model, plan)
    check_forward(model, example, f"the network cut to this Plan does not run, so torch-pruning missed a channel "
                  f"coupling in {plan.arch}'s code (a width its forward fixes, as MaxViT's attention reshapes to "
                  f"its input's width); netslim cannot cut these layers")
    return model


def _prune_out(graph: tp.DependencyGraph, module: nn.Module, idxs: list[int], names: dict) -> None:
    group = out_channel_group(graph, module, idxs)
    if not graph.check_pruning_group(group):
        raise NetslimError(f"torch-pruning refuses to cut {names[module]!r} to that width")
    group.prune()


def _check_widths(model: nn.Module, plan: Plan) -> None:
    for name, idx in plan.keep.items():
        if name in plan.factorize:
            continue
        got = out_width(model.get_submodule(name))
        if got != len(idx):
            raise NetslimError(f"surgery left {name!r} with {got} channels instead of {len(idx)}")


__all__ = ["apply_plan", "check_plan", "find_classifier", "example_input", "group_members"]
