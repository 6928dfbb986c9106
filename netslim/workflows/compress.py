"""`compress`: trained model + data -> method -> Plan -> cut, repair, fine-tune -> measure -> run directory."""

from __future__ import annotations

import copy
import shutil
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netslim.cost.targets import Target
from netslim.data import ImageSet
from netslim.errors import NetslimError
from netslim.io import atomic_dir
from netslim.plan import Plan
from netslim.repair import Repair
from netslim.report.rundir import write_run
from netslim.surgery.apply import apply_plan
from netslim.surgery.depth import unused_modules
from netslim.train import Schedule
from netslim.workflows.stages import (
    StageRecord,
    accuracy,
    analyse,
    machine,
    measured_pair,
    outputs,
    resolve_init,
    run_stages,
)


@dataclass
class Result:
    plan: Plan
    model: nn.Module
    metrics: dict[str, Any]
    run_dir: Path | None = None
    artifacts: dict[str, Any] = field(default_factory=dict)  # file name -> writer(path), from the method
    sections: list[str] = field(default_factory=list)  # markdown the method adds to the report


def compress(model: nn.Module, arch: str, train: ImageSet, test: ImageSet | None, *, method: str = "pfa-kl",
             target: Target | None = None, options: dict[str, Any] | None = None,
             schedule: Schedule | None = None, device: str = "cpu", calib_size: int = 5000,
             init: str | None = None, classes: list[int] | None = None, out: Path | None = None,
             overwrite: bool = False, command: str = "", measure_latency: bool = True,
             val: ImageSet | None = None, repair: Repair | None = None, data: str | None = None,
             unused: str = "keep") -> Result:
    """One call from a trained model to a smaller, fine-tuned, measured one (and a run directory).

    `init`: "fine" (alias "inherit": surviving weights), "scratch" (random init), or None for what the
    method's paper does (its `retrain`). `val`: validation images for methods that decide on accuracy
    (lda), instead of a part held out of `train`; disjoint from `test`. `repair`: what happens between the cut
    and fine-tuning (default: least-squares refit, then BatchNorm re-estimation). `data`: the dataset spec,
    recorded so that `pack` and `export` find the run's own data. `unused`: "remove" also drops the modules
    inference never uses (auxiliary heads; netslim.surgery.depth.unused_modules), "keep" leaves them."""
    from netslim.methods import validate_options

    schedule = schedule or Schedule()
    init = resolve_init(init, method)
    options = dict(options or {})
    validate_options(method, options)  # before anything is measured or analysed
    if unused not in ("keep", "remove"):
        raise NetslimError(f"--unused must be keep or remove, not {unused!r}")
    base_model = model.to(device).eval()
    base_classes = outputs(base_model)
    size = tuple(train.images.shape[1:])
    if classes is not None:  # domain adaptation: the task sees only its classes' outputs
        model = apply_plan(copy.deepcopy(base_model), Plan(arch=arch, num_classes=base_classes, input_size=size,
                                                           classes=classes))
    else:
        model = base_model
    with _maybe_dir(out, overwrite) as tmp:
        base_accuracy = accuracy(model, test, device)
        found, ctx, seconds = analyse(model, arch, train, method, target, options, device, calib_size=calib_size,
                                      val=val)
        plan = found.plan
        removed = _drop_unused(model, plan, train, device) if unused == "remove" else []
        if classes is not None:  # the saved Plan is relative to the base model, classes included
            plan.num_classes, plan.classes = base_classes, list(classes)
        rec = run_stages(base_model, found, train, test, schedule=schedule, device=device, init=init,
                         checkpoint_dir=(tmp / ".train") if tmp else None, teacher=model, repair=repair)
        if tmp is not None:  # the training state only serves a run in progress: compress cannot resume
            shutil.rmtree(tmp / ".train", ignore_errors=True)
        small, plan = rec.model, rec.plan or plan
        before, after, speed = measured_pair(model, small, size, device, target=target, latency=measure_latency)
        before["accuracy"] = base_accuracy
        after.update(rec.accuracies())
        if rec.bn_after_refit:
            after["bn_recalibration_kept"] = rec.bn_after_refit["kept"]
        metrics = {"method": method, "target": str(target) if target else None, "options": options,
                   "init": init, "classes": classes, "data": data, "class_names": list(train.classes),
                   "analysis_seconds": round(seconds, 3),
                   "calibration_images": len(ctx.calib.labels) if ctx.calib is not None else 0,
                   "validation_images": len(ctx.val.labels) if ctx.val is not None else 0,
                   "validation_from": None if ctx.val is None else "held out of train" if val is None else "given",
                   "latency_target": plan.meta.get("latency"),  # its runtime, conditions and timings
                   "schedule": schedule.__dict__, "repair": _repair_record(rec, repair), "unused_removed": removed,
                   "history": rec.history, "before": before, "after": after,
                   "speed": speed, "widths": _widths(model, small, plan), "machine": machine(), "command": command,
                   "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        sections = [*found.report, *([rec.refit.to_markdown()] if rec.refit is not None else [])]
        result = Result(plan, small, metrics, out, found.artifacts, sections)
        if tmp is not None:
            write_run(tmp, plan=plan, model=small, metrics=metrics, artifacts=found.artifacts, sections=sections,
                      classes=list(train.classes))
    return result


def _drop_unused(model: nn.Module, plan: Plan, train: ImageSet, device: str) -> list[dict[str, Any]]:
    """Add the modules inference never uses to the Plan's drops; each with its parameter count."""
    p = next(model.parameters())
    gone = unused_modules(model, torch.zeros(1, *train.images.shape[1:], device=p.device, dtype=p.dtype))
    plan.drop += [n for n in gone if n not in plan.drop]
    return [{"module": n, "params": sum(p.numel() for p in model.get_submodule(n).parameters())} for n in gone]


def _repair_record(rec: StageRecord, repair: Repair | None) -> dict[str, Any]:
    """What the repair stage did: its settings, seconds and (for a refit) every layer's error before/after."""
    out: dict[str, Any] = {"mode": rec.repair, "seconds": round(rec.repair_seconds, 1),
                           "settings": asdict(repair or Repair())}
    if rec.refit is not None:
        out["refit"] = rec.refit.to_dict()
    if rec.bn_after_refit:
        out["bn_after_refit"] = rec.bn_after_refit
    if rec.selection is not None:
        out["selection"] = rec.selection
    if rec.kept:
        out["finetune_choice"] = rec.kept
    return out


def _widths(before: nn.Module, after: nn.Module, plan: Plan) -> list[dict[str, Any]]:
    from netslim.surgery.graph import PRUNABLE, out_width

    rows = []
    after_mods = dict(after.named_modules())
    for name, m in before.named_modules():
        if isinstance(m, PRUNABLE):
            new = after_mods.get(name)
            if isinstance(new, PRUNABLE):
                width = out_width(new)
            elif name in plan.drop or new is None or isinstance(new, nn.Identity):
                width = 0
            else:  # replaced by a factorized module: same outputs
                width = out_width(m)
            rows.append({"layer": name, "before": out_width(m), "after": width})
    return rows


class _maybe_dir:
    def __init__(self, out: Path | None, overwrite: bool) -> None:
        self.cm = atomic_dir(out, overwrite) if out is not None else None

    def __enter__(self) -> Path | None:
        return self.cm.__enter__() if self.cm else None

    def __exit__(self, *exc: Any) -> bool | None:
        return self.cm.__exit__(*exc) if self.cm else None
