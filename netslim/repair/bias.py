"""Bias compensation: the cheap repair. What the cut took away on average moves into the consumer's bias.

For each consumer L (forward order) the mean residual r̄ = E[Y − Ŷ] of its kept outputs (Y: original
network, Ŷ: cut network with the compensations so far) is added to L's bias, or subtracted from the
following BN's running_mean when L has none. It is the least-squares fit of the bias alone with the
weights fixed, so it restores a removed constant channel exactly, and it costs one pass per layer
without any Gram matrix: the state is two vectors of L's output width. Used when repair=bias and for
layers the least-squares refit skipped.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from netslim.plan import Plan
from netslim.repair.attention import paired_heads
from netslim.repair.capture import Batches, eval_modes, example_batch, iterate, paired_patches, restore_modes, targets
from netslim.repair.layers import Job, find_jobs
from netslim.repair.report import LayerRepair, RefitReport


class _Residual:
    """Σ r, Σ ‖r‖², ‖Y‖² and rows of r = Y − Ŷ over the batches seen."""

    def __init__(self) -> None:
        self.sum: torch.Tensor | None = None
        self.sq = self.yy = 0.0
        self.rows = self.images = 0

    def add(self, r: torch.Tensor, y: torch.Tensor, images: int) -> None:
        s = r.double().sum(0)
        self.sum = s if self.sum is None else self.sum + s
        self.sq += float(r.double().pow(2).sum())
        self.yy += float(y.double().pow(2).sum())
        self.rows += r.shape[0]
        self.images += images

    def error(self, shift: torch.Tensor | None = None) -> float:
        """Relative error after adding `shift` to every output: ‖r − δ‖² = Σ‖r‖² − 2δ·Σr + n‖δ‖²."""
        sq = self.sq
        if shift is not None and self.sum is not None:
            sq += -2 * float(shift @ self.sum) + self.rows * float(shift @ shift)
        return (max(sq, 0.0) / self.yy) ** 0.5 if self.yy > 0 else 0.0


def _outputs(layer: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """The cut layer's outputs at its input patches `rows` (bias included)."""
    return targets(layer, rows, torch.arange(layer.weight.shape[0], device=rows.device))


def residuals(original: nn.Module, cut: nn.Module, job: Job, batches: Iterable[Any], *, positions: int | None,
              seed: int, device: str | torch.device) -> _Residual:
    lo, lc = original.get_submodule(job.name), cut.get_submodule(job.name)
    acc = _Residual()
    pairs = paired_heads(original, cut, job.attention, batches, device=device) if job.attention is not None else \
        paired_patches(original, cut, job.name, batches, positions=positions, seed=seed, device=device)
    for xo, xc, n in pairs:
        y = targets(lo, xo, job.out_idx)
        acc.add(y - _outputs(lc, xc), y, n)
    return acc


def compensate_bias(original: nn.Module, cut: nn.Module, batches: Batches, *, positions: int | None = 16,
                    seed: int = 0, device: str | torch.device = "cpu", holdout: Batches | None = None,
                    plan: Plan | None = None, layers: list[str] | None = None) -> RefitReport:
    """Move each consumer's mean output shift into its bias or its BN's running_mean (in place).

    Same arguments as `lsq_refit`; `layers` restricts it (e.g. to the layers a refit skipped).
    """
    t_start = time.perf_counter()
    report = RefitReport("bias", positions=positions)
    saved = eval_modes(original, cut)
    try:
        jobs = find_jobs(original, cut, example_batch(batches, device), plan, layers)
        for i, job in enumerate(jobs):
            kw = {"positions": positions, "seed": seed * 1_000_003 + i, "device": device}
            report.layers.append(_compensate(original, cut, job, batches, holdout, report, kw))
    finally:
        restore_modes(saved)
    report.seconds = time.perf_counter() - t_start
    return report


@torch.no_grad()
def _compensate(original: nn.Module, cut: nn.Module, job: Job, batches: Batches, holdout: Batches | None,
                report: RefitReport, kw: dict[str, Any]) -> LayerRepair:
    if job.reason is not None:
        return LayerRepair(job.name, False, job.reason)
    layer = cut.get_submodule(job.name)
    if layer.bias is None and job.bn is None:
        return LayerRepair(job.name, False, "no bias or BatchNorm to take the shift")
    t0 = time.perf_counter()
    fit = residuals(original, cut, job, iterate(batches), **kw)
    test = residuals(original, cut, job, iterate(holdout), **kw) if holdout is not None else fit
    report.images, report.holdout_images = fit.images, test.images if holdout is not None else 0
    shift = fit.sum / max(fit.rows, 1)
    if layer.bias is not None:
        layer.bias.add_(shift.to(layer.bias))
    else:
        job.bn.running_mean.sub_(shift.to(job.bn.running_mean))
    return LayerRepair(job.name, True, None, test.error(), test.error(shift), fit.rows, 1,
                       time.perf_counter() - t0)
