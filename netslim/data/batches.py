"""Minibatches straight from an in-memory uint8 tensor: no DataLoader, no per-image Python work.

Augmentation (random crop from a zero-padded image, horizontal flip) and normalisation run on the
whole batch as tensor operations, on the target device. Every pass over the object is one epoch;
its shuffle and augmentation come from (seed, epoch), so a run can be reproduced or resumed.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from netslim.data.sets import ImageSet
from netslim.errors import NetslimError


class Batches:
    """Re-iterable batches of (float32 normalised N x C x H x W, int64 labels); len() = batches per epoch."""

    def __init__(self, ds: ImageSet, batch_size: int, *, shuffle: bool = False, augment: bool = False,
                 device: str | torch.device = "cpu", seed: int = 0, drop_last: bool = False, pad: int = 4,
                 flip: bool | None = None) -> None:
        if batch_size < 1:
            raise NetslimError(f"batch size must be positive, got {batch_size}")
        if len(ds) == 0:
            raise NetslimError("cannot make batches from an empty dataset")
        self.ds = ds
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.device = torch.device(device)
        self.seed = seed
        self.drop_last = drop_last
        self.pad = pad
        self.flip = ds.hflip if flip is None else flip
        self.epoch = 0  # the epoch the next iteration will produce
        std = torch.tensor(ds.std, dtype=torch.float32).view(1, -1, 1, 1)
        mean = torch.tensor(ds.mean, dtype=torch.float32).view(1, -1, 1, 1)
        # (x / 255 - mean) / std == x * scale - shift
        self._scale = (1.0 / (255.0 * std)).to(self.device)
        self._shift = (mean / std).to(self.device)
        self._data: tuple[torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        n = len(self.ds)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration produce `epoch` (for resuming a run)."""
        self.epoch = epoch

    def _on_device(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._data is None:
            self._data = (self.ds.images.to(self.device), self.ds.labels.to(self.device))
        return self._data

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
        images, labels = self._on_device()
        n = len(labels)
        order = torch.randperm(n, generator=gen) if self.shuffle else None
        for b in range(len(self)):
            if order is None:
                sl = slice(b * self.batch_size, min(n, (b + 1) * self.batch_size))
                x, y = images[sl], labels[sl]
            else:
                idx = order[b * self.batch_size:(b + 1) * self.batch_size].to(self.device)
                x, y = images[idx], labels[idx]
            if self.augment:
                x = self._augment(x, gen)
            yield x.float().mul_(self._scale).sub_(self._shift), y

    def _augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n, c, h, w = x.shape
        p = self.pad
        if p > 0:
            padded = F.pad(x, (p, p, p, p))
            offsets = torch.randint(0, 2 * p + 1, (n, 2), generator=gen).to(x.device)
            rows = (offsets[:, 0:1] + torch.arange(h, device=x.device)).view(n, 1, h, 1)
            cols = (offsets[:, 1:2] + torch.arange(w, device=x.device)).view(n, 1, 1, w)
            batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
            chan = torch.arange(c, device=x.device).view(1, c, 1, 1)
            x = padded[batch, chan, rows, cols]
        if self.flip:
            flips = (torch.rand(n, generator=gen) < 0.5).to(x.device).view(n, 1, 1, 1)
            x = torch.where(flips, x.flip(3), x)
        return x


def batches(ds: ImageSet, batch_size: int, *, shuffle: bool = False, augment: bool = False,
            device: str | torch.device = "cpu", seed: int = 0, drop_last: bool = False, pad: int = 4,
            flip: bool | None = None) -> Batches:
    """Batches of `ds`; augment = random crop with `pad` zero pixels + horizontal flip (if ds.hflip or flip)."""
    return Batches(ds, batch_size, shuffle=shuffle, augment=augment, device=device, seed=seed,
                   drop_last=drop_last, pad=pad, flip=flip)
