"""The training recipe (Schedule) and its learning-rate curves.

One frozen Schedule is all fit needs to know about how to train: callers build it once (the CLI, a
workflow, a method's fine-tuning round) and a bad recipe is refused when it is made, before any analysis
runs. The curves are pure functions of the global step, so a resumed run needs only the step.

Fields added after recipes were first written into checkpoints and bench manifests (`LATER_FIELDS`) default to
what every older recipe did, so an older recipe that lacks them still compares equal to its own run.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from netslim.errors import NetslimError

SCHEDULES = ("onecycle", "cosine", "constant")
OPTIMIZERS = ("sgd", "adamw")
LATER_FIELDS: dict[str, Any] = {"optimizer": "sgd", "warmup_epochs": 0}  # older recipes lack them: they used these


def check_distill(distill: float, temperature: float) -> None:
    """The distillation settings on their own."""
    if not 0.0 <= distill <= 1.0:
        raise NetslimError(f"--distill must be in [0, 1], got {distill}")
    if not temperature > 0:
        raise NetslimError(f"distillation temperature must be positive, got {temperature}")


@dataclass(frozen=True)
class Schedule:
    """Training or fine-tuning recipe; 0 epochs means no training (after surgery: keep the cut weights).

    `optimizer` "sgd" uses momentum and nesterov; "adamw" decays only weight matrices and kernels
    (netslim.train.optim), as vision transformers are trained. `warmup_epochs` ramps the learning rate up
    linearly before a cosine or constant schedule (onecycle has its own warm-up). Frozen so that the checks
    below cannot be bypassed afterwards; use dataclasses.replace for a variant.
    """

    epochs: int = 0
    lr: float = 0.01
    batch_size: int = 128
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    schedule: str = "onecycle"  # one of SCHEDULES
    augment: bool = True
    bn_recal: int = 2000  # training images to re-estimate BatchNorm statistics after surgery (0: off)
    distill: float = 0.0  # weight of the unpruned network's softened outputs in the loss (0: labels only)
    temperature: float = 4.0  # distillation temperature
    momentum: float = 0.9
    nesterov: bool = True  # only where momentum > 0
    budget_minutes: float | None = None  # wall-clock limit: the schedule is shortened (still one onecycle) to fit
    optimizer: str = "sgd"  # one of OPTIMIZERS
    warmup_epochs: int = 0  # linear warm-up epochs before a cosine or constant schedule

    def __post_init__(self) -> None:  # refused before any analysis runs, not after it
        if self.epochs < 0:
            raise NetslimError(f"epochs must not be negative, got {self.epochs}")
        if not self.lr > 0:
            raise NetslimError(f"learning rate must be positive, got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise NetslimError(f"unknown schedule '{self.schedule}'; choose one of {', '.join(SCHEDULES)}")
        if self.batch_size < 1:
            raise NetslimError(f"batch size must be at least 1, got {self.batch_size}")
        if not self.momentum >= 0:
            raise NetslimError(f"momentum must not be negative, got {self.momentum}")
        if self.budget_minutes is not None and not self.budget_minutes > 0:
            raise NetslimError(f"--budget-minutes must be positive, got {self.budget_minutes}")
        if self.optimizer not in OPTIMIZERS:
            raise NetslimError(f"unknown optimizer '{self.optimizer}'; choose one of {', '.join(OPTIMIZERS)}")
        if not self.weight_decay >= 0:
            raise NetslimError(f"weight decay must not be negative, got {self.weight_decay}")
        self._check_warmup()
        check_distill(self.distill, self.temperature)

    def _check_warmup(self) -> None:
        if isinstance(self.warmup_epochs, bool) or not isinstance(self.warmup_epochs, int) or self.warmup_epochs < 0:
            raise NetslimError(f"--warmup-epochs must be a whole number of epochs >= 0, got {self.warmup_epochs!r}")
        if self.warmup_epochs and self.schedule == "onecycle":
            raise NetslimError("--warmup-epochs is for the cosine and constant schedules; onecycle warms up on its "
                               "own (its first 30%)")
        if self.warmup_epochs and self.epochs and self.warmup_epochs >= self.epochs:
            raise NetslimError(f"--warmup-epochs {self.warmup_epochs} leaves none of the {self.epochs} epochs for "
                               "the schedule after it; use fewer")


def recorded(schedule: Schedule) -> dict[str, Any]:
    """The recipe as recorded for a later comparison: LATER_FIELDS at their defaults are left out, so the record
    of a run that does not use them equals the one written before they existed."""
    return {k: v for k, v in asdict(schedule).items() if k not in LATER_FIELDS or v != LATER_FIELDS[k]}


def _anneal(start: float, end: float, frac: float) -> float:
    return end + (start - end) * (1.0 + math.cos(math.pi * min(max(frac, 0.0), 1.0))) / 2.0


def lr_at(schedule: str, base_lr: float, step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """Learning rate for 0-based `step` of `total_steps`.

    onecycle follows torch's OneCycleLR defaults (30% cosine warm-up from lr/25, cosine down to lr/25e4),
    without momentum cycling; cosine decays from lr towards 0; constant is lr throughout. The first
    `warmup_steps` (cosine and constant) rise linearly to lr, reaching it at the last of them; cosine then
    decays over the steps that remain.
    """
    if warmup_steps > 0 and schedule != "onecycle":
        if step < warmup_steps:
            return base_lr * (step + 1) / warmup_steps
        step, total_steps = step - warmup_steps, total_steps - warmup_steps
    if schedule == "constant":
        return base_lr
    if schedule == "cosine":
        return _anneal(base_lr, 0.0, step / max(total_steps, 1))
    if schedule == "onecycle":
        start, end = base_lr / 25.0, base_lr / 25.0 / 1e4
        peak = 0.3 * total_steps - 1.0
        if step <= peak:
            return _anneal(start, base_lr, step / peak if peak > 0 else 1.0)
        return _anneal(base_lr, end, (step - peak) / max(total_steps - 1.0 - peak, 1e-9))
    raise NetslimError(f"unknown schedule '{schedule}'; choose one of {', '.join(SCHEDULES)}")
