"""What CAR prunes and how many of each it keeps: coupled channel groups (filters) and attentions (whole heads).

Both are units of one kind to the greedy loop: a channel group's filters, an attention's heads. They are
pruned one after another in forward order, so each is ranked on the network with the earlier removals
applied. Under a global --target one kept fraction r is shared by every chosen unit (width round(r·C),
heads round(r·H), at least one head) and bisected on the Plan's size; which filters and heads go is then
greedy CAR's choice.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from netslim.cost.targets import bisect
from netslim.errors import NetslimError
from netslim.methods.base import Context
from netslim.methods.common.heads import attentions
from netslim.methods.common.ranking import round_width
from netslim.plan import Plan
from netslim.surgery.depth import call_order
from netslim.surgery.graph import ChannelGroup


@dataclass(frozen=True)
class Unit:
    """One thing pruned greedily: a coupled channel group (its filters) or an attention (its heads)."""

    root: str  # the group root, or the attention's name
    layers: tuple[str, ...]
    width: int  # filters, or heads
    heads: bool = False

    @property
    def kind(self) -> str:
        return "head" if self.heads else "filter"


def _wanted(ctx: Context) -> list[str] | None:
    wanted = ctx.option("layers", None)
    if wanted is None or wanted == "" or wanted == "all":
        return None
    return [n.strip() for n in wanted.split(",")] if isinstance(wanted, str) else [str(n) for n in wanted]


def _attentions(ctx: Context, wanted: list[str] | None) -> list[str]:
    """The attentions whose heads CAR cuts: all cuttable ones, or those named in `layers`; none with heads=false."""
    if not bool(ctx.option("heads", True)):
        return []
    names = attentions(ctx)
    return names if wanted is None else [n for n in names if n in wanted]


def chosen_groups(ctx: Context, skip: tuple[str, ...] = ()) -> list[ChannelGroup]:
    """The coupled groups holding the requested `layers` (all prunable groups by default); names in `skip`
    (attentions whose heads are pruned instead) are not looked for among the groups."""
    groups = ctx.groups()
    wanted = _wanted(ctx)
    if wanted is None:
        return groups
    out: list[ChannelGroup] = []
    for name in wanted:
        if name in skip:
            continue
        g = next((g for g in groups if name in g.layers), None)
        if g is None:
            modules = dict(ctx.model.named_modules())
            why = "no such layer" if name not in modules else "its output channels cannot be pruned"
            raise NetslimError(f"option layers: {name!r} ({why}); prunable: {', '.join(g.root for g in groups)}")
        if g not in out:
            out.append(g)
    order = {g.root: i for i, g in enumerate(groups)}
    return sorted(out, key=lambda g: order[g.root])


def chosen_units(ctx: Context) -> list[Unit]:
    """Channel groups and attentions CAR prunes, in the order the forward pass reaches them."""
    heads = _attentions(ctx, _wanted(ctx))
    units = [Unit(g.root, tuple(g.layers), g.width) for g in chosen_groups(ctx, tuple(heads))]
    if not heads:
        return units  # the groups come in forward order already
    units += [Unit(n, (n,), ctx.model.get_submodule(n).num_heads, True) for n in heads]
    calls = call_order(ctx.model, ctx.example(), (nn.modules.conv._ConvNd, nn.Linear, nn.MultiheadAttention))
    order = {n: i for i, n in enumerate(dict.fromkeys(calls))}  # the rank of each module's first call
    # a timm-style attention is reached when its qkv Linear is
    return sorted(units, key=lambda u: order.get(u.root, order.get(f"{u.root}.qkv", len(order))))


def kept_counts(ctx: Context, units: list[Unit], r: float) -> dict[str, int]:
    """Filters (min_keep, round_to as for any width) or heads (at least one) each unit keeps at fraction r."""
    min_keep, step = int(ctx.option("min_keep", 1)), int(ctx.option("round_to", 1))
    return {u.root: min(u.width, max(1, round(u.width * r))) if u.heads
            else round_width(max(min_keep, round(u.width * r)), u.width, step) for u in units}


def sizing_plan(ctx: Context, units: list[Unit], counts: dict[str, int]) -> Plan:
    """A Plan with the planned counts (the first indices: which ones does not change the size). It carries no
    knob in its meta, so equal counts are equal Plans and a budget search sizes each only once."""
    plan = ctx.base_plan("car")
    for u in units:
        if counts[u.root] < u.width:
            if u.heads:
                plan.heads[u.root] = list(range(counts[u.root]))
            else:
                for name in u.layers:
                    plan.keep[name] = list(range(counts[u.root]))
    return plan


def target_counts(ctx: Context, units: list[Unit]) -> dict[str, int]:
    """Kept filters or heads per unit: `keep_fraction` of each, or one fraction bisected to meet --target."""
    if ctx.target is None:
        return kept_counts(ctx, units, float(ctx.option("keep_fraction", 0.5)))
    plan = bisect(lambda r: sizing_plan(ctx, units, kept_counts(ctx, units, r)), ctx.target, ctx.template(),
                  0.0, 1.0, why=lambda _: _unreachable(ctx, units))
    return {u.root: len(plan.heads[u.root]) if u.heads and u.root in plan.heads
            else len(plan.keep[u.layers[0]]) if not u.heads and u.layers[0] in plan.keep else u.width
            for u in units}


def _unreachable(ctx: Context, units: list[Unit]) -> str:
    """What the smallest CAR network keeps whole: attention, when its heads are not chosen."""
    if any(u.heads for u in units) or not attentions(ctx):
        return ""
    how = "--opt heads=true" if not bool(ctx.option("heads", True)) else "name them in --opt layers"
    return f"the attention heads are kept whole ({how} lets CAR remove them)"
