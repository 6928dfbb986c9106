"""Fine-tuning on an ImageSet: the loader a Schedule asks for, then fit (one place that turns a recipe into steps)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
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
    """`sched.epochs` of training on shuffled (and, with sched.augment, augmented) full batches of `train`; with
    sched.distill > 0 the `teacher`'s outputs join the labels. 0 epochs trains nothing and returns []."""
    if sched.epochs <= 0:
        return []
    if sched.budget_minutes is not None:
        train, sched = fit_budget(model, train, sched, device, teacher)
    loader = batches(train, sched.batch_size, shuffle=True, augment=sched.augment, device=device, drop_last=True)
    val_loader = batches(val, 256, device=device) if val is not None else None
    return fit(model, loader, sched, val_batches=val_loader, checkpoint_dir=checkpoint_dir, resume=resume,
               device=device, mask_hook=mask_hook, teacher=teacher)


PROBE_STEPS = 4
BUDGET_SHARE = 0.85  # of the budget spent on steps; the rest covers loading, evaluation and timing noise


def fit_budget(model: nn.Module, train: ImageSet, sched: Schedule, device: str,
               teacher: nn.Module | None = None) -> tuple[ImageSet, Schedule]:
    """The training images and epochs that fit `sched.budget_minutes`, timed on this machine: a few steps on a
    copy give the seconds per step, and the schedule shrinks to whole epochs, or to one epoch over a subset,
    so that a shortened run is still one complete onecycle (its learning rate anneals to the end)."""
    import copy
    import time

    from netslim.data import calibration_subset

    per_epoch = len(train.labels) // sched.batch_size
    probe = calibration_subset(train, min(len(train.labels), PROBE_STEPS * sched.batch_size), seed=3)
    t0 = time.perf_counter()
    fit(copy.deepcopy(model), batches(probe, sched.batch_size, shuffle=True, augment=sched.augment, device=device,
                                      drop_last=True),
        replace(shorter(sched, 1), budget_minutes=None), device=device, progress=False,
        teacher=teacher if sched.distill > 0 else None)
    per_step = (time.perf_counter() - t0) / max(1, len(probe.labels) // sched.batch_size)
    steps = int(sched.budget_minutes * 60 * BUDGET_SHARE / per_step) if sched.budget_minutes else 0
    if steps >= sched.epochs * per_epoch:
        return train, sched
    if steps >= per_epoch:
        return train, shorter(sched, steps // per_epoch)
    images = max(sched.batch_size, steps * sched.batch_size)
    return calibration_subset(train, min(images, len(train.labels)), seed=4), shorter(sched, 1)


def shorter(sched: Schedule, epochs: int) -> Schedule:
    """`sched` over fewer epochs, its warm-up shortened in proportion (a whole number of epochs, fewer than all)."""
    return replace(sched, epochs=epochs, warmup_epochs=sched.warmup_epochs * epochs // max(sched.epochs, 1))
