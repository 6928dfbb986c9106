"""A deep LDA step's cut applied to the current network, and its record in the base model's numbering.

A Plan names the base model's nn.MultiheadAttention, and surgery checks that it does; after a head cut the
current network holds a CutAttention there, whose heads are numbered 0..k-1 among the kept ones. A step (a Plan
in the current numbering) is therefore applied as its channel cuts (surgery's apply_plan) then its head cuts
(surgery.heads.cut_heads, which cuts a CutAttention again), and written in the base numbering by composing its
keep lists, channels and heads alike, onto the earlier steps' (step.compose): the Plan the loop returns, and the
one a step is sized by, apply to the base model.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from torch import nn

from netslim.methods.base import Context
from netslim.methods.lda.step import compose
from netslim.plan import Plan
from netslim.surgery.apply import apply_plan
from netslim.surgery.heads import cut_heads


@dataclass
class Cuts:
    """What the steps so far removed, in the base numbering: kept channels per layer, kept heads per attention."""

    widths: dict[str, int]  # base width of every prunable layer
    counts: dict[str, int]  # base head count of every attention whose heads may go
    keep: dict[str, list[int]] = field(default_factory=dict)
    heads: dict[str, list[int]] = field(default_factory=dict)

    def then(self, step: Plan) -> Cuts:
        """These cuts followed by `step` (a Plan in the numbering of the network they leave)."""
        return replace(self, keep=compose(self.keep, step.keep, self.widths),
                       heads=compose(self.heads, step.heads, self.counts))

    def plan(self, ctx: Context) -> Plan:
        """The Plan for the base model (only what actually loses a channel or a head)."""
        plan = ctx.base_plan("lda")
        plan.keep = {n: sorted(k) for n, k in self.keep.items() if len(k) < self.widths[n]}
        plan.heads = {n: sorted(k) for n, k in self.heads.items() if len(k) < self.counts[n]}
        return plan


def head_counts(model: nn.Module, attentions: list[str]) -> dict[str, int]:
    """Heads of each attention of `attentions` in `model` (the base widths head keeps are composed against)."""
    return {n: int(model.get_submodule(n).num_heads) for n in attentions}


def apply_step(model: nn.Module, step: Plan) -> nn.Module:
    """`model` (changed in place) cut to `step`, a Plan in its own numbering: channels, then whole heads."""
    if step.keep:
        model = apply_plan(model, replace(step, heads={}))
    cut_heads(model, step.heads)
    return model
