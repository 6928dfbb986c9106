"""Attention heads as units a method chooses: which attention (nn.MultiheadAttention, timm-style) may lose
heads, and the spectrum of their outputs with PFA's order of removal (PFA and PCA count heads on it).

A head is cut whole (netslim.surgery.heads), so a spectral rule (PFA's, PCA's) is applied to the block's
concatenated head outputs (the out-projection's input, num_heads × head_dim features, reduced over tokens as
the MLP units are) and its kept dimension d is rounded up to heads: ceil(d / head_dim), at least the floor.
Which heads is PFA's filter selection with heads as the units; see head_order for the exact rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from netslim.data import ImageSet, batches
from netslim.methods.base import Context
from netslim.methods.common.selection import elimination_order
from netslim.methods.common.spectral import eigenvalues, energy_width, inactive, kl_width
from netslim.probe import LayerStats, head_stats
from netslim.surgery.heads import attention_calls, head_cuttable


@dataclass
class HeadSpectrum:
    name: str  # the attention
    heads: int
    head_dim: int
    samples: int
    eigs: torch.Tensor  # spectrum of the concatenated head outputs (num_heads × head_dim values)
    order: list[int]  # head elimination order (first removed first)
    analysable: bool  # more samples than features; else the heads are kept whole, as PFA keeps such a layer

    def floor(self, min_fraction: float) -> int:
        return min(self.heads, max(1, math.ceil(min_fraction * self.heads - 1e-9)))

    def count(self, dims: int, min_fraction: float) -> int:
        """Heads that hold `dims` dimensions of the spectrum: ceil(dims / head_dim), floored, at most all."""
        if not self.analysable:
            return self.heads
        return min(self.heads, max(self.floor(min_fraction), math.ceil(dims / self.head_dim)))

    def kl_count(self, min_fraction: float = 0.0) -> int:
        return self.count(kl_width(self.eigs), min_fraction)

    def energy_count(self, tau: float, min_fraction: float = 0.0) -> int:
        return self.count(energy_width(self.eigs, tau), min_fraction)

    def keep(self, k: int) -> list[int]:
        return sorted(self.order[self.heads - k:])


def head_order(stats: LayerStats, heads: int, strategy: str = "l1-max") -> list[int]:
    """Heads in the order PFA drops them: PFA's filter selection (elimination_order) with heads as the units.

    First the inactive heads (summed output variance ≤ 1e-8 × the largest head's). Then, on the heads' pairwise
    RV coefficients of the Pearson correlation R of the concatenated outputs, RV(i, j) = ‖R_ij‖²_F /
    (‖R_ii‖_F ‖R_jj‖_F) with R_ij the head_dim × head_dim block of heads i and j: the matrix analogue of |r|, 1
    when one head's outputs are a linear image of the other's (a copy), near 0 when unrelated. L1-Max removes
    the head with the largest summed RV to the heads left (Abs-Max: of the most similar pair, the one with the
    larger second-largest RV), so a duplicated head goes before either original is touched.
    """
    d = stats.channels // heads
    blocks = stats.corr.double().view(heads, d, heads, d).transpose(1, 2)  # [i, j] = R_ij
    f = blocks.pow(2).sum((-2, -1))
    norms = f.diagonal().sqrt()
    rv = f / torch.outer(norms, norms).clamp_min(1e-300)
    dead = inactive(stats.variance.view(heads, d).sum(1))
    return elimination_order(rv, dead, strategy)


def attentions(ctx: Context) -> list[str]:
    """The model's attention whose heads netslim can cut: more than one head, one unmasked call."""
    return cuttable_attentions(ctx.model, ctx.example())


def cuttable_attentions(model: nn.Module, example: torch.Tensor) -> list[str]:
    """attentions() for a bare model and one example input."""
    found = [n for n, m in model.named_modules() if head_cuttable(m) and m.num_heads > 1]
    if not found:
        return []
    calls = attention_calls(model, found, example)
    return [n for n in found if calls.get(n) == (1, False)]


def head_spectra(ctx: Context, reduce: str, strategy: str = "l1-max", data: ImageSet | None = None
                 ) -> list[HeadSpectrum]:
    """Per cuttable attention its spectrum and head elimination order, on `data` (default: the calibration
    images) with head outputs reduced over tokens by `reduce` (cached per reduction, selection and image count)."""
    data = data if data is not None else ctx.calib
    assert data is not None  # the channel statistics pass, run first, refuses a missing set
    key = f"heads:spectra:{reduce}:{strategy}:{len(data.labels)}"
    if key in ctx.cache.derived:
        return ctx.cache.derived[key]
    names = attentions(ctx)
    out: list[HeadSpectrum] = []
    if names:
        stats_key = f"heads:{reduce}:{len(data.labels)}"
        if stats_key not in ctx.cache.stats:
            ctx.cache.stats[stats_key] = head_stats(ctx.model, batches(data, ctx.batch_size, device=ctx.device),
                                                    names, reduce, ctx.device)
            ctx.cache.passes.append(stats_key)
        for n in names:
            mha, s = ctx.model.get_submodule(n), ctx.cache.stats[stats_key][n]
            out.append(HeadSpectrum(n, mha.num_heads, mha.head_dim, s.n, eigenvalues(s.cov),
                                    head_order(s, mha.num_heads, strategy), s.n > s.channels))
    ctx.cache.derived[key] = out
    return out


def planned_heads(specs: list[HeadSpectrum], counts: dict[str, int]) -> dict[str, list[int]]:
    """The Plan's `heads` section: the kept heads of every attention that loses one."""
    return {s.name: s.keep(counts[s.name]) for s in specs if counts[s.name] < s.heads}
