"""The whole job: trained model + data -> Plan -> smaller model -> fine-tune -> measure -> run directory."""

from __future__ import annotations

import copy
import json
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netslim import __version__
from netslim.cost.budget import Target, model_size
from netslim.data import ImageSet, batches, calibration_subset, split_holdout
from netslim.io import atomic_dir, atomic_write_text
from netslim.methods import Context, get_method
from netslim.plan import Plan
from netslim.report.markdown import comparison_rows, table, widths_plot, write_markdown
from netslim.surgery.apply import apply_plan
from netslim.surgery.checkpoint import save_model


@dataclass
class Schedule:
    """Fine-tuning (or retraining) recipe; 0 epochs means no training after surgery."""

    epochs: int = 0
    lr: float = 0.01
    batch_size: int = 128
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    schedule: str = "onecycle"
    augment: bool = True
    bn_recal: int = 2000  # training images to re-estimate BatchNorm statistics after surgery (0: off)
    distill: float = 0.0  # weight of the unpruned network's softened outputs in the loss (0: labels only)
    temperature: float = 4.0  # distillation temperature

    def __post_init__(self) -> None:  # refused before any analysis runs, not after it
        from netslim.train.loop import check_distill

        check_distill(self.distill, self.temperature)


@dataclass
class Result:
    plan: Plan
    model: nn.Module
    metrics: dict[str, Any]
    run_dir: Path | None = None
    artifacts: dict[str, Any] = field(default_factory=dict)  # file name -> writer(path), from the method
    sections: list[str] = field(default_factory=list)  # markdown the method adds to the report


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": torch.get_num_threads(), "torch": torch.__version__, "netslim": __version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def measure_model(model: nn.Module, input_size: tuple[int, int, int], device: str,
                  latency: bool = True) -> dict[str, Any]:
    from netslim.cost.measure import measure_latency as time_model

    size = model_size(model, input_size)
    size["bytes"] = 4 * size["params"]
    if latency:
        rows = time_model(model, input_size, batch_sizes=(1, 64), device="cpu", max_seconds=3.0)
        if torch.cuda.is_available() and str(device).startswith("cuda"):
            rows += time_model(model, input_size, batch_sizes=(1, 1024), device=device, max_seconds=3.0)
        size["latency"] = rows
    return size


def accuracy(model: nn.Module, data: ImageSet | None, device: str, batch_size: int = 256) -> float | None:
    from netslim.train import evaluate

    if data is None:
        return None
    return float(evaluate(model, batches(data, batch_size, device=device), device=device)["accuracy"])


def finetune(model: nn.Module, train: ImageSet, sched: Schedule, device: str, val: ImageSet | None = None,
             checkpoint_dir: Path | None = None, resume: bool = False, mask_hook: Any = None,
             teacher: nn.Module | None = None) -> list[dict]:
    """`sched.epochs` of SGD on `train`; with sched.distill > 0 the `teacher`'s outputs join the labels."""
    from netslim.train import fit

    if sched.epochs <= 0:
        return []
    loader = batches(train, sched.batch_size, shuffle=True, augment=sched.augment, device=device, drop_last=True)
    val_loader = batches(val, 256, device=device) if val is not None else None
    return fit(model, loader, epochs=sched.epochs, lr=sched.lr, weight_decay=sched.weight_decay,
               schedule=sched.schedule, label_smoothing=sched.label_smoothing, val_batches=val_loader,
               checkpoint_dir=checkpoint_dir, resume=resume, device=device, mask_hook=mask_hook,
               teacher=teacher, distill=sched.distill, temperature=sched.temperature)


def recalibrated_accuracy(model: nn.Module, train: ImageSet, test: ImageSet | None, sched: Schedule,
                          device: str) -> float | None:
    """Re-estimate BatchNorm statistics on training images after surgery, each layer scaled back to its
    trained pre-BN variance (netslim.train.bn.restore_scale); test accuracy after it."""
    from netslim.train import restore_scale

    if sched.bn_recal <= 0 or not restore_scale(
            model, lambda: batches(train, sched.batch_size, shuffle=True, device=device, seed=7), device,
            sched.bn_recal)["images"]:
        return None
    return accuracy(model, test, device)


def reinitialise(model: nn.Module) -> None:
    """Fresh random weights with the same shapes (PFA/PCA 'scratch')."""
    for m in model.modules():
        if m is not model and hasattr(m, "reset_parameters"):
            m.reset_parameters()


def analyse(model: nn.Module, arch: str, train: ImageSet, method: str, target: Target | None,
            options: dict[str, Any], device: str, calib_size: int = 5000, val_fraction: float = 0.1,
            input_size: tuple[int, int, int] | None = None, cache: dict | None = None,
            seed: int = 0, val: ImageSet | None = None) -> tuple[Plan, Context, float]:
    """Run a method's analysis and return its Plan, the Context it saw, and the seconds it took.

    Methods that need labels validate on `val` when it is given (images the model was not trained on) and
    otherwise on a stratified `val_fraction` held out of `train`."""
    spec = get_method(method)
    if not spec.needs_labels:
        fit_part, val = train, None
    elif val is None:
        fit_part, val = split_holdout(train, val_fraction, seed=seed)
    else:
        fit_part = train
    calib = calibration_subset(fit_part, min(calib_size, len(fit_part.labels)), seed=seed)
    shape = input_size or tuple(train.images.shape[1:])
    ctx = Context(model=model.eval(), arch=arch, num_classes=_outputs(model), input_size=shape,  # type: ignore[arg-type]
                  calib=calib, train=fit_part, val=val, target=target, options=options, device=device,
                  cache=cache if cache is not None else {})
    t0 = time.perf_counter()
    plan = spec.fn(ctx)
    return plan, ctx, time.perf_counter() - t0


def _outputs(model: nn.Module) -> int:
    from netslim.surgery.apply import find_classifier

    return model.get_submodule(find_classifier(model)).out_features


def resolve_init(init: str | None, method: str) -> str:
    """"fine" or "scratch": None picks the method's default (PCA design trains from scratch)."""
    if init is None:
        return "scratch" if get_method(method).retrain == "scratch" else "fine"
    if init in ("fine", "inherit", "scratch"):
        return "fine" if init == "inherit" else init
    from netslim.errors import NetslimError

    raise NetslimError(f"init must be fine, inherit or scratch, not {init!r}")


def compress(model: nn.Module, arch: str, train: ImageSet, test: ImageSet | None, *, method: str = "pfa-kl",
             target: Target | None = None, options: dict[str, Any] | None = None,
             schedule: Schedule | None = None, device: str = "cpu", calib_size: int = 5000,
             init: str | None = None, classes: list[int] | None = None, out: Path | None = None,
             overwrite: bool = False, command: str = "", measure_latency: bool = True,
             val: ImageSet | None = None) -> Result:
    """One call from a trained model to a smaller, fine-tuned, measured one (and a run directory).

    `init`: "fine" (alias "inherit": surviving weights), "scratch" (random init), or None for what the
    method's paper does (its `retrain`). `val`: validation images for methods that decide on accuracy
    (lda), instead of a part held out of `train`; disjoint from `test`."""
    schedule = schedule or Schedule()
    init = resolve_init(init, method)
    options = dict(options or {})
    base_model = model.to(device).eval()
    base_classes = _outputs(base_model)
    if classes is not None:  # domain adaptation: the task sees only its classes' outputs
        task_plan = Plan(arch=arch, num_classes=base_classes, input_size=tuple(train.images.shape[1:]),
                         classes=classes)
        model = apply_plan(copy.deepcopy(base_model), task_plan)
    else:
        model = base_model
    with _maybe_dir(out, overwrite) as tmp:
        before = measure_model(model, tuple(train.images.shape[1:]), device, latency=False)  # timed with `after`
        before["accuracy"] = accuracy(model, test, device)
        plan, ctx, seconds = analyse(model, arch, train, method, target, options, device, calib_size=calib_size, val=val)
        if classes is not None:  # the saved Plan is relative to the base model, classes included
            plan.num_classes, plan.classes = base_classes, list(classes)
        small = apply_plan(copy.deepcopy(base_model), plan)
        if init == "scratch":
            reinitialise(small)
        acc_cut = accuracy(small, test, device)
        # A method that fine-tunes while it prunes (lda) leaves its network, already of the Plan's shape, in
        # ctx.cache["model"]; it replaces the base weights cut to the Plan (still measured above as "after surgery").
        tuned = ctx.cache.pop("model", None)
        acc_method = None
        if tuned is not None and init != "scratch":
            small = tuned.to(device)
            acc_method = accuracy(small, test, device) if schedule.epochs > 0 else None
        acc_bn = recalibrated_accuracy(small, train, test, schedule, device) if tuned is None and init != "scratch" \
            else None
        history = finetune(small, train, schedule, device, checkpoint_dir=(tmp / ".train") if tmp else None,
                           teacher=model)  # the unpruned network, when schedule.distill > 0
        after = measure_model(small, tuple(train.images.shape[1:]), device, latency=False)
        speed = measure_speed(model, small, tuple(train.images.shape[1:]), device, target) if measure_latency else []
        if speed:  # base and result timed in turns in this process, so their ratio is one measurement
            from netslim.cost.latency_table import latency_rows

            before["latency"], after["latency"] = latency_rows(speed, "base"), latency_rows(speed, "small")
        after["accuracy_after_surgery"] = acc_cut
        if acc_method is not None:  # the method's own network (e.g. lrs's fitted factors), before fine-tuning
            after["accuracy_before_finetune"] = acc_method
        if acc_bn is not None:
            after["accuracy_after_bn_recalibration"] = acc_bn
        after["accuracy"] = accuracy(small, test, device) if history or tuned is not None else (
            acc_bn if acc_bn is not None else acc_cut)
        metrics = {"method": method, "target": str(target) if target else None, "options": options,
                   "init": init, "classes": classes, "analysis_seconds": round(seconds, 3),
                   "calibration_images": len(ctx.calib.labels) if ctx.calib is not None else 0,
                   "validation_images": len(ctx.val.labels) if ctx.val is not None else 0,
                   "validation_from": None if ctx.val is None else "held out of train" if val is None else "given",
                   "schedule": schedule.__dict__, "history": history, "before": before, "after": after,
                   "speed": speed,
                   "widths": _widths(model, small, plan), "machine": machine(), "command": command,
                   "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        result = Result(plan, small, metrics, out, ctx.cache.get("artifacts", {}), ctx.cache.get("report", []))
        if tmp is not None:
            write_run(tmp, result)
    return result


def measure_speed(base: nn.Module, small: nn.Module, input_size: tuple[int, int, int], device: str,
                  target: Target | None = None) -> list[dict[str, Any]]:
    """Latency and throughput of the result next to the base, timed in turns: CPU fp32 at batch 1 and 64,
    and on CUDA batch 1 and 1024 in fp32 and bf16 (plus a latency target's own batch and threads)."""
    from netslim.cost.latency_table import compare_speed

    lat = target if target is not None and target.kind == "latency" else None
    threads = lat.threads if lat is not None and not str(lat.device).startswith("cuda") else None
    extra = (lat.batch,) if lat is not None else ()
    cpu_extra = extra if lat is not None and not str(lat.device).startswith("cuda") else ()
    rows = compare_speed(base, small, input_size, "cpu", tuple(dict.fromkeys((1, 64, *cpu_extra))), threads)
    if torch.cuda.is_available() and str(device).startswith("cuda"):
        cuda_extra = extra if lat is not None and str(lat.device).startswith("cuda") else ()
        rows += compare_speed(base, small, input_size, device, tuple(dict.fromkeys((1, 1024, *cuda_extra))))
    return rows


def _speed_section(speed: list[dict[str, Any]]) -> str:
    if not speed:
        return ""
    rows = [[r["device_name"] if r["device"] == "cpu" else r["device"], r["dtype"], r["batch"], r.get("threads"),
             r.get("base_ms"), r.get("ms"), f"{r['speedup']:.3f}×" if "speedup" in r else r.get("error"),
             r.get("base_throughput"), r.get("throughput")] for r in speed]
    slower = [f"{r['device']} {r['dtype']} batch {r['batch']}" for r in speed if r.get("speedup", 1.0) < 1.0]
    warning = ("\n\n**Slower than the base** at " + ", ".join(slower) + ": try `--round-to 8` (or 16 on "
               "AVX-512 CPUs) or a `--target latency=F`.") if slower else ""
    return ("## Speed (base and result timed in turns, medians)\n\n" + table(
        ["device", "dtype", "batch", "threads", "base ms", "after ms", "speedup", "base img/s", "after img/s"],
        rows) + warning)


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


def write_run(path: Path, result: Result) -> None:
    """plan.json, model.safetensors, metrics.json, report.md and widths.png (plus method artifacts)."""
    plan, m = result.plan, result.metrics
    result.plan.save(path / "plan.json")
    save_model(path / "model.safetensors", result.model, plan)
    atomic_write_text(path / "metrics.json", json.dumps(m, indent=1, default=str))
    w = m["widths"]
    widths_plot(path / "widths.png", [r["layer"] for r in w], [r["before"] for r in w], [r["after"] for r in w],
                f"{plan.arch}: {plan.method}")
    for name, writer in result.artifacts.items():
        writer(path / name)
    before, after = m["before"], m["after"]
    sections = [
        f"# netslim report: {plan.arch}, method `{plan.method}`",
        f"Target: {m['target'] or 'method default'} · init: {m['init']} · analysis: {m['analysis_seconds']} s on "
        f"{m['calibration_images']} calibration images · fine-tune: {m['schedule']['epochs']} epochs · "
        f"{m['date']} · torch {m['machine']['torch']}",
        "## Before and after\n\n" + table(["", "before", "after", "after/before"], comparison_rows(before, after)),
        _speed_section(m.get("speed", [])),
        "## Per-layer widths\n\n![widths](widths.png)\n\n" + table(
            ["layer", "before", "after"], [[r["layer"], r["before"], r["after"]] for r in w]),
        _history_section(m["history"]),
        *result.sections,
        f"Command: `{m['command']}`" if m["command"] else "",
    ]
    write_markdown(path / "report.md", sections)


def _history_section(history: list[dict]) -> str:
    if not history:
        return ""
    rows = [[h.get("epoch"), h.get("train_loss"), h.get("train_acc"), h.get("val_acc"), h.get("seconds")]
            for h in history]
    return "## Fine-tuning\n\n" + table(["epoch", "train loss", "train acc", "val acc", "seconds"], rows)
