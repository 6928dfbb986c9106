"""Rank bookkeeping and batch sharding, so one training loop serves a single process and torchrun alike."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from netslim.errors import NetslimError


def dist_info() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve_device(device: str | torch.device) -> torch.device:
    """Pin a bare "cuda" to this process's GPU (LOCAL_RANK under torchrun) and fail clearly without one."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise NetslimError(f"device '{device}' was requested but no CUDA GPU is available")
        if dev.index is None:
            _, world = dist_info()
            index = int(os.environ.get("LOCAL_RANK", 0)) if world > 1 else torch.cuda.current_device()
            dev = torch.device("cuda", index)
    return dev


def set_epoch(batches: Any, epoch: int) -> None:
    """Tell a re-iterable batch source which epoch comes next, so shuffles continue after a resume."""
    setter = getattr(batches, "set_epoch", None)
    if callable(setter):
        setter(epoch)
    elif hasattr(batches, "epoch"):
        batches.epoch = epoch


class StridedShard:
    """Rank r of w takes batches r, r+w, r+2w, ... of a source every rank iterates identically."""

    def __init__(self, source: Iterable, rank: int, world_size: int) -> None:
        self.source, self.rank, self.world_size = source, rank, world_size

    def set_epoch(self, epoch: int) -> None:
        set_epoch(self.source, epoch)

    def __len__(self) -> int:
        n = len(self.source)  # type: ignore[arg-type]
        return max(0, math.ceil((n - self.rank) / self.world_size))

    def __iter__(self) -> Iterator:
        for i, item in enumerate(self.source):
            if i % self.world_size == self.rank:
                yield item


def shard(batches: Iterable, rank: int, world_size: int) -> Iterable:
    """This rank's part of `batches`.

    A source that shards itself is used as is: either it already carries matching `rank`/`world_size`
    attributes, or it has a `shard(rank, world_size)` method returning the rank's view. Anything else is
    strided, which is correct as long as every rank's source yields the same sequence (same seed).
    """
    if world_size == 1:
        return batches
    if getattr(batches, "world_size", None) == world_size and getattr(batches, "rank", None) == rank:
        return batches
    method = getattr(batches, "shard", None)
    if callable(method):
        return method(rank, world_size)
    return StridedShard(batches, rank, world_size)


def count_batches(batches: Iterable) -> int:
    """len() when the source knows it, otherwise one counting pass (costs a pass over the data)."""
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        return sum(1 for _ in batches)


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce across ranks; a no-op in a single process. gloo needs CPU tensors, so stage."""
    _, world = dist_info()
    if world == 1:
        return tensor
    red = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op]
    if dist.get_backend() == "gloo" and tensor.device.type != "cpu":
        staged = tensor.cpu()
        dist.all_reduce(staged, op=red)
        tensor.copy_(staged)
    else:
        dist.all_reduce(tensor, op=red)
    return tensor


def barrier() -> None:
    if dist_info()[1] > 1:
        dist.barrier()
