"""What an int8 export reads besides the run's model: training images for calibration and for the
sensitivity pass (disjoint), and the base network the compressed one is measured against.

The base is the network the run was cut from: `--base FILE`, else the `--weights` of the compress command
the run recorded in metrics.json. A run that does not record it (or whose file has moved) is exported
without a base, and the report says why, rather than failing an export over a comparison.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netslim.data import ImageSet
from netslim.errors import NetslimError
from netslim.plan import Plan


def training_images(train: ImageSet, calib: int, holdout: int = 0, seed: int = 0) -> tuple[ImageSet, ImageSet | None]:
    """(`calib` calibration images, `holdout` other ones for the sensitivity pass or None), drawn at random
    from the training split: quantization never sees a test image."""
    if calib < 1:
        raise NetslimError(f"the calibration set is empty (--calib-images {calib}): int8 ranges need at least one "
                           f"training image")
    if len(train) == 0:
        raise NetslimError("the calibration set is empty: the data has no training images")
    if calib + holdout > len(train):
        raise NetslimError(f"{calib} calibration and {holdout} held-out images need {calib + holdout} training "
                           f"images, but the data has {len(train)}")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    held = train.subset(order[calib:calib + holdout]) if holdout else None
    return train.subset(order[:calib]), held


def recorded_weights(run_dir: Path) -> Path | None:
    """The --weights of the command that made the run (metrics.json), as it was typed; None if not recorded."""
    try:
        record = json.loads((Path(run_dir) / "metrics.json").read_text())
        args = shlex.split(record.get("command") or "") if isinstance(record, dict) else []
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    for i, a in enumerate(args):
        if a in ("--weights", "-w") and i + 1 < len(args):
            return Path(args[i + 1])
        if a.startswith("--weights="):
            return Path(a.split("=", 1)[1])
    return None


def load_base(weights: Path, plan: Plan) -> nn.Module:
    """The unpruned network of `plan`'s architecture with `weights`, scoring the run's classes."""
    from netslim.surgery.apply import apply_plan
    from netslim.surgery.checkpoint import build_from_plan, load_tensors, plan_of, read_tensors
    from netslim.zoo import build

    tensors, meta = read_tensors(Path(weights))
    own = plan_of(meta, str(weights))
    if own is not None and (own.keep or own.drop or own.factorize or own.classes is not None):
        raise NetslimError(f"base weights {weights} are themselves compressed; give the network the run was cut from")
    if own is not None and own.arch != plan.arch:
        raise NetslimError(f"base weights {weights} hold a {own.arch!r} network, the run a {plan.arch!r} one")
    with torch.device("meta"):
        model = build(plan.arch, num_classes=plan.num_classes, in_channels=plan.input_size[0], allow_code=False,
                      image_size=tuple(plan.input_size[1:])) if own is None else build_from_plan(own, "meta")
    model = model.to_empty(device="cpu")
    load_tensors(model, tensors, str(weights), plan.arch)
    if plan.classes is not None:  # the run scores a subset of the base's classes: compare like with like
        model = apply_plan(model, Plan(plan.arch, plan.num_classes, tuple(plan.input_size), classes=plan.classes))
    return model.float().eval()


def base_network(run_dir: Path, plan: Plan, given: Path | None = None) -> tuple[nn.Module | None, dict[str, Any]]:
    """(the base network or None, what the report says about it). A `given` file that cannot be the base is an
    error; a recorded one that cannot is a note."""
    if given is not None:
        return load_base(given, plan), {"available": True, "weights": str(given), "from": "--base"}
    recorded = recorded_weights(run_dir) if Path(run_dir).is_dir() else None
    if recorded is None:
        return None, {"available": False, "reason": "the run does not record the weights it was cut from (no "
                                                    "--weights in metrics.json's command); pass --base FILE"}
    if not recorded.is_file():
        return None, {"available": False, "reason": f"the run's base weights {recorded} are not found from here; "
                                                    f"pass --base FILE"}
    try:
        return load_base(recorded, plan), {"available": True, "weights": str(recorded), "from": "metrics.json"}
    except NetslimError as e:
        return None, {"available": False, "reason": f"the run's base weights cannot be loaded: {e}"}
