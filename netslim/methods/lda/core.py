"""Task-dependent deep LDA pruning: which neurons of the pre-decision layer separate the task's classes.

The pre-decision layer is the input of the classifier (the last hidden layer, already pooled in the zoo's
networks). Per-class streaming sums of its responses give Fisher's scatters: within-class S_w
(per-class centred), total S_a and between-class S_b = S_a - S_w. The neurons of that layer are nearly
decorrelated, so each neuron j is scored v_j = s_b(j) / s_w(j) (the diagonal form); option
`fisher=eig` solves the full generalised eigenproblem S_b w = λ S_w w instead and scores a neuron by its
share of the discriminants, Σ_d λ_d W_jd² S_w(j, j) (equal to the diagonal score when the scatters are
diagonal). Zero-variance and duplicate neurons score 0. M′, the number of top neurons kept, is the
fewest whose validation accuracy stays within `mprime_tol` of all M neurons, with the features and the
classifier frozen and the dropped neurons replaced by their training mean.

This module holds only that math. The iterative prune / fine-tune loop built on these scores is in
loop.py, the backward trace in trace.py, the registered method in method.py and its report in report.py.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from netslim.errors import NetslimError
from netslim.probe import LayerStats

_F64 = torch.float64


@dataclass
class ClassMoments:
    """Per-class sums of the pre-decision responses: count (K,), sum (K, M), sum of squares (K, M) and,
    for the full eigenproblem, sum of outer products (K, M, M)."""

    count: torch.Tensor
    sum: torch.Tensor
    sq: torch.Tensor
    outer: torch.Tensor | None = None

    @classmethod
    def zeros(cls, num_classes: int, width: int, full: bool = False) -> ClassMoments:
        z = torch.zeros
        return cls(z(num_classes, dtype=_F64), z(num_classes, width, dtype=_F64), z(num_classes, width, dtype=_F64),
                   z(num_classes, width, width, dtype=_F64) if full else None)

    @classmethod
    def from_layer_stats(cls, stats: LayerStats) -> ClassMoments:
        """From probe statistics collected with per_class=True (e.g. methods.stats.response_stats)."""
        cc, cs, co = stats._require_classes()
        return cls(cc.clone(), cs.clone(), torch.diagonal(co, dim1=1, dim2=2).clone(), co.clone())

    def add(self, z: torch.Tensor, labels: torch.Tensor) -> None:
        z = z.detach().reshape(z.shape[0], -1).to("cpu", _F64)
        labels = labels.to("cpu", torch.long).reshape(-1)
        if z.shape[1] != self.sum.shape[1]:
            raise NetslimError(f"pre-decision layer has {z.shape[1]} features, expected {self.sum.shape[1]}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.count.numel()):
            raise NetslimError(f"a label is outside 0..{self.count.numel() - 1}")
        self.count.index_add_(0, labels, torch.ones(len(labels), dtype=_F64))
        self.sum.index_add_(0, labels, z)
        self.sq.index_add_(0, labels, z * z)
        if self.outer is not None:
            for k in labels.unique().tolist():
                zk = z[labels == k]
                self.outer[k].add_(zk.T @ zk)

    @property
    def n(self) -> int:
        return int(round(float(self.count.sum())))

    @property
    def mean(self) -> torch.Tensor:
        return self.sum.sum(0) / self.count.sum().clamp_min(1.0)


def predecision_moments(model: nn.Module, batches: Iterable, classifier: str, num_classes: int,
                        device: str | torch.device = "cpu", full: bool = False) -> ClassMoments:
    """Stream labelled batches through `model` and sum the classifier's inputs per class."""
    head = model.get_submodule(classifier)
    acc: list[ClassMoments] = []
    labels: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple) -> None:
        z = args[0].reshape(args[0].shape[0], -1)
        if not acc:
            acc.append(ClassMoments.zeros(num_classes, z.shape[1], full))
        if not bool(torch.isfinite(z).all()):
            raise NetslimError("the pre-decision layer produced NaN or Inf activations")
        acc[0].add(z, labels[0])

    handle = head.register_forward_pre_hook(hook)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            for x, y in batches:
                labels[:] = [y]
                model(x.to(device))
    finally:
        handle.remove()
        model.train(was_training)
    if not acc or acc[0].n < 2:
        raise NetslimError("LDA needs labelled data: no (or one) image reached the pre-decision layer")
    if int((acc[0].count > 0).sum()) < 2:
        raise NetslimError("LDA needs images of at least two classes")
    return acc[0]


def predecision_features(model: nn.Module, batches: Iterable, classifier: str,
                         device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(features (n, M) float32, labels (n,)) at the classifier's input, for choosing M′ on held-out data."""
    head = model.get_submodule(classifier)
    feats: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda m, args: feats.append(args[0].reshape(args[0].shape[0], -1)
                                                                         .detach().float().cpu()))
    ys = []
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            for x, y in batches:
                model(x.to(device))
                ys.append(y.cpu())
    finally:
        handle.remove()
        model.train(was_training)
    if not feats:
        raise NetslimError("no validation images to choose M′ with")
    return torch.cat(feats), torch.cat(ys)


def _scatter_diag(m: ClassMoments) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Diagonals of the within, between and total scatter (sums, not divided by n)."""
    cnt = m.count.clamp_min(1.0)[:, None]
    within = (m.sq - m.sum * m.sum / cnt).sum(0).clamp_min(0.0)
    present = m.count > 0
    mu_k = m.sum[present] / cnt[present]
    between = (m.count[present, None] * (mu_k - m.mean) ** 2).sum(0)
    return within, between, within + between


def degenerate(m: ClassMoments, rtol: float = 1e-9) -> torch.Tensor:
    """(M,) bool: neurons with zero variance, or duplicates of an earlier neuron (equal per-class sums)."""
    _, _, total = _scatter_diag(m)
    bad = total <= rtol * max(float(total.max()) if total.numel() else 0.0, 1e-300)
    signature = torch.cat([m.sum, m.sq]).T.tolist()  # (M, 2K): equal rows for duplicated columns
    seen: set[tuple[float, ...]] = set()
    for j, row in enumerate(signature):
        if bad[j]:
            continue
        key = tuple(float(f"{v:.9g}") for v in row)
        if key in seen:
            bad[j] = True
        seen.add(key)
    return bad


def fisher_scores(m: ClassMoments | LayerStats, mode: str = "diag", ridge: float = 1e-6) -> torch.Tensor:
    """(M,) Fisher score per pre-decision neuron (higher = separates the classes better)."""
    if isinstance(m, LayerStats):
        m = ClassMoments.from_layer_stats(m)
    if mode not in ("diag", "eig"):
        raise NetslimError(f"fisher must be diag or eig, not {mode!r}")
    within, between, total = _scatter_diag(m)
    bad = degenerate(m)
    scores = torch.zeros_like(total)
    ok = ~bad
    if not bool(ok.any()):
        return scores
    floor = ridge * float(within[ok].mean()) + 1e-300
    if mode == "diag":
        scores[ok] = between[ok] / within[ok].clamp_min(floor)
        return scores
    if m.outer is None:
        raise NetslimError("fisher=eig needs the full per-class scatter (collect with full=True)")
    idx = ok.nonzero().squeeze(1)
    cnt = m.count.clamp_min(1.0)
    sw = (m.outer - m.sum[:, :, None] * m.sum[:, None, :] / cnt[:, None, None]).sum(0)[idx][:, idx]
    present = m.count > 0
    d = (m.sum[present] / cnt[present, None] - m.mean)[:, idx]
    sb = (d.T * m.count[present]) @ d
    sw = (sw + sw.T) / 2 + floor * torch.eye(len(idx), dtype=_F64)
    chol = torch.linalg.cholesky(sw)
    inner = torch.linalg.solve_triangular(chol, torch.linalg.solve_triangular(chol, sb, upper=False).T, upper=False)
    lam, vec = torch.linalg.eigh((inner + inner.T) / 2)
    w = torch.linalg.solve_triangular(chol.T, vec, upper=True)  # Wᵀ S_w W = I
    scores[idx] = (w * w * lam.clamp_min(0.0)).sum(1) * torch.diagonal(sw)
    return scores


def ranking(scores: torch.Tensor) -> torch.Tensor:
    """Neuron indices, best first (ties by lower index)."""
    return torch.tensor(sorted(range(scores.numel()), key=lambda j: (-float(scores[j]), j)), dtype=torch.long)


def mprime_curve(order: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None, mean: torch.Tensor) -> torch.Tensor:
    """(M,) accuracy with the top 1..M neurons of `order` kept and the others set to their `mean`.

    Logits for every M′ at once: a cumulative sum of each neuron's contribution W[:, j] (x_j - mean_j)."""
    weight = weight.detach().float().cpu()
    mean = mean.float().cpu()
    base = weight @ mean + (bias.detach().float().cpu() if bias is not None else 0.0)
    cols = weight[:, order].T  # (M, K)
    correct = torch.zeros(order.numel(), dtype=torch.long)
    chunk = max(1, 2**24 // max(cols.numel(), 1))  # at most ~64 MB of (images, M, K) logits at a time
    for s in range(0, feats.shape[0], chunk):
        dev = (feats[s:s + chunk] - mean)[:, order]  # (b, M)
        logits = base + torch.cumsum(dev[:, :, None] * cols[None], dim=1)  # (b, M, K)
        correct += (logits.argmax(2) == labels[s:s + chunk, None]).sum(0)
    return correct.double() / max(feats.shape[0], 1)


def choose_mprime(curve: torch.Tensor, tol: float, usable: int) -> int:
    """Fewest neurons (at most `usable`, those with a positive score) within `tol` of all M neurons."""
    full = float(curve[-1])
    limit = max(1, min(usable, curve.numel()))
    for k in range(1, limit + 1):
        if float(curve[k - 1]) >= full - tol:
            return k
    return limit
