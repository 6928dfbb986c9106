"""CAR's greedy loop on one slot of an AblationEngine, and the record of what it did (GreedyRun).

CAR(f) = acc(network) - acc(network without f): the filter with the smallest CAR goes first, and CAR is
re-ranked on the smaller network every `per_step` removals (1: the paper's exact greedy).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from netslim.errors import NetslimError
from netslim.methods.car.engine import AblationEngine


@dataclass
class GreedyRun:
    """What the greedy loop did on one coupled group."""

    root: str
    layers: tuple[str, ...]
    width: int
    eval_images: int
    per_step: int
    base_accuracy: float
    removed: list[int] = field(default_factory=list)  # filters in removal order
    car: list[float] = field(default_factory=list)  # CAR of each removed filter when it was ranked
    loss_rise: list[float] = field(default_factory=list)  # its eval cross-entropy increase (tie-break)
    accuracy: list[float] = field(default_factory=list)  # eval accuracy after each removal
    first_car: list[float] = field(default_factory=list)  # CAR of every filter of the unpruned layer
    classwise: list[list[float]] = field(default_factory=list)  # [filter][class] accuracy change
    stopped: str = "target width reached"
    adaptive: bool = False
    rankings: int = 0  # full rankings of the remaining filters
    engine: dict[str, Any] = field(default_factory=dict)
    ranking: dict[str, Any] = field(default_factory=dict)  # the first full ranking alone (time, evaluations)
    path: str = ""
    unit: str = "filter"  # what a channel of the slot is: "filter", or "head" of an attention

    @property
    def kept(self) -> list[int]:
        gone = set(self.removed)
        return [c for c in range(self.width) if c not in gone]

    @property
    def mode(self) -> str:
        if self.per_step == 1:
            return "exact greedy: CAR recomputed after every removal"
        if self.adaptive:
            return (f"re-ranked every {self.per_step} removals or sooner (adaptive: a block stops at a removal "
                    "costing more than its CAR)")
        return f"re-ranked every {self.per_step} removals"


def greedy(engine: AblationEngine, slot: int, remove: int, per_step: int = 1, max_drop: float | None = None,
           root: str = "", adaptive: bool = True) -> GreedyRun:
    """Remove `remove` channels of one slot greedily by smallest CAR.

    Ties in CAR (frequent on training images a network fits perfectly) go to the filter whose removal
    raises the evaluation cross-entropy least, then to the lower index. With `per_step=K > 1` the K best
    of a ranking are removed before the next ranking; `adaptive` cuts such a block short at the first
    removal that costs more (on top of the ones before it) than its own CAR predicted, and halves the
    next block, so interacting removals fall back to one-at-a-time re-ranking where the layer is fragile.
    """
    if per_step < 1:
        raise NetslimError(f"--per-step must be at least 1, got {per_step}")
    sl = engine.slot_slice(slot)
    width = sl.stop - sl.start
    n = engine.n
    mask = engine.full_mask()
    alive = list(range(width))
    counts, losses = engine.evaluate(torch.cat([mask[None], _without(mask, [sl.start + c for c in alive])]))
    current, cur_loss = float(counts[0].sum()), float(losses[0])
    totals = engine.class_totals().clamp_min(1)
    run = GreedyRun(root, engine.slots[slot].layers, width, n, per_step, current / n, path=engine.path,
                    adaptive=adaptive and per_step > 1, rankings=1)
    block = per_step
    run.ranking = {"evaluations": engine.stats.evaluations, "seconds": round(engine.stats.seconds, 3),
                   "cpu_seconds": round(engine.stats.cpu_seconds, 3),
                   "cache_seconds": round(engine.stats.cache_seconds, 3)}
    run.first_car = ((current - counts[1:].sum(1)) / n).tolist()
    run.classwise = ((counts[0][None] - counts[1:]) / totals).tolist()
    floor = None if max_drop is None else current - max_drop * n - 1e-9
    ablated: torch.Tensor | None = counts[1:].sum(1)
    abl_loss = losses[1:]
    while len(run.removed) < remove:
        if ablated is None:
            c, abl_loss = engine.evaluate(_without(mask, [sl.start + c for c in alive]))
            ablated = c.sum(1)
            run.rankings += 1
        car = (current - ablated) / n
        rise = (abl_loss - cur_loss) / n
        order = sorted(range(len(alive)), key=lambda i: (float(car[i]), float(rise[i]), alive[i]))
        take = order[:min(block, remove - len(run.removed), len(alive) - 1)]
        if not take:
            run.stopped = "one filter left"
            break
        if len(take) == 1:
            after, after_loss = [float(ablated[take[0]])], [float(abl_loss[take[0]])]
        else:
            steps = mask.repeat(len(take), 1)
            for j, i in enumerate(take):
                steps[j:, sl.start + alive[i]] = 0
            c, step_loss = engine.evaluate(steps)
            after, after_loss = c.sum(1).tolist(), step_loss.tolist()
        at_ranking = current
        accepted = 0
        for j, i in enumerate(take):
            if floor is not None and after[j] < floor:
                run.stopped = f"accuracy floor reached (max drop {max_drop})"
                break
            if run.adaptive and j > 0 and after[j - 1] - after[j] > at_ranking - float(ablated[i]):
                break  # interacts with the removals before it: re-rank now
            accepted += 1
            mask[sl.start + alive[i]] = 0
            run.removed.append(alive[i])
            run.car.append(float(car[i]))
            run.loss_rise.append(float(rise[i]))
            run.accuracy.append(after[j] / n)
            current, cur_loss = after[j], after_loss[j]
        if run.stopped.startswith("accuracy floor"):
            break
        if run.adaptive:
            block = min(per_step, 2 * block) if accepted == len(take) else max(1, block // 2)
        alive = [c for c in alive if mask[sl.start + c] > 0]
        ablated = None
    run.engine = engine.stats.as_dict()
    return run


def _without(mask: torch.Tensor, channels: list[int]) -> torch.Tensor:
    out = mask.repeat(len(channels), 1)
    out[torch.arange(len(channels)), torch.tensor(channels, dtype=torch.long)] = 0
    return out
