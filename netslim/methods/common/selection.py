"""PFA's filter selection: which filters to drop once the width is known (correlation "distillation").

The greedy removal is nested (each step depends only on the filters still there), so one full
elimination order serves every width: keeping k filters = dropping the first C - k of the order.
"""

from __future__ import annotations

import torch

from netslim.methods.common.spectral import inactive
from netslim.probe import LayerStats


def group_order(members: list[LayerStats], strategy: str = "l1-max") -> list[int]:
    """Elimination order of a coupled group (PFA, and PCA design's channel choice): one order for all its
    layers, on their mean |correlation|; a filter counts as inactive only if it is in every member."""
    corr = torch.stack([s.corr.abs() for s in members]).mean(0)
    dead = torch.stack([inactive(s.variance) for s in members]).all(0)
    return elimination_order(corr, dead, strategy)


def order_scores(order: list[int]) -> torch.Tensor:
    """Per-filter scores from an elimination order (first removed scores 0), for ranking.top_k."""
    s = torch.empty(len(order))
    s[order] = torch.arange(len(order), dtype=s.dtype)
    return s


def elimination_order(corr: torch.Tensor, dead: torch.Tensor, strategy: str = "l1-max") -> list[int]:
    """Filters in the order they would be removed: inactive first, then by correlation."""
    c = corr.shape[0]
    r = corr.abs().double().clone()
    r.fill_diagonal_(0)
    alive = torch.ones(c, dtype=torch.bool)
    order = [int(i) for i in dead.nonzero().squeeze(1)]
    alive[order] = False
    sums = r[:, alive].sum(1)  # summed |R| of each filter to the alive ones
    while int(alive.sum()) > 1:
        j = _l1_max(r, sums, alive) if strategy == "l1-max" else _abs_max(r, alive)
        alive[j] = False
        sums -= r[:, j]
        order.append(j)
    order += alive.nonzero().squeeze(1).tolist()
    return order


def select_filters(corr: torch.Tensor, dead: torch.Tensor, k: int, strategy: str = "l1-max") -> list[int]:
    """The `k` filters PFA keeps, sorted."""
    order = elimination_order(corr, dead, strategy)
    return sorted(order[len(order) - k:])


def _l1_max(r: torch.Tensor, sums: torch.Tensor, alive: torch.Tensor) -> int:
    """The alive filter with the largest summed |correlation| (ties: largest single coefficient)."""
    s = torch.where(alive, sums, torch.tensor(-1.0, dtype=sums.dtype))
    top = float(s.max())
    tied = torch.nonzero(alive & (s >= top - 1e-12 * max(1.0, top))).squeeze(1)
    if tied.numel() == 1:
        return int(tied[0])
    peak = r[tied][:, alive].max(1).values
    return int(tied[peak.argmax()])


def _abs_max(r: torch.Tensor, alive: torch.Tensor) -> int:
    """Of the most correlated pair, the member whose second-largest correlation is larger."""
    idx = alive.nonzero().squeeze(1)
    sub = r[idx][:, idx]
    a, b = divmod(int(sub.argmax()), sub.shape[0])
    if sub.shape[0] < 3:
        return int(idx[a])
    second = sub.topk(2, dim=0).values[1]
    return int(idx[a] if second[a] >= second[b] else idx[b])
