"""One-shot least-squares repair after a cut (He et al. 2017 "Channel Pruning"; ThiNet, Luo et al. 2017).

Every layer L whose inputs were cut is refitted, from input to output, so that on calibration images
its output matches the original network's: W′ = argmin ‖Y − X̃′W′‖² + λ‖W′‖², Y = L's output in the
original (pre-BN, L's kept channels), X′ = L's input in the cut network *after the earlier refits*
(im2col patches at `positions` random output positions per image, the same in both networks), and
X̃′ = [X′ 1] when L has a bias or a BN follows (without a bias, the fitted one moves into the BN's
running_mean). Only G = X̃′ᵀX̃′ and P = X̃′ᵀY are kept, per batch summed into float64 (each batch's
product is a GEMM in the network's dtype, float32 for float32 networks); (G + λ·tr(G)/dim·I) W = P is
solved by Cholesky in float64. Grouped convs are one problem per group; depthwise convs need none.

Cost: per layer, one pass over the calibration (and holdout) images through both networks, stopped at
L's input by a hook, so memory does not grow with the number of images; the time is about half a full
forward of both networks per layer. Keeping the current layer's inputs of both networks between layers
(sequential models) would save that, at memory proportional to the images; not done.

Residual networks (`block=True`, the default): a layer that feeds a residual sum (directly or through its
BN) whose other operand is already computed when the layer runs is fitted to the *sum*, not to its own
output: with s the BN's multiplier, its target becomes Y + (R − R′)/s, R and R′ the other operand in the
original and the cut network, so the layer also absorbs what earlier cuts left in the skip path (a block's
conv2 fits the block's output). Other layers (and every layer when the walks cannot be used) fit their own
output.
Attention that lost heads: its out_proj is refitted the same way, to the uncut attention's output (its own,
not a residual sum), from the kept heads' outputs recomputed from the call's query, key and value
(netslim.repair.attention); it is reported as `<attention>.out_proj`.
Layers of a dropped block, factorized layers, layers called twice per forward: reported as skipped.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from netslim.errors import NetslimError
from netslim.plan import Plan
from netslim.repair.attention import head_rows, paired_heads
from netslim.repair.capture import (
    Batches,
    at_positions,
    eval_modes,
    example_batch,
    iterate,
    paired_patches,
    patches,
    restore_modes,
    sample_positions,
    targets,
)
from netslim.repair.layers import Job, find_jobs
from netslim.repair.report import LayerRepair, RefitReport
from netslim.repair.walk import BUDGET_BYTES, Walk, fits, trace


@dataclass
class Moments:
    """Streamed sums of one layer's fit, per conv group: G = X̃ᵀX̃ (g, d, d), P = X̃ᵀY (g, d, m/g), ‖Y‖².

    Their size depends on the layer only, never on how many rows were added.
    """

    gram: torch.Tensor
    cross: torch.Tensor
    yy: float = 0.0
    rows: int = 0
    images: int = 0
    bias: bool = True  # X̃ carries a ones column (last)
    target: str = "layer"  # Y is the layer's own output, or shifted to fit the residual sum it feeds ("block")

    @classmethod
    def zeros(cls, groups: int, inputs: int, outputs: int, bias: bool, device: torch.device) -> Moments:
        d = inputs // groups + int(bias)
        z = torch.zeros(groups, d, d, dtype=torch.float64, device=device)
        return cls(z, torch.zeros(groups, d, outputs // groups, dtype=torch.float64, device=device), bias=bias)

    def add(self, x: torch.Tensor, y: torch.Tensor, images: int) -> None:
        """Rows of cut-network inputs `x` (R × g·d) and original outputs `y` (R × m)."""
        g = self.gram.shape[0]
        xg = x.reshape(x.shape[0], g, -1).transpose(0, 1)
        if self.bias:
            xg = torch.cat([xg, xg.new_ones(g, x.shape[0], 1)], dim=2)
        yg = y.to(xg.dtype).reshape(y.shape[0], g, -1).transpose(0, 1)
        xt = xg.transpose(1, 2)
        self.gram += (xt @ xg).double()
        self.cross += (xt @ yg).double()
        self.yy += float(y.double().pow(2).sum())
        self.rows += x.shape[0]
        self.images += images

    def error(self, w: torch.Tensor) -> float:
        """Relative error ‖Y − X̃W‖/‖Y‖ of weights `w` (g, d, m/g) on the rows summed here."""
        w = w.to(self.gram)
        sq = self.yy - 2 * float((w * self.cross).sum()) + float((w * (self.gram @ w)).sum())
        return (max(sq, 0.0) / self.yy) ** 0.5 if self.yy > 0 else 0.0


def solve(mom: Moments, ridge: float) -> torch.Tensor | None:
    """(G + λ·tr(G)/dim·I)⁻¹ P per group by Cholesky (float64); the ridge grows ×10 while G is not
    positive definite (dead inputs, fewer rows than unknowns); None when G carries no signal."""
    out = []
    for gram, cross in zip(mom.gram, mom.cross, strict=True):
        d = gram.shape[0]
        scale = float(gram.diagonal().sum()) / d
        if not scale > 0:
            return None
        eye = torch.eye(d, dtype=gram.dtype, device=gram.device)
        lam = ridge * scale
        for _ in range(8):
            chol, info = torch.linalg.cholesky_ex(gram + lam * eye)
            if int(info) == 0:
                break
            lam = max(lam * 10, 1e-12 * scale)
        else:
            return None
        out.append(torch.cholesky_solve(cross, chol))
    return torch.stack(out)


def accumulate(original: nn.Module, cut: nn.Module, job: Job, batches: Iterable[Any] | Walks, *,
               positions: int | None, seed: int, device: str | torch.device, bias: bool, block: bool = False
               ) -> Moments:
    """G, P and ‖Y‖² of one consumer layer over `batches` (the cut network as it is now): from stepped walks
    of both networks when given (one forward in all), else by stopping a full forward at the layer. `block`:
    fit the residual sum the layer feeds, where the walks can see it (see module doc)."""
    lo, lc = original.get_submodule(job.name), cut.get_submodule(job.name)
    groups = lc.groups if isinstance(lc, nn.Conv2d) else 1
    mom: Moments | None = None
    pairs: Iterable[tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None]]
    if job.attention is not None:  # out_proj: all heads' outputs in the original, the kept ones in the cut
        pairs = batches.heads(job.attention) if isinstance(batches, Walks) else \
            ((*p, None) for p in paired_heads(original, cut, job.attention, batches, device=device))
    elif isinstance(batches, Walks):
        pairs = batches.patches(lo, lc, job, positions, seed, block)
    else:
        pairs = ((*p, None) for p in paired_patches(original, cut, job.name, batches, positions=positions,
                                                     seed=seed, device=device))
    for xo, xc, n, shift in pairs:
        y = targets(lo, xo, job.out_idx)
        if shift is not None:
            y = y + shift.to(y)
        if mom is None:
            mom = Moments.zeros(groups, xc.shape[1], y.shape[1], bias, xc.device)
            mom.target = "layer" if shift is None else "block"
        mom.add(xc, y, n)
    if mom is None:
        raise NetslimError("repair needs calibration images; the batches were empty")
    return mom


def fits_bias(layer: nn.Module, job: Job) -> bool:
    return layer.bias is not None or job.bn is not None


def current(layer: nn.Module, job: Job) -> torch.Tensor:
    """The cut layer's weights as (g, d[+1], m/g); the bias row is 0 when a fitted bias would go to the BN."""
    g = layer.groups if isinstance(layer, nn.Conv2d) else 1
    m = layer.weight.shape[0]
    w = layer.weight.detach().double().reshape(g, m // g, -1).transpose(1, 2)
    if not fits_bias(layer, job):
        return w
    b = layer.bias.detach().double() if layer.bias is not None else w.new_zeros(m)
    return torch.cat([w, b.reshape(g, 1, m // g)], dim=1)


@torch.no_grad()
def write(layer: nn.Module, job: Job, w: torch.Tensor) -> None:
    """Set the layer's weight (and bias, or fold the bias into the following BN's running_mean)."""
    g, _, per = w.shape
    d = layer.weight[0].numel()
    layer.weight.copy_(w[:, :d, :].transpose(1, 2).reshape(layer.weight.shape).to(layer.weight))
    if w.shape[1] == d:
        return
    b = w[:, d, :].reshape(g * per)
    if layer.bias is not None:
        layer.bias.copy_(b.to(layer.bias))
    else:
        job.bn.running_mean.sub_(b.to(job.bn.running_mean))


def lsq_refit(original: nn.Module, cut: nn.Module, batches: Batches, *, positions: int | None = 16,
              ridge: float = 1e-4, seed: int = 0, device: str | torch.device = "cpu", holdout: Batches | None = None,
              plan: Plan | None = None, layers: list[str] | None = None, walk: bool = True,
              walk_budget: int = BUDGET_BYTES, block: bool = True) -> RefitReport:
    """Refit, in place and in forward order, every layer of `cut` whose inputs were cut (see module doc).

    `batches` / `holdout`: callables returning fresh iterables of (images, labels) (re-iterable objects
    work too); errors before/after are measured on `holdout` when given (and a refit that does not lower
    the held-out error is not kept), else on the calibration images. `positions=None`: all positions.
    `plan`: where the kept output channels come from (else matched in the weights). `layers`: only these.
    `block`: fit residual sums where possible (module doc). `walk`: step both networks' traced graphs from
    layer to layer over all images (netslim.repair.walk; one forward pass in all) where they trace and their
    activations fit in `walk_budget` bytes. Both networks must be on `device`.
    """
    t_start = time.perf_counter()
    report = RefitReport("lsq", positions=positions, ridge=ridge)
    saved = eval_modes(original, cut)
    try:
        example = example_batch(batches, device).clone()  # not a view that keeps a whole batch alive
        jobs = find_jobs(original, cut, example, plan, layers)
        fit_src, hold_src = stepped(original, cut, batches, holdout, example, device, walk_budget) if walk \
            else (None, None)
        report.walked = fit_src is not None
        for i, job in enumerate(jobs):
            kw = {"positions": positions, "seed": seed * 1_000_003 + i, "device": device, "block": block}
            report.layers.append(_refit(original, cut, job, fit_src or batches,
                                        hold_src if fit_src is not None else holdout, report, ridge, kw))
    finally:
        restore_modes(saved)
    report.seconds = time.perf_counter() - t_start
    return report


def _refit(original: nn.Module, cut: nn.Module, job: Job, batches: Batches | Walks, holdout: Batches | Walks | None,
           report: RefitReport, ridge: float, kw: dict[str, Any]) -> LayerRepair:
    if job.reason is not None:
        return LayerRepair(job.name, False, job.reason)
    t0 = time.perf_counter()
    layer = cut.get_submodule(job.name)
    bias = fits_bias(layer, job)
    fit = accumulate(original, cut, job, _source(batches), bias=bias, **kw)
    test = accumulate(original, cut, job, _source(holdout), bias=bias, **kw) if holdout is not None else fit
    report.images, report.holdout_images = fit.images, test.images if holdout is not None else 0
    dim = fit.gram.shape[-1]
    w = solve(fit, ridge)
    if w is None:
        return LayerRepair(job.name, False, "no signal in its inputs", rows=fit.rows, dim=dim,
                           seconds=time.perf_counter() - t0)
    before, after = test.error(current(layer, job)), test.error(w)
    kept = holdout is None or after <= before
    if kept:
        write(layer, job, w)
    return LayerRepair(job.name, kept, None if kept else "no gain on held-out images", before,
                       after if kept else before, fit.rows, dim, time.perf_counter() - t0, fit.target)


def _source(batches: Batches | Walks) -> Iterable[Any] | Walks:
    return batches if isinstance(batches, Walks) else iterate(batches)


class Walks:
    """Both networks walked in step over one image set (netslim.repair.walk)."""

    def __init__(self, original: Walk, cut: Walk) -> None:
        self.original, self.cut = original, cut

    def heads(self, attention: str) -> Iterable[tuple[torch.Tensor, torch.Tensor, int, None]]:
        """Per batch, the head outputs of `attention` in both networks (netslim.repair.attention.head_rows)."""
        ao, ac = self.original.gm.get_submodule(attention), self.cut.gm.get_submodule(attention)
        calls = zip(self.original.call(attention), self.cut.call(attention), self.original.sizes, strict=True)
        for (args_o, kw_o), (args_c, kw_c), n in calls:
            yield head_rows(ao, args_o, kw_o), head_rows(ac, args_c, kw_c), n, None

    def patches(self, lo: nn.Module, lc: nn.Module, job: Job, positions: int | None, seed: int, block: bool
                ) -> Iterable[tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None]]:
        """Per batch, the layer's input patches in both networks at the same drawn positions (as paired_patches),
        and with `block`, the shift of its target that makes it fit the residual sum it feeds (else None)."""
        gen = torch.Generator().manual_seed(seed)
        res = (self.original.residual(job.name), self.cut.residual(job.name)) if block else (None, None)
        usable = res[0] is not None and res[1] is not None and (job.bn is not None or not res[1][1])
        scale = bn_scale(job.bn) if usable and job.bn is not None else None
        xs = zip(self.original.inputs(job.name), self.cut.inputs(job.name), self.original.sizes, strict=True)
        for k, (xo, xc, n) in enumerate(xs):
            idx = sample_positions(lo, xo, positions, gen)
            shift = None
            if usable:
                shift = at_positions(res[0][0][k], idx)[:, job.out_idx] - at_positions(res[1][0][k], idx)
                shift = shift if scale is None else shift / scale
            yield patches(lo, xo, idx), patches(lc, xc, idx), n, shift


def bn_scale(bn: nn.Module) -> torch.Tensor:
    """A BatchNorm's per-channel multiplier in eval mode; ∞ where it is ~0 (the channel's target is not moved)."""
    a = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        a = a * bn.weight.detach()
    return torch.where(a.abs() > 1e-8, a, torch.full_like(a, float("inf")))


def stepped(original: nn.Module, cut: nn.Module, batches: Batches, holdout: Batches | None, example: torch.Tensor,
            device: str | torch.device, budget: int = BUDGET_BYTES) -> tuple[Walks | None, Walks | None]:
    """Walks of both networks over the calibration (and held-out) images, or (None, None) when a network does
    not trace or all their activations would not fit in memory."""
    gms = trace(original), trace(cut)
    if gms[0] is None or gms[1] is None:
        return None, None
    sets = [list(iterate(batches))] + ([list(iterate(holdout))] if holdout is not None else [])
    images = sum(int((b[0] if isinstance(b, (tuple, list)) else b).shape[0]) for s in sets for b in s)
    if not fits(list(gms), example, images, budget):
        return None, None
    walks = [Walks(Walk(gms[0], s, device), Walk(gms[1], s, device)) for s in sets]
    return walks[0], (walks[1] if holdout is not None else None)
