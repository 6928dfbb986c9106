"""Fine-tuning on an ImageSet: the loader a Schedule asks for, then fit (one place that turns a recipe into steps)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from netslim.data import ImageSet, batches
from netslim.train.loop import fit
from netslim.train.schedule import Schedule


def finetune(model: nn.Module, train: ImageSet, sched: Schedule, device: str, val: ImageSet | None = None,
             checkpoint_dir: Path | None = None, resume: bool = False,
             mask_hook: Callable[[nn.Module], None] | None = None,
             teacher: nn.Module | None = None) -> list[dict[str, Any]]:
    """`sched.epochs` of SGD on shuffled (and, with sched.augment, augmented) full batches of `train`; with
    sched.distill > 0 the `teacher`'s outputs join the labels. 0 epochs trains nothing and returns []."""
    if sched.epochs <= 0:
        return []
    loader = batches(train, sched.batch_size, shuffle=True, augment=sched.augment, device=device, drop_last=True)
    val_loader = batches(val, 256, device=device) if val is not None else None
    return fit(model, loader, sched, val_batches=val_loader, checkpoint_dir=checkpoint_dir, resume=resume,
               device=device, mask_hook=mask_hook, teacher=teacher)
