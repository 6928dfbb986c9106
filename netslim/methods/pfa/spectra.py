"""PFA's analysis: per coupled group, the members' eigenvalue spectra and one elimination order.

Computed once per Context and kept in its AnalysisCache (bench runs pfa-kl and pfa-en on the same
statistics); the widths each variant derives from it are in core.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from netslim.errors import NetslimError
from netslim.methods.base import Context
from netslim.methods.common.selection import group_order, order_scores
from netslim.methods.common.spectral import eigenvalues, energy_width, kl_width
from netslim.methods.common.stats import response_stats


@dataclass
class GroupSpectrum:
    root: str
    width: int
    samples: int
    eigs: list[torch.Tensor]  # one spectrum per member layer
    order: list[int]  # elimination order (first removed first)
    analysable: bool

    def floor(self, min_keep: int, min_fraction: float) -> int:
        return min(self.width, max(min_keep, math.ceil(min_fraction * self.width - 1e-9)))

    def kl_width(self, min_keep: int, min_fraction: float = 0.0) -> int:
        floor = self.floor(min_keep, min_fraction)
        return max(kl_width(e, floor) for e in self.eigs) if self.analysable else self.width

    def energy_width(self, tau: float, min_keep: int, min_fraction: float = 0.0) -> int:
        floor = self.floor(min_keep, min_fraction)
        return max(energy_width(e, tau, floor) for e in self.eigs) if self.analysable else self.width

    def scores(self) -> torch.Tensor:
        return order_scores(self.order)


def spectra(ctx: Context) -> list[GroupSpectrum]:
    """Per coupled group: the members' eigenvalue spectra and PFA's elimination order (cached per
    reduction and selection rule, the two options it depends on)."""
    reduce = ctx.option("reduce", "max")
    strategy = ctx.option("selection", "l1-max")
    if strategy not in ("l1-max", "abs-max"):
        raise NetslimError(f"PFA selection must be l1-max or abs-max, not {strategy!r}")
    key = f"pfa:spectra:{reduce}:{strategy}"
    if key in ctx.cache.derived:
        return ctx.cache.derived[key]
    stats = response_stats(ctx, reduce)
    out = []
    for g in ctx.groups():
        members = [stats[n] for n in g.layers if n in stats]
        if not members:
            continue
        n = min(s.n for s in members)
        eigs = [eigenvalues(s.cov) for s in members]
        out.append(GroupSpectrum(g.root, g.width, n, eigs, group_order(members, strategy), n > g.width))
    ctx.cache.derived[key] = out
    return out
