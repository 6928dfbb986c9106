"""Streaming first and second moments of layer responses.

Only sums are kept (count, sum, sum of outer products), all in float64: they add across batches, shards and
ranks exactly, so statistics of a large calibration set never need its activations in memory at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist

from netslim.errors import NetslimError

_F64 = torch.float64
_FIELDS = ("count", "sum", "outer", "class_count", "class_sum", "class_outer")


@dataclass
class LayerStats:
    """Sufficient statistics of one layer's response: n, sum x, sum x x^T (optionally per class).

    count: 0-dim float64; sum: (C,); outer: (C, C); class_count: (K,); class_sum: (K, C); class_outer: (K, C, C).
    """

    count: torch.Tensor
    sum: torch.Tensor
    outer: torch.Tensor
    class_count: torch.Tensor | None = None
    class_sum: torch.Tensor | None = None
    class_outer: torch.Tensor | None = None

    @classmethod
    def zeros(cls, channels: int, num_classes: int | None = None, device: str | torch.device = "cpu") -> LayerStats:
        """Empty statistics for `channels` features (and `num_classes` classes when given)."""
        kw = {"dtype": _F64, "device": device}
        per_class = num_classes is not None
        return cls(
            count=torch.zeros((), **kw),
            sum=torch.zeros(channels, **kw),
            outer=torch.zeros(channels, channels, **kw),
            class_count=torch.zeros(num_classes, **kw) if per_class else None,
            class_sum=torch.zeros(num_classes, channels, **kw) if per_class else None,
            class_outer=torch.zeros(num_classes, channels, channels, **kw) if per_class else None,
        )

    @property
    def channels(self) -> int:
        return int(self.sum.shape[0])

    @property
    def num_classes(self) -> int | None:
        return None if self.class_count is None else int(self.class_count.shape[0])

    @property
    def n(self) -> int:
        """Number of samples seen (rows of the reduced response)."""
        return int(round(float(self.count)))

    @property
    def mean(self) -> torch.Tensor:
        if self.n < 1:
            raise NetslimError("statistics are empty: no sample was collected")
        return self.sum / self.count

    @property
    def cov(self) -> torch.Tensor:
        """Unbiased covariance (C, C)."""
        if self.n < 2:
            raise NetslimError(f"a covariance needs at least 2 samples, got {self.n}")
        return (self.outer - torch.outer(self.sum, self.sum) / self.count) / (self.count - 1)

    @property
    def variance(self) -> torch.Tensor:
        """Unbiased per-channel variance (C,), clamped at 0 against rounding."""
        return torch.diagonal(self.cov).clamp(min=0.0)

    @property
    def corr(self) -> torch.Tensor:
        """Pearson correlation (C, C); a channel with zero variance correlates 0 with others, 1 with itself."""
        return _corr(self.cov)

    @property
    def class_mean(self) -> torch.Tensor:
        """Per-class mean (K, C); rows of classes with no sample are 0 (see class_count)."""
        cc, cs, _ = self._require_classes()
        return cs / cc.clamp(min=1.0)[:, None]

    @property
    def class_cov(self) -> torch.Tensor:
        """Per-class unbiased covariance (K, C, C); classes with fewer than 2 samples get 0."""
        cc, cs, co = self._require_classes()
        centred = co - cs[:, :, None] * cs[:, None, :] / cc.clamp(min=1.0)[:, None, None]
        out = centred / (cc - 1).clamp(min=1.0)[:, None, None]
        return torch.where((cc >= 2)[:, None, None], out, torch.zeros_like(out))

    def _require_classes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.class_count is None or self.class_sum is None or self.class_outer is None:
            raise NetslimError("these statistics were collected without per_class=True")
        return self.class_count, self.class_sum, self.class_outer

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (getattr(self, f) for f in _FIELDS) if t is not None]

    def merge(self, other: LayerStats) -> LayerStats:
        """Statistics of the union of both sample sets (a new object; inputs are untouched)."""
        if self.sum.shape != other.sum.shape:
            raise NetslimError(f"cannot merge statistics of {self.channels} and {other.channels} channels")
        if (self.class_count is None) != (other.class_count is None) or self.num_classes != other.num_classes:
            raise NetslimError("cannot merge statistics with different per-class layouts")
        merged = {}
        for f in _FIELDS:
            a, b = getattr(self, f), getattr(other, f)
            merged[f] = None if a is None else a + b.to(a.device)
        return LayerStats(**merged)

    def all_reduce(self) -> LayerStats:
        """Sum over all torch.distributed ranks in place (no-op without an initialised process group)."""
        all_reduce_stats({"": self})
        return self

    def to(self, device: str | torch.device) -> LayerStats:
        return LayerStats(**{f.name: _maybe_to(getattr(self, f.name), device) for f in fields(self)})

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Plain contiguous CPU tensors keyed by field name, ready for safetensors."""
        return {f: getattr(self, f).detach().cpu().contiguous() for f in _FIELDS if getattr(self, f) is not None}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> LayerStats:
        missing = [f for f in ("count", "sum", "outer") if f not in tensors]
        if missing:
            raise NetslimError(f"statistics tensors lack {', '.join(missing)}")
        return cls(**{f: tensors[f].to(_F64).reshape(tensors[f].shape) for f in _FIELDS if f in tensors})


def _maybe_to(t: torch.Tensor | None, device: str | torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device)


def _corr(cov: torch.Tensor) -> torch.Tensor:
    std = torch.diagonal(cov).clamp(min=0.0).sqrt()
    denom = torch.outer(std, std)
    positive = denom > 0
    corr = torch.where(positive, cov / torch.where(positive, denom, 1.0), 0.0).clamp(-1.0, 1.0)
    corr.diagonal().fill_(1.0)
    return corr


def all_reduce_stats(stats: Mapping[str, LayerStats]) -> Mapping[str, LayerStats]:
    """Sum every layer's statistics over all ranks in one collective, in place.

    Every rank must pass the same layer names with the same shapes. Without an initialised process group
    this returns the input unchanged, so single-process code can call it unconditionally.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return stats
    tensors = [t for name in sorted(stats) for t in stats[name].tensors()]
    if not tensors:
        return stats
    device = tensors[0].device
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    flat = torch.cat([t.reshape(-1).to(device, _F64) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n
    return stats


def stats_to_tensors(stats: Mapping[str, LayerStats]) -> dict[str, torch.Tensor]:
    """Flatten {layer: LayerStats} to {"layer/field": tensor} for safetensors.save_file."""
    return {f"{name}/{field}": t for name, s in stats.items() for field, t in s.to_tensors().items()}


def stats_from_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, LayerStats]:
    """Inverse of stats_to_tensors."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name, sep, field = key.rpartition("/")
        if not sep or field not in _FIELDS:
            raise NetslimError(f"unexpected statistics tensor name {key!r}")
        grouped.setdefault(name, {})[field] = t
    return {name: LayerStats.from_tensors(parts) for name, parts in grouped.items()}
