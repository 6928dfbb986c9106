"""`netslim analyze`: a method's Plan and its evidence (spectra, scores), without touching the model."""

from __future__ import annotations

import copy
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from torch import nn

from netslim.cost.size import plan_size
from netslim.cost.targets import Target
from netslim.data import ImageSet
from netslim.io import atomic_dir, atomic_write_text
from netslim.plan import Plan
from netslim.report.markdown import table, write_markdown
from netslim.surgery.apply import apply_plan
from netslim.surgery.graph import PRUNABLE, out_width
from netslim.workflows.stages import analyse, machine


def analyse_to_dir(model: nn.Module, arch: str, train: ImageSet, *, method: str, target: Target | None,
                   options: dict[str, Any], device: str, calib_size: int, classes: list[int] | None,
                   out: Path | None, overwrite: bool = False, command: str = "",
                   val: ImageSet | None = None) -> dict[str, Any]:
    model = model.to(device).eval()
    base_classes = model.get_submodule(_classifier(model)).out_features
    if classes is not None:
        model = apply_plan(copy.deepcopy(model), Plan(arch=arch, num_classes=base_classes,
                                                      input_size=tuple(train.images.shape[1:]), classes=classes))
    found, ctx, seconds = analyse(model, arch, train, method, target, options, device, calib_size=calib_size, val=val)
    plan = found.plan
    template = ctx.template()
    planned = plan_size(plan, template)
    base = plan_size(ctx.base_plan(method), template)
    if classes is not None:
        plan.num_classes, plan.classes = base_classes, list(classes)
    gone = [n for n, _ in model.named_modules() if any(n == d or n.startswith(d + ".") for d in plan.drop)]
    widths = [{"layer": n, "before": out_width(m), "after": len(plan.keep.get(n, range(out_width(m))))
               if n not in gone else 0} for n, m in model.named_modules() if isinstance(m, PRUNABLE)]
    metrics = {"method": method, "target": str(target) if target else None, "options": options,
               "analysis_seconds": round(seconds, 3), "calibration_images": len(ctx.calib.labels),
               "base": base, "planned": planned, "widths": widths, "drop": plan.drop, "machine": machine(),
               "command": command, "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if out is not None:
        with atomic_dir(out, overwrite) as tmp:
            plan.save(tmp / "plan.json")
            atomic_write_text(tmp / "metrics.json", json.dumps(metrics, indent=1, default=str))
            for name, writer in found.artifacts.items():
                writer(tmp / name)
            ratio = [[k, base[k], planned[k], f"{planned[k] / base[k]:.3f}×"] for k in ("params", "macs", "flops")]
            write_markdown(tmp / "report.md", [
                f"# netslim analysis: {arch}, method `{method}`",
                f"{metrics['calibration_images']} calibration images · {seconds:.1f} s · {metrics['date']}",
                "## Planned size\n\n" + table(["", "base", "planned", "planned/base"], ratio),
                "## Per-layer widths\n\n" + table(["layer", "before", "after"],
                                                   [[w["layer"], w["before"], w["after"]] for w in widths]),
                *found.report,
                f"Command: `{command}`" if command else "",
            ])
    return metrics


def _classifier(model: nn.Module) -> str:
    from netslim.surgery.apply import find_classifier

    return find_classifier(model)
