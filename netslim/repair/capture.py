"""One layer's inputs in both networks, one batch at a time: im2col patches at shared sampled positions.

A forward pre-hook on the layer in the original and in the cut network gathers the input patches at the
same randomly drawn output positions, then raises `_Stop` so the rest of the forward is skipped. Nothing
outlives a batch: the consumer turns each pair into sums (netslim.repair.lsq, .bias) and drops it.

`patches` is the same im2col sampler as netslim.methods.lrs.core's (lrs sits above repair in the layer
contract and can import it from here instead).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from netslim.errors import NetslimError

Batches = Callable[[], Iterable[Any]]


class _Stop(Exception):
    """Raised by a hook once the layer's input was seen: the rest of the forward is not needed."""


def run_to_hook(nets: Iterable[nn.Module], x: torch.Tensor, what: str) -> None:
    """Run each network on `x` until a capture hook raises _Stop; one that never reaches it is an error."""
    for net in nets:
        try:
            with torch.no_grad():
                net(x)
        except _Stop:
            continue
        raise NetslimError(f"repair: {what} was not reached in the forward pass")


def _windows(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Strided view (N, C, Ho, Wo, kh, kw) of the padded input: every kernel window, nothing copied."""
    if module.padding_mode == "zeros":
        xp = F.pad(x, module._reversed_padding_repeated_twice)
    else:
        xp = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
    xp = xp.contiguous()
    (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
    n, c, h, w = xp.shape
    ho, wo = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    st = xp.stride()
    return xp.as_strided((n, c, ho, wo, kh, kw), (st[0], st[1], st[2] * sh, st[3] * sw, st[2] * dh, st[3] * dw))


def patches(module: nn.Module, x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """Input rows of a layer (rows × d, im2col order C, kh, kw): a Conv2d's windows at output positions
    `idx` (N × p flat indices; None = all), or a Linear's input rows (one per image or token)."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    win = _windows(module, x)
    n, c, ho, wo, kh, kw = win.shape
    if idx is None:
        return win.permute(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * kh * kw)
    rows = torch.arange(n, device=x.device).unsqueeze(1).expand_as(idx).reshape(-1)
    flat = idx.reshape(-1)
    return win[rows, :, flat // wo, flat % wo].reshape(rows.numel(), c * kh * kw)


def sample_positions(module: nn.Module, x: torch.Tensor, p: int | None, gen: torch.Generator) -> torch.Tensor | None:
    """`p` distinct output positions per image (flat indices), or None for all of them (Linear, p=None,
    or a map with no more than p positions)."""
    if not isinstance(module, nn.Conv2d) or p is None:
        return None
    win = _windows(module, x[:1])
    count = win.shape[2] * win.shape[3]
    if count <= p:
        return None
    return torch.rand(x.shape[0], count, generator=gen).argsort(1)[:, :p].to(x.device)


def iterate(batches: Batches | Iterable[Any]) -> Iterable[Any]:
    """A fresh pass: call a batches factory, or iterate a re-iterable object."""
    return batches() if callable(batches) else batches


def eval_modes(*nets: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Put every module in eval mode (BN uses its running statistics), remembering each one's mode."""
    saved = [(m, m.training) for net in nets for m in net.modules()]
    for net in nets:
        net.eval()
    return saved


def restore_modes(saved: list[tuple[nn.Module, bool]]) -> None:
    for m, training in saved:
        m.training = training


def example_batch(batches: Batches | Iterable[Any], device: str | torch.device) -> torch.Tensor:
    item = next(iter(iterate(batches)), None)
    if item is None:
        raise NetslimError("repair needs calibration images; the batches were empty")
    x = item[0] if isinstance(item, (tuple, list)) else item
    return x[:2].to(device)


def _inputs(item: Any) -> torch.Tensor:
    return item[0] if isinstance(item, (tuple, list)) else item


def paired_patches(original: nn.Module, cut: nn.Module, name: str, batches: Iterable[Any], *,
                   positions: int | None, seed: int, device: str | torch.device
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """Per batch: (patches of `name`'s input in `original`, the same in `cut`, images in the batch).

    Both networks run only up to the layer; the cut network's patches are taken at the positions drawn
    for the original's, so row i of both is the same image and place.
    """
    lo, lc = original.get_submodule(name), cut.get_submodule(name)
    gen = torch.Generator().manual_seed(seed)
    seen: dict[str, Any] = {}

    def grab(key: str) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            if key == "orig":
                seen["idx"] = sample_positions(module, x, positions, gen)
            seen[key] = patches(module, x, seen["idx"])
            raise _Stop

        return hook

    handles = [lo.register_forward_pre_hook(grab("orig")), lc.register_forward_pre_hook(grab("cut"))]
    try:
        for item in batches:
            x = _inputs(item).to(device)
            run_to_hook((original, cut), x, f"layer {name!r}")
            orig, new = seen.pop("orig"), seen.pop("cut")
            seen.clear()
            yield orig, new, x.shape[0]
    finally:
        for h in handles:
            h.remove()


def targets(layer: nn.Module, rows: torch.Tensor, out_idx: torch.Tensor) -> torch.Tensor:
    """The original layer's outputs (bias included, before any BN) for its channels `out_idx`, from its
    input patches: only the kept rows of the weight are multiplied."""
    m = layer.weight.shape[0]
    w = layer.weight.detach().reshape(m, -1)[out_idx].to(rows.dtype)
    groups = layer.groups if isinstance(layer, nn.Conv2d) else 1
    if groups == 1:
        y = rows @ w.T
    else:
        d, per = w.shape[1], m // groups
        grp = out_idx // per
        y = rows.new_empty(rows.shape[0], len(out_idx))
        for g in grp.unique().tolist():
            sel = grp == g
            y[:, sel] = rows[:, g * d:(g + 1) * d] @ w[sel].T
    if layer.bias is not None:
        y = y + layer.bias.detach()[out_idx].to(rows.dtype)
    return y


def at_positions(t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """Rows (R × C) of an activation at the output positions drawn for a layer (as `patches` orders them)."""
    if t.dim() != 4:
        return t.reshape(-1, t.shape[-1]) if t.dim() > 2 else t
    n, c = t.shape[:2]
    flat = t.flatten(2).transpose(1, 2)  # N × HW × C
    if idx is None:
        return flat.reshape(-1, c)
    rows = torch.arange(n, device=t.device).unsqueeze(1).expand_as(idx).reshape(-1)
    return flat[rows, idx.reshape(-1)]
