"""Turn per-channel scores into a Plan: keep the best channels of every coupled group."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from netslim.cost.targets import bisect
from netslim.methods.base import Context
from netslim.plan import Plan
from netslim.surgery.graph import ChannelGroup


def top_k(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k highest scores (ties broken by lower index), sorted."""
    k = max(1, min(int(k), scores.numel()))
    values = scores.tolist()  # Python floats once: indexing the tensor per comparison costs a budget search seconds
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    return sorted(order[:k])


def plan_from_widths(ctx: Context, method: str, scores: dict[str, torch.Tensor],
                     widths: dict[str, int], meta: dict | None = None) -> Plan:
    """Keep, in each group (keyed by root layer), its `widths[root]` best-scored channels."""
    plan = ctx.base_plan(method)
    kept = planned_widths(ctx, widths)
    for g in ctx.groups():
        if g.root in kept:
            keep = top_k(scores[g.root], kept[g.root])
            for name in g.layers:
                plan.keep[name] = keep
    plan.meta.update(meta or {})
    return plan


def planned_widths(ctx: Context, widths: dict[str, int]) -> dict[str, int]:
    """The channels plan_from_widths keeps per cut group (by root): `widths` rounded to `round_to`, at least
    one; groups kept whole are absent. Sizes computed from these equal the Plan's (a budget search needs
    no Plan per step)."""
    step = int(ctx.option("round_to", 1))
    out = {}
    for g in ctx.groups():
        k = round_width(widths.get(g.root, g.width), g.width, step, nearest=ctx.target is not None)
        if k < g.width:
            out[g.root] = max(1, int(k))
    return out


def round_width(k: int, width: int, step: int, nearest: bool = False) -> int:
    """Round a kept width to a multiple of `step` (hardware-friendly), never past the original.

    Up by default (never fewer filters than the method asked for); to the nearest multiple when a
    budget is being met, so that rounding neither eats nor inflates the budget systematically.
    """
    if step <= 1:
        return min(k, width)
    units = math.floor(k / step + 0.5) if nearest else math.ceil(k / step)
    return min(width, max(step, units * step))


def uniform_widths(groups: list[ChannelGroup], ratio: float) -> dict[str, int]:
    """The same kept fraction in every group, at least one channel."""
    return {g.root: max(1, round(g.width * ratio)) for g in groups}


# per channel group (by root) its channels' scores; per attention its heads' scores
Scores = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]


def uniform_heads(head_scores: dict[str, torch.Tensor], ratio: float) -> dict[str, list[int]]:
    """The Plan's `heads`: in every scored attention its round(ratio × heads) best heads, at least one."""
    kept = {n: top_k(s, max(1, round(s.numel() * ratio))) for n, s in head_scores.items()}
    return {n: k for n, k in kept.items() if len(k) < head_scores[n].numel()}


def uniform_plan(ctx: Context, method: str, score: Callable[[Context], Scores]) -> Plan:
    """Uniform channel (and head) ratio, bisected to the target (or `--ratio`), units chosen by `score`."""
    scores, head_scores = score(ctx)
    groups = ctx.groups()

    def make(ratio: float) -> Plan:
        plan = plan_from_widths(ctx, method, scores, uniform_widths(groups, ratio), {"ratio": round(ratio, 6)})
        plan.heads = uniform_heads(head_scores, ratio)
        return plan

    if ctx.target is None:
        return make(float(ctx.option("ratio", 0.5)))
    return bisect(make, ctx.target, ctx.template(), 0.0, 1.0)
