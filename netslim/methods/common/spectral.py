"""Spectral arithmetic shared by PFA and PCA design: eigenvalues, energy cut-off, KL cut-off.

All of it works on a covariance matrix from the probe, so the same statistics serve both methods.
"""

from __future__ import annotations

import math

import torch

INACTIVE_REL = 1e-8  # a filter whose variance is below this fraction of the layer's largest is inactive


def eigenvalues(cov: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a covariance in descending order, clipped at 0 (float64)."""
    vals = torch.linalg.eigvalsh(cov.double())
    return vals.clamp_min(0).flip(0)


def energy_width(eigs: torch.Tensor, tau: float, min_keep: int = 1) -> int:
    """Smallest k whose leading eigenvalues hold a fraction `tau` of the total (PFA-En, PCA)."""
    total = float(eigs.sum())
    if total <= 0:
        return min_keep
    frac = torch.cumsum(eigs, 0) / total
    k = int(torch.searchsorted(frac, torch.tensor(tau - 1e-12, dtype=frac.dtype)).item()) + 1
    return max(min_keep, min(k, eigs.numel()))


def kl_divergence(eigs: torch.Tensor) -> float:
    """KL(p || uniform) of the normalised spectrum: 0 for a flat one, log C for a single eigenvalue."""
    total = float(eigs.sum())
    c = eigs.numel()
    if total <= 0 or c < 2:
        return math.log(c) if c > 1 else 0.0
    p = eigs / total
    nz = p[p > 0]
    return float((nz * torch.log(nz * c)).sum())


def kl_width(eigs: torch.Tensor, min_keep: int = 1) -> int:
    """PFA-KL's parameter-free width: ceil(C (1 - KL / log C))."""
    c = eigs.numel()
    if c < 2:
        return c
    k = math.ceil(c * (1 - kl_divergence(eigs) / math.log(c)) - 1e-9)
    return max(min_keep, min(k, c))


def energy_kept(eigs: torch.Tensor, k: int) -> float:
    total = float(eigs.sum())
    return float(eigs[:k].sum()) / total if total > 0 else 1.0


def inactive(variance: torch.Tensor, rel: float = INACTIVE_REL) -> torch.Tensor:
    """Mask of filters that barely respond (dead ReLUs): removed before any correlated one."""
    top = float(variance.max()) if variance.numel() else 0.0
    return variance <= rel * top if top > 0 else torch.ones_like(variance, dtype=torch.bool)
