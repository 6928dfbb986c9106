"""One step of the deep LDA loop on the current network: analyse it (Fisher scores, M′, traced utility),
cut it at a threshold η, and repair the cut (BatchNorm statistics, classifier bias) before fine-tuning.

Attention heads are units like a layer's channels: a head's utility is the sum of the traced utilities of its
head_dim features at out_proj's input (trace.py; a head goes whole, so its features count together), and in
every attention the heads below η·std(non-zero head utilities) go, at least one kept.

The paper measures η·std from zero: behind a rectifier a useless unit traces to ~0. Behind a smooth activation
(GELU, SiLU) every unit traces well above 0 (a ViT's MLP units sit 1.6–2.1 std above zero), so η·std from zero
is a cliff that takes whole layers at once; there, and for heads, the threshold is measured from the group's
smallest utility (option threshold_origin, auto by default).

loop.py strings the steps together; keeping them here lets each be tested and benchmarked alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from netslim.data import ImageSet, batches, calibration_subset
from netslim.errors import NetslimError
from netslim.methods.base import Context
from netslim.methods.lda.core import (
    choose_mprime,
    fisher_scores,
    mprime_curve,
    predecision_features,
    predecision_moments,
    ranking,
)
from netslim.methods.lda.options import LoopOptions
from netslim.methods.lda.trace import trace
from netslim.plan import Plan
from netslim.probe import response_modules


@dataclass
class LdaAnalysis:
    """What one step measured on the current network."""

    scores: torch.Tensor
    mprime: int
    curve: torch.Tensor
    utility: dict[str, torch.Tensor]  # group root -> (width,) utility
    mean: torch.Tensor  # (M,) training mean of the pre-decision neurons
    heads: dict[str, torch.Tensor] = field(default_factory=dict)  # attention -> (num_heads,) utility
    smooth: set[str] = field(default_factory=set)  # groups with a member behind a smooth activation (GELU, SiLU)


def analyse_model(sub: Context, o: LoopOptions, val_feats: tuple[torch.Tensor, torch.Tensor],
                  attentions: Sequence[str] = ()) -> LdaAnalysis:
    """Fisher scores, M′ on validation features, per-group traced utility of the current model and, for each
    attention of `attentions`, per-head utility."""
    model, classifier, device = sub.model, sub.classifier, sub.device
    assert sub.calib is not None
    moments = predecision_moments(model, batches(sub.calib, sub.batch_size, device=device), classifier,
                                  sub.num_classes, device, full=o.fisher == "eig")
    scores = fisher_scores(moments, o.fisher)
    order = ranking(scores)
    head = model.get_submodule(classifier)
    curve = mprime_curve(order, *val_feats, head.weight, getattr(head, "bias", None), moments.mean)
    usable = int((scores > 0).sum())
    mprime = min(o.mprime, usable) if o.mprime > 0 else choose_mprime(curve, o.mprime_tol, usable)
    mask = torch.zeros(scores.numel())
    mask[order[:mprime]] = 1.0
    images = trace_set(sub.calib, o.trace_images)
    points = response_modules(model, sub.example(), [n for g in sub.groups() for n in g.layers])
    util = trace(model, (x for x, _ in batches(images, 64, device=device)), mask, classifier, points, device,
                 attentions, o.head_tokens)
    utility = {}
    for g in sub.groups():
        members = [util[n] for n in g.layers if n in util]
        if members:
            utility[g.root] = torch.stack(members).amax(0)
    heads = {n: util[n].view(model.get_submodule(n).num_heads, -1).sum(1) for n in attentions if n in util}
    mods = dict(model.named_modules())
    smooth = {g.root for g in sub.groups() if any(points[n].act is not None and not isinstance(
        mods[points[n].act], (nn.ReLU, nn.ReLU6)) for n in g.layers if n in points)}
    return LdaAnalysis(scores, mprime, curve, utility, moments.mean, heads, smooth)


def trace_set(data: ImageSet, per_class: int) -> ImageSet:
    """The first `per_class` images of every class (data is already a random stratified subset)."""
    idx = [i for k in range(len(data.classes))
           for i in (data.labels == k).nonzero().flatten()[:per_class].tolist()]
    if not idx:
        raise NetslimError("no labelled images to trace utility with")
    return data.subset(sorted(idx))


def threshold_keep(utility: torch.Tensor, eta: float, min_keep: int, origin: str = "zero") -> list[int]:
    """Channels whose utility is at least η·std(non-zero utilities) above `origin`: zero, or the group's smallest
    utility (min; zero again when a unit traces to nothing). The unit at the origin goes for any η > 0."""
    u = utility.double()
    nz = u[u > 0]
    thr = eta * float(nz.std()) if nz.numel() > 1 else 0.0
    if origin == "min" and u.numel() > 0:
        thr += float(u.min())
    keep = (u >= thr) & (u > 0) if eta > 0 else torch.ones_like(u, dtype=torch.bool)
    if int(keep.sum()) < min_keep:
        order = sorted(range(u.numel()), key=lambda j: (-float(u[j]), j))[:min_keep]
        keep = torch.zeros_like(keep)
        keep[order] = True
    return keep.nonzero().flatten().tolist()


def _origin(o: LoopOptions, smooth: bool) -> str:
    """Where a unit's threshold is measured from: the option, or under auto the group's smallest utility for
    units behind a smooth activation and for heads (none traces to ~0), zero (the paper's) for rectified ones."""
    if o.threshold_origin != "auto":
        return o.threshold_origin
    return "min" if smooth else "zero"


def plan_at(sub: Context, a: LdaAnalysis, eta: float, o: LoopOptions) -> Plan:
    """Plan for the *current* model (its channel and head numbering) at threshold η."""
    plan = sub.base_plan("lda")
    for g in sub.groups():
        if g.root not in a.utility:
            continue
        keep = threshold_keep(a.utility[g.root], eta, min(o.min_keep, g.width), _origin(o, g.root in a.smooth))
        if len(keep) < g.width:
            for name in g.layers:
                plan.keep[name] = keep
    for name, u in a.heads.items():
        kept = threshold_keep(u, eta, 1, _origin(o, True))
        if len(kept) < u.numel():
            plan.heads[name] = kept
    return plan


# ---------------------------------------------------------------- repairing a cut
def match_mean_logits(new: nn.Module, classifier: str, target: torch.Tensor, data: ImageSet, device: str,
                      batch_size: int) -> bool:
    """Reset the cut network's classifier bias so its mean logits on `data` equal `target` (the uncut
    network's, b + W·mean). Dropped pre-decision neurons are thereby replaced by their mean (how M′ was
    judged) rather than by zero, and the mean shift that cuts further down cause in the kept ones is
    absorbed too; for a cut of the pre-decision layer alone it adds exactly W[:, dropped]·mean[dropped]."""
    head = new.get_submodule(classifier)
    if not isinstance(head, nn.Linear) or head.bias is None or head.out_features != target.numel():
        return False
    feats, _ = predecision_features(new, batches(data, batch_size, device=device), classifier, device)
    with torch.no_grad():
        bias = target.double() - head.weight.detach().double().cpu() @ feats.double().mean(0)
        head.bias.copy_(bias.to(head.bias))
    return True


def recalibrate(new: nn.Module, old: nn.Module, classifier: str, mean: torch.Tensor, calib: ImageSet,
                o: LoopOptions, device: str, batch_size: int) -> None:
    """Repair a fresh cut before fine-tuning: BatchNorm statistics re-estimated on calibration images,
    layers scaled back to their pre-cut variance (o.bn_recal; netslim.train.restore_scale), then the
    classifier bias reset to the uncut network's mean logits (o.bias_correction)."""
    from netslim.train import restore_scale

    if o.bn_recal > 0:
        restore_scale(new, lambda: batches(calib, batch_size, shuffle=True, device=device, seed=7), device, o.bn_recal)
    if o.bias_correction:
        images = calibration_subset(calib, min(o.bias_images, len(calib)), seed=3)
        match_mean_logits(new, classifier, mean_logits(old, classifier, mean), images, device, batch_size)


def compose(base_keep: dict[str, list[int]], step: dict[str, list[int]], base_widths: dict[str, int]
            ) -> dict[str, list[int]]:
    """Keep lists in the base numbering after applying `step` (current numbering) on top of `base_keep`."""
    out = dict(base_keep)
    for name, idx in step.items():
        prev = base_keep.get(name, list(range(base_widths[name])))
        out[name] = [prev[i] for i in idx]
    return out


def mean_logits(model: nn.Module, classifier: str, mean: torch.Tensor) -> torch.Tensor:
    """Mean logits b + W·mean of a Linear classifier fed features with the given mean."""
    head = model.get_submodule(classifier)
    if not isinstance(head, nn.Linear):
        return torch.empty(0)
    out = head.weight.detach().double().cpu() @ mean.double()
    return out + head.bias.detach().double().cpu() if head.bias is not None else out
