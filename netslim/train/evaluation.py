"""Accuracy and loss over a batch source; counts are summed over ranks so every rank sees global numbers."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from netslim.errors import NetslimError
from netslim.train.distributed import all_reduce_, dist_info, resolve_device, shard


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DDP wrapper (DDP's forward would broadcast buffers, a collective)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def to_device_input(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if device.type == "cuda" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable,
    device: str | torch.device = "cpu",
    num_classes: int | None = None,
    *,
    amp: bool = False,
) -> dict[str, Any]:
    """Top-1 accuracy, mean cross-entropy, per-class accuracy and sample count.

    The model is moved to `device` and left there, evaluated in eval mode and returned to the mode it
    had. Under torch.distributed every rank must call this: each evaluates its shard and the counts
    are summed, so the result is the same global figure on all ranks. per_class[k] is None for a
    class with no samples.
    """
    dev = resolve_device(device)
    module = unwrap(model)
    was_training = module.training
    module.to(dev).eval()
    rank, world = dist_info()
    source = shard(batches, rank, world)
    width = num_classes
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    correct = total = None
    max_label = torch.full((), -1, dtype=torch.int64, device=dev)
    outside = torch.zeros((), dtype=torch.int64, device=dev)
    try:
        for x, y in source:
            x, y = to_device_input(x, dev), y.to(dev, non_blocking=True)
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
                logits = module(x)
            logits = logits.float()
            if width is None:
                width = logits.shape[1]
            if correct is None:
                correct = torch.zeros(width, dtype=torch.float64, device=dev)
                total = torch.zeros(width, dtype=torch.float64, device=dev)
            max_label = torch.maximum(max_label, y.max())
            outside += ((y < 0) | (y >= width)).sum()
            yc = y.clamp(0, width - 1)  # out-of-range labels are reported after the loop, without a sync here
            loss_sum += F.cross_entropy(logits, yc, reduction="sum").double()
            hits = (logits.argmax(1) == y).double()
            correct.scatter_add_(0, yc, hits)
            total.scatter_add_(0, yc, torch.ones_like(hits))
    finally:
        module.train(was_training)
    if world > 1:  # a rank that saw no batch learns the width from the others
        width = int(all_reduce_(torch.tensor([width or 0], device=dev), "max").item())
    width = width or 0
    if correct is None or correct.numel() != width:  # this rank saw nothing; it still joins the reduction
        correct = torch.zeros(width, dtype=torch.float64, device=dev)
        total = torch.zeros(width, dtype=torch.float64, device=dev)
    packed = torch.cat([max_label.double().view(1), loss_sum.view(1), outside.double().view(1), correct, total])
    if world > 1:
        all_reduce_(packed[:1], "max")
        all_reduce_(packed[1:])
    packed = packed.cpu()
    top_label, loss_total, n_outside = int(packed[0]), float(packed[1]), int(packed[2])
    correct, total = packed[3 : 3 + width], packed[3 + width :]
    n = int(total.sum())
    if n == 0:
        raise NetslimError("nothing to evaluate: the batch source yielded no samples")
    if n_outside:
        raise NetslimError(
            f"{n_outside} labels lie outside the model's classes 0..{width - 1} (largest label {top_label})"
        )
    per_class = [float(c / t) if t > 0 else None for c, t in zip(correct.tolist(), total.tolist(), strict=True)]
    return {
        "accuracy": float(correct.sum()) / n,
        "loss": loss_total / n,
        "per_class": per_class,
        "n": n,
    }
