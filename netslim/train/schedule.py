"""Learning-rate schedules as pure functions of the global step, so a resumed run needs only the step."""

from __future__ import annotations

import math

from netslim.errors import NetslimError

SCHEDULES = ("onecycle", "cosine", "constant")


def _anneal(start: float, end: float, frac: float) -> float:
    return end + (start - end) * (1.0 + math.cos(math.pi * min(max(frac, 0.0), 1.0))) / 2.0


def lr_at(schedule: str, base_lr: float, step: int, total_steps: int) -> float:
    """Learning rate for 0-based `step` of `total_steps`.

    onecycle follows torch's OneCycleLR defaults (30% cosine warm-up from lr/25, cosine down to lr/25e4),
    without momentum cycling; cosine decays from lr towards 0; constant is lr throughout.
    """
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
