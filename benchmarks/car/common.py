"""What the CAR benchmarks share: the images CAR evaluates ablations on, and an ablation engine on one layer."""

from __future__ import annotations

from typing import Any

import torch

from benchmarks._common import cifar10, trained


def eval_images(eval_size: int) -> tuple[torch.nn.Module, int, torch.Tensor, torch.Tensor]:
    """The shared VGG-16, its class count and the evaluation images (inputs, labels) that
    `netslim compress --method car` would rank filters on: drawn from the 90% of the training split it fits on."""
    from netslim.data import split_holdout
    from netslim.methods import Context
    from netslim.methods.car import CAROptions, eval_set

    train, _, _, n_classes = cifar10()
    model, arch, _ = trained(num_classes=n_classes)
    fit_part, _ = split_holdout(train, 0.1, seed=0)  # what `compress --method car` sees as ctx.train
    ctx = Context(model=model, arch=arch, num_classes=n_classes, input_size=(3, 32, 32), train=fit_part,
                  opts=CAROptions(eval_size=eval_size))
    x, y, _ = eval_set(ctx)
    return model, n_classes, x, y


def layer_engine(model: torch.nn.Module, layer: str, x: torch.Tensor, y: torch.Tensor, n_classes: int,
                 masks_per_pass: int, **options: Any) -> Any:
    """An AblationEngine on one layer (batches of 256 images); `fast=False` for the naive full-network path."""
    from netslim.methods.car import AblationEngine

    return AblationEngine(model, [(layer,)], x, y, n_classes, batch_size=256, masks_per_pass=masks_per_pass,
                          **options)


def cpu_per_eval(engine: Any) -> float:
    """Process CPU seconds per evaluation the engine has made so far."""
    return engine.stats.cpu_seconds / engine.stats.evaluations


def images_lost(run: Any, filters: list[int] | None = None) -> list[int]:
    """Evaluation images that removing each filter (every one, or those in `filters`) costs, by a greedy run's
    first ranking."""
    chosen = range(run.width) if filters is None else filters
    return [round((run.base_accuracy - run.first_car[f]) * run.eval_images) for f in chosen]
