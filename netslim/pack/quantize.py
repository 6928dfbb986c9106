"""Storage compression of weights (Deep Compression): magnitude pruning and k-means weight sharing.

Pruning zeroes the smallest-magnitude weights of each layer and keeps them zero while fine-tuning (a
fixed mask re-applied after every optimizer step). Weight sharing replaces each layer's surviving weights
by the nearest of 2^bits shared values found by 1-D k-means (linearly initialised, as Deep Compression
found best); the index of a weight is what gets entropy-coded.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from netslim.errors import NetslimError

PACKABLE = (nn.Conv2d, nn.Linear)


def packable_layers(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Conv2d/Linear layers to compress (all by default), checked against the model."""
    available = [n for n, m in model.named_modules() if isinstance(m, PACKABLE)]
    if names is None:
        return available
    unknown = [n for n in names if n not in available]
    if unknown:
        raise NetslimError(f"no Conv2d/Linear layer {', '.join(map(repr, unknown))}; the model has "
                           f"{', '.join(available)}")
    return [n for n in available if n in names]


def default_bits(module: nn.Module, conv_bits: int = 8, fc_bits: int = 5) -> int:
    return conv_bits if isinstance(module, nn.Conv2d) else fc_bits


def magnitude_masks(model: nn.Module, sparsity: dict[str, float]) -> dict[str, torch.Tensor]:
    """Per layer, a 0/1 mask keeping the (1 - sparsity) largest-magnitude weights (ties kept)."""
    masks = {}
    for name, s in sparsity.items():
        if not 0.0 <= s < 1.0:
            raise NetslimError(f"sparsity of {name!r} must be in [0, 1), not {s}")
        w = model.get_submodule(name).weight.detach()
        drop = int(s * w.numel())
        if drop == 0:
            masks[name] = torch.ones_like(w)
            continue
        threshold = w.abs().flatten().kthvalue(drop).values
        masks[name] = (w.abs() > threshold).to(w.dtype)
    return masks


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, mask in masks.items():
            w = model.get_submodule(name).weight
            w.masked_fill_(mask.to(w.device) == 0, 0.0)


def mask_hook(masks: dict[str, torch.Tensor]) -> Callable[[nn.Module], None]:
    """For `fit(mask_hook=...)`: pruned weights stay exactly zero after every optimizer step."""
    cache: dict[torch.device, dict[str, torch.Tensor]] = {}

    def hook(model: nn.Module) -> None:
        dev = next(model.parameters()).device
        if dev not in cache:
            cache[dev] = {n: (m.to(dev) == 0) for n, m in masks.items()}
        with torch.no_grad():
            for name, zero in cache[dev].items():
                model.get_submodule(name).weight.masked_fill_(zero, 0.0)

    return hook


def kmeans_1d(values: torch.Tensor, k: int, iters: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared values (float16-representable, sorted) and each value's index, by Lloyd's 1-D k-means.

    Centroids are stored as float16, so they are rounded to it here: the quantized network is exactly
    what a decoder rebuilds.
    """
    v = values.detach().flatten().double().cpu()
    if v.numel() == 0:
        return torch.zeros(0, dtype=torch.float16), torch.zeros(0, dtype=torch.long)
    distinct = torch.unique(v.half()).double()
    if distinct.numel() <= k:
        c = distinct
    else:
        c = torch.linspace(float(v.min()), float(v.max()), k, dtype=torch.float64)
        for _ in range(iters):
            idx = torch.bucketize(v, (c[1:] + c[:-1]) / 2)
            sums = torch.zeros(k, dtype=torch.float64).scatter_add_(0, idx, v)
            counts = torch.bincount(idx, minlength=k).double()
            new = torch.where(counts > 0, sums / counts.clamp_min(1), c)
            new, _ = torch.sort(new)
            if torch.allclose(new, c, rtol=0, atol=1e-12):
                c = new
                break
            c = new
    c16 = torch.unique(c.half())  # sorted, distinct after rounding
    c64 = c16.double()
    idx = torch.bucketize(v, (c64[1:] + c64[:-1]) / 2) if c64.numel() > 1 else torch.zeros_like(v, dtype=torch.long)
    return c16, idx


def quantize_layer(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codebook float16, index per nonzero weight, quantized weight); zeros stay exactly zero."""
    if not 1 <= bits <= 16:
        raise NetslimError(f"bits per weight must be between 1 and 16, not {bits}")
    w = weight.detach().cpu().float()
    nz = w != 0
    codebook, idx = kmeans_1d(w[nz], 2**bits)
    q = torch.zeros_like(w)
    q[nz] = codebook.float()[idx]
    return codebook, idx, q


def quantize_model(model: nn.Module, bits: dict[str, int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Replace each listed layer's weight by its shared values in place; returns codebooks and indices."""
    out = {}
    with torch.no_grad():
        for name, b in bits.items():
            layer = model.get_submodule(name)
            codebook, idx, q = quantize_layer(layer.weight, b)
            layer.weight.copy_(q.to(layer.weight.device, layer.weight.dtype))
            out[name] = (codebook, idx)
    return out
