"""LRS's calibration moments: per layer, sums of im2col patch outer products G = X Xᵀ (and Y Xᵀ when the
inputs differ from the original network's), accumulated by forward pre-hooks and never stored as patches.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from netslim.methods.lrs.solver import Moments
from netslim.repair.capture import paired_patches, patches, sample_positions
from netslim.surgery.factorized import matrix_shape


class _Stop(Exception):
    """Raised by a hook once the last needed input was seen: the rest of the forward is skipped."""


def module_call_order(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the model's modules in the order they are called."""
    order: list[str] = []
    _hooked_forward(model, example, [m.register_forward_pre_hook(lambda mod, args, n=n: order.append(n))
                                     for n, m in model.named_modules() if n])
    return list(dict.fromkeys(order))


def _hooked_forward(model: nn.Module, example: torch.Tensor, handles: list[Any]) -> None:
    """One no-grad forward of `example` through `model`, then the hooks of `handles` are removed."""
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()


def positions(model: nn.Module, names: list[str], example: torch.Tensor) -> dict[str, int]:
    """Output positions per sample of each named layer (H·W of a conv, tokens of a Linear, summed over calls):
    a layer's MACs are its weight's size times these, so a FLOP budget weighs each layer by them."""
    seen = dict.fromkeys(names, 0)
    mods = dict(model.named_modules())

    def hook(name: str) -> Any:
        def count(mod: nn.Module, args: Any, out: torch.Tensor) -> None:
            seen[name] += out.numel() // (matrix_shape(mod)[0] * example.shape[0])
        return count

    _hooked_forward(model, example, [mods[n].register_forward_hook(hook(n)) for n in names])
    return seen


class _Accumulator:
    """Sums of patch outer products: float32 partial sums (fast GEMMs), flushed into float64 every few batches."""

    FLUSH = 8192  # rows summed in float32 before moving into the float64 total

    def __init__(self, module: nn.Module) -> None:
        m, d = matrix_shape(module)
        self.weight = module.weight.detach().reshape(m, d).float()
        self.total = torch.zeros(d, d, dtype=torch.float64)
        self.cross: torch.Tensor | None = None
        self.yy = 0.0
        self.n = 0
        self._part: torch.Tensor | None = None
        self._rows = 0

    def add(self, xhat: torch.Tensor, x: torch.Tensor | None = None) -> None:
        """Patches the layer sees (xhat) and, when they differ, the original network's (x)."""
        xhat = xhat.float()
        if self._part is None:
            self._part = xhat.T @ xhat
        else:
            self._part.addmm_(xhat.T, xhat)
        self._rows += xhat.shape[0]
        if self._rows >= self.FLUSH:
            self._flush()
        if x is not None:  # original inputs differ: Y = W X is needed (with them, ‖Y‖² = tr(W G Wᵀ) at the end)
            y = x.float() @ self.weight.T
            part = (y.T @ xhat).double().cpu()
            self.cross = part if self.cross is None else self.cross + part
            self.yy += float(y.double().pow(2).sum())
        self.n += xhat.shape[0]

    def _flush(self) -> None:
        if self._part is not None:
            self.total += self._part.double().cpu()
            self._part, self._rows = None, 0

    def moments(self) -> Moments:
        self._flush()
        if self.cross is None:
            w = self.weight.double()
            self.yy = float(((w @ self.total) * w).sum())
        return Moments(self.total, self.cross, self.yy, self.n)


def original_moments(model: nn.Module, names: list[str], data: Any, positions: int, seed: int) -> dict[str, Moments]:
    """One pass: each layer's patch moments from the original network's own inputs."""
    mods = dict(model.named_modules())
    acc = {n: _Accumulator(mods[n]) for n in names}
    gen = torch.Generator().manual_seed(seed)
    last = names[-1] if names else None

    def hook(name: str):
        def run(module: nn.Module, args: tuple) -> None:
            x = args[0]
            acc[name].add(patches(module, x, sample_positions(module, x, positions, gen)))
            if name == last:
                raise _Stop

        return run

    handles = [mods[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            for x, _ in data:
                try:
                    model(x)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    return {n: a.moments() for n, a in acc.items()}


def compressed_moments(reference: nn.Module, model: nn.Module, name: str, data: Any, positions: int,
                       seed: int) -> Moments:
    """Moments of `name` on the inputs the partly compressed `model` gives, against `reference`'s outputs."""
    acc = _Accumulator(reference.get_submodule(name))
    device = next(model.parameters()).device
    for ref, new, _ in paired_patches(reference, model, name, data, positions=positions, seed=seed, device=device):
        acc.add(new, ref)
    return acc.moments()
