"""BatchNorm recalibration: after channels are cut, the surviving BN statistics no longer match the
inputs each layer now sees. Re-estimating them on a few training batches (no gradient step) recovers
much of the accuracy lost at surgery, for every method alike, at the cost of one inference pass.

A layer that lost most of its inputs can also lose most of its output variance. Trained with weight
decay, late layers have tiny weights, so that variance can fall below BatchNorm's eps: BN then cannot
re-normalise it and the signal fades to a constant (a VGG-16 cut to 1/8 of its parameters this way
outputs the same logits for every image and does not train). `restore_scale` undoes that by scaling
each surviving filter back to the pre-BN variance the trained network had; in front of a BN this
changes nothing but eps's share of the normalisation."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable, device: str | torch.device = "cpu",
                   max_images: int = 2000) -> int:
    """Replace every BN layer's running mean/var by their exact average over up to `max_images` images.

    Returns the number of images used (0 when the model has no BatchNorm).
    """
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    saved = [(m.momentum, m.training) for m in bns]
    was_training = model.training
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: exact mean over the batches seen
        m.train()
    seen = 0
    try:
        for x, _ in batches:
            model(x.to(device))
            seen += len(x)
            if seen >= max_images:
                break
    finally:
        for m, (momentum, training) in zip(bns, saved, strict=True):
            m.momentum = momentum
            m.train(training)
        model.train(was_training)
    return seen


def _conv_bn_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[nn.Module, _BatchNorm]]:
    from netslim.probe import response_modules

    mods = dict(model.named_modules())
    pairs = []
    for name, point in response_modules(model, example).items():
        layer, bn = mods[name], mods.get(point.bn) if point.bn else None
        if isinstance(layer, (nn.Conv2d, nn.Linear)) and isinstance(bn, _BatchNorm) and bn.track_running_stats \
                and layer.weight.shape[0] == bn.num_features:
            pairs.append((layer, bn))
    return pairs


@torch.no_grad()
def restore_scale(model: nn.Module, make_batches: Callable[[], Iterable], device: str | torch.device = "cpu",
                  max_images: int = 2000, rounds: int = 2, max_gain: float = 1e4) -> dict[str, Any]:
    """Recalibrate BN, scaling each conv/linear output channel back to its trained pre-BN variance.

    The reference is every BN's running variance before the call (the trained network's, sliced to the
    kept channels by surgery). Rounds repeat because a revived layer changes what the next one sees;
    a last recalibration leaves exact statistics. Returns the images used and the gains applied.
    """
    was_training = model.training
    model.eval()
    first = next(iter(make_batches()))[0].to(device)
    pairs = _conv_bn_pairs(model, first[:2])
    reference = [bn.running_var.clone() for _, bn in pairs]
    gains = [torch.ones_like(r) for r in reference]
    seen = 0
    for _ in range(rounds):
        seen = recalibrate_bn(model, make_batches(), device, max_images)
        for (layer, bn), ref, total in zip(pairs, reference, gains, strict=True):
            g = (ref / bn.running_var.clamp_min(1e-30)).sqrt().clamp(1 / max_gain, max_gain)
            g = torch.where(torch.isfinite(g) & (ref > 0), g, torch.ones_like(g))
            shape = (-1,) + (1,) * (layer.weight.dim() - 1)
            layer.weight.mul_(g.view(shape).to(layer.weight.dtype))
            if layer.bias is not None:
                layer.bias.mul_(g.to(layer.bias.dtype))
            total.mul_(g)
    seen = recalibrate_bn(model, make_batches(), device, max_images)
    model.train(was_training)
    g = torch.cat(gains) if gains else torch.ones(0)
    return {"images": seen, "layers": len(pairs), "median_gain": float(g.median()) if g.numel() else 1.0,
            "max_gain": float(g.max()) if g.numel() else 1.0}
