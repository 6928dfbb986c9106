"""Stream a model over calibration batches and accumulate response statistics on the fly.

Each hooked response is reduced to a (C, N) float64 matrix inside its forward hook and folded into running
sums right away, so memory does not grow with the number of images.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from netslim.errors import NetslimError
from netslim.probe.points import ResponsePoint, response_modules
from netslim.probe.stats import LayerStats

REDUCE_MODES = ("max", "mean", "spatial")
_F64 = torch.float64


def reduce_response(out: torch.Tensor, kind: str, mode: str) -> torch.Tensor:
    """Response (B, C, *spatial) — or (B, *, C) for a Linear — to samples as columns: (C, N) float64.

    "max"/"mean" pool each channel over the spatial positions (N = B); "spatial" keeps every position as a
    sample (N = B * H * W, sample-major). A 2-D response is used as is in every mode.
    """
    if kind == "linear" and out.dim() > 2:
        out = out.movedim(-1, 1)
    if out.dim() == 2:
        return out.to(_F64).T
    dims = tuple(range(2, out.dim()))
    if mode == "max":
        return out.amax(dim=dims).to(_F64).T
    if mode == "mean":
        return _mean_f64(out, dims).T
    # One copy does both the float64 cast and the channel-major layout the Gram product wants.
    return out.transpose(0, 1).to(_F64, memory_format=torch.contiguous_format).reshape(out.shape[1], -1)


def _mean_f64(out: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Spatial mean accumulated in float64: a float32 mean alone is off by ~1e-7 relative, which the
    covariance of nearly constant pooled features amplifies. numpy's cast-while-summing is ~8x faster than
    torch's on the CPU; elsewhere torch is used."""
    if out.device.type == "cpu" and out.dtype in (torch.float32, torch.float64) and out.dim() > 2:
        b, c = out.shape[:2]
        if out.is_contiguous():
            flat = out.detach().reshape(b * c, -1).numpy()
            return torch.from_numpy(np.add.reduce(flat, axis=1, dtype=np.float64) / flat.shape[1]).view(b, c)
        last = out.detach().movedim(1, -1)
        if last.is_contiguous():  # channels_last
            flat = last.reshape(b, -1, c).numpy()
            return torch.from_numpy(np.add.reduce(flat, axis=1, dtype=np.float64) / flat.shape[1])
    return out.mean(dim=dims, dtype=_F64)


@dataclass
class _Batch:
    """Per-batch label information shared by all hooks."""

    labels: torch.Tensor | None = None
    groups: list[tuple[int, torch.Tensor]] = field(default_factory=list)


@dataclass(eq=False)
class _Accumulator:
    name: str
    point: ResponsePoint
    mode: str
    stats: LayerStats
    batch: _Batch
    fired: int = 0
    guard: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        self.fired += 1
        if self.point.post is not None:
            out = self.point.post(out)
        if not isinstance(out, torch.Tensor):
            raise NetslimError(f"layer {self.name!r}: hooked module {self.point.hook!r} returned no tensor")
        channels = out.shape[-1] if self.point.kind == "linear" else out.shape[1] if out.dim() > 1 else -1
        if channels != self.point.channels:
            raise NetslimError(
                f"layer {self.name!r}: response has shape {tuple(out.shape)}, expected {self.point.channels} channels"
            )
        if self.mode == "max" and out.dim() > 2:
            # The channel max already carries NaN and +Inf; the global min catches -Inf.
            self.guard = out.amin()
        zt = reduce_response(out, self.point.kind, self.mode)
        self._add(zt, out.shape[0])

    def _add(self, zt: torch.Tensor, batch: int) -> None:
        s = self.stats
        n = zt.shape[1]
        s.count.add_(n)
        s.sum.add_(zt.sum(dim=1))
        labels = self.batch.labels
        if labels is None:
            s.outer.addmm_(zt, zt.T)
            return
        assert s.class_count is not None and s.class_sum is not None and s.class_outer is not None
        if labels.numel() != batch:
            raise NetslimError(
                f"layer {self.name!r}: response has {batch} samples but the batch has {labels.numel()} labels"
            )
        per_sample = n // batch
        z3 = zt.view(zt.shape[0], batch, per_sample)
        s.class_count.index_add_(0, labels, torch.full((batch,), float(per_sample), dtype=_F64, device=zt.device))
        s.class_sum.index_add_(0, labels, z3.sum(dim=2).T)
        for k, idx in self.batch.groups:
            zk = zt if len(self.batch.groups) == 1 else z3[:, idx].reshape(zt.shape[0], -1)
            gram = zk @ zk.T
            s.class_outer[k].add_(gram)
            s.outer.add_(gram)

    def finite(self) -> torch.Tensor:
        ok = torch.isfinite(self.stats.sum).all()
        if self.guard is not None:
            ok = ok & torch.isfinite(self.guard)
        return ok


def _prepend(head: list, rest: Iterator) -> Iterator:
    """Yield head's item then rest, holding no reference to the first batch once it is consumed."""
    yield head.pop()
    yield from rest


def _split(batch: object) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0], batch[1] if len(batch) > 1 else None
    raise NetslimError("batches must yield (x, y) tuples of tensors")


def _label_groups(y: torch.Tensor | None, batch: int, num_classes: int, device: torch.device) -> _Batch:
    if y is None:
        raise NetslimError("per_class=True needs labels: batches must yield (x, y)")
    labels = torch.as_tensor(y).to(device=device, dtype=torch.long).reshape(-1)
    if labels.numel() != batch:
        raise NetslimError(f"a batch has {batch} inputs but {labels.numel()} labels")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise NetslimError(f"label {lo if lo < 0 else hi} is outside 0..{num_classes - 1}")
    groups = [(k, (labels == k).nonzero().squeeze(1)) for k in torch.unique(labels).tolist()]
    return _Batch(labels, groups)


def collect(
    model: nn.Module,
    batches: Iterable,
    layers: Iterable[str] | Mapping[str, ResponsePoint] | None = None,
    reduce: str = "max",
    per_class: bool = False,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, LayerStats]:
    """Response statistics of every Conv2d/Linear but the classifier (or of `layers`) over `batches`.

    `batches` yields (x, y); y is only read with per_class=True. `layers` may be names or the result of
    response_modules. num_classes defaults to the width of the model output. The model is moved to
    `device` and evaluated in eval mode (its training flag is restored afterwards). Results are on the CPU.
    """
    if reduce not in REDUCE_MODES:
        raise NetslimError(f"reduce must be one of {', '.join(REDUCE_MODES)}, got {reduce!r}")
    device = torch.device(device)
    total = len(batches) if hasattr(batches, "__len__") else None
    it = iter(batches)
    first = next(it, None)
    if first is None:
        raise NetslimError("no calibration batches: the data set is empty")
    x0, _ = _split(first)
    model.to(device)
    example = x0[:2].to(device)
    points = dict(layers) if isinstance(layers, Mapping) else response_modules(model, example, layers)
    if not points:
        raise NetslimError("the model has no Conv2d or Linear layer to probe")
    if per_class and num_classes is None:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            num_classes = int(model(example[:1]).shape[-1])
        model.train(was_training)

    modules = dict(model.named_modules())
    batch_state = _Batch()
    accs: list[_Accumulator] = []
    for name, point in points.items():
        if point.hook not in modules:
            raise NetslimError(f"layer {name!r}: the model has no module {point.hook!r} to hook")
        stats = LayerStats.zeros(point.channels, num_classes if per_class else None, device)
        accs.append(_Accumulator(name, point, reduce, stats, batch_state))

    source: Iterable = _prepend([first], it)
    del first
    if progress:
        from rich.progress import track

        source = track(source, total=total, description="Collecting statistics")
    handles = []
    was_training = model.training
    try:
        model.eval()
        for acc in accs:
            handles.append(modules[acc.point.hook].register_forward_hook(acc))
        with torch.no_grad():
            for batch in source:
                _run_batch(model, batch, accs, batch_state, per_class, num_classes, device)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {acc.name: acc.stats.to("cpu") for acc in accs}


def _run_batch(
    model: nn.Module,
    batch: object,
    accs: list[_Accumulator],
    batch_state: _Batch,
    per_class: bool,
    num_classes: int | None,
    device: torch.device,
) -> None:
    x, y = _split(batch)
    x = x.to(device, non_blocking=True)
    if per_class:
        assert num_classes is not None
        state = _label_groups(y, x.shape[0], num_classes, device)
        batch_state.labels, batch_state.groups = state.labels, state.groups
    for acc in accs:
        acc.fired = 0
    model(x)
    for acc in accs:
        if acc.fired != 1:
            raise NetslimError(
                f"layer {acc.name!r} produced {acc.fired} responses in one forward pass, expected 1 "
                "(data-dependent control flow is not supported)"
            )
    ok = torch.stack([acc.finite() for acc in accs])
    if not bool(ok.all()):
        bad = accs[int((~ok).nonzero()[0])]
        raise NetslimError(f"layer {bad.name!r} produced NaN or Inf activations")
