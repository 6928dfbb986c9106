"""The one sequence after a method's analysis: cut → repair → fine-tune → measure.

`compress`, `bench` and the benchmarks all call `run_stages`, so an accuracy column means the same thing in
every table: "after surgery" is always the trained weights cut to the Plan, "method's network" is the network
a method fitted itself (lda, lrs), "after BN recalibration" the cut network after BatchNorm repair, and
"accuracy" the network handed to the user.
"""

from __future__ import annotations

import copy
import platform
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from netslim._version import __version__
from netslim.cost.size import model_size
from netslim.cost.targets import Target
from netslim.cost.timing import compare_speed, latency_rows
from netslim.cost.timing import measure_latency as time_model
from netslim.data import ImageSet, batches, calibration_subset, split_holdout
from netslim.errors import NetslimError
from netslim.methods import AnalysisCache, Context, MethodResult, get_method
from netslim.plan import Plan
from netslim.repair import RefitReport, Repair, lsq_refit, thinet_select
from netslim.surgery.apply import apply_plan, find_classifier
from netslim.surgery.clone import clone
from netslim.train import Schedule, evaluate, finetune, restore_scale

INITS = ("fine", "inherit", "scratch")
VAL_IMAGES = 1000  # training images held out to choose between the repaired and the fine-tuned network


def resolve_init(init: str | None, method: str) -> str:
    """"fine" or "scratch": None picks what the method's paper does (PCA design retrains from scratch)."""
    if init is None:
        return "scratch" if get_method(method).retrain == "scratch" else "fine"
    if init not in INITS:
        raise NetslimError(f"init must be fine, inherit or scratch, not {init!r}")
    return "fine" if init == "inherit" else init


def accuracy(model: nn.Module, data: ImageSet | None, device: str, batch_size: int = 256) -> float | None:
    if data is None:
        return None
    return float(evaluate(model, batches(data, batch_size, device=device), device=device)["accuracy"])


def reinitialise(model: nn.Module) -> None:
    """Fresh random weights with the same shapes (training from scratch)."""
    for m in model.modules():
        if m is not model and hasattr(m, "reset_parameters"):
            m.reset_parameters()


def refit_images(train: ImageSet, repair: Repair) -> tuple[ImageSet, ImageSet | None]:
    """The refit's training images: `repair.images` to fit, `repair.holdout` disjoint others to check on."""
    n = min(len(train.labels), repair.images + repair.holdout)
    pool = calibration_subset(train, n, seed=11)
    if repair.holdout and n > repair.holdout:
        return split_holdout(pool, repair.holdout / n, seed=11)
    return pool, None


def refit(base: nn.Module, cut: nn.Module, plan: Plan, images: tuple[ImageSet, ImageSet | None], repair: Repair,
          device: str) -> RefitReport:
    """Least-squares refit of `cut` (in place) to `base`'s layer outputs, on the training images of refit_images."""
    fit_part, hold = images
    return lsq_refit(base, cut, lambda: batches(fit_part, 128, device=device),  # it sets and restores eval modes
                     holdout=(lambda: batches(hold, 128, device=device)) if hold is not None else None,
                     positions=repair.positions, ridge=repair.ridge, device=device, plan=plan,
                     block=repair.target == "block")


def recalibrated_accuracy(model: nn.Module, train: ImageSet, test: ImageSet | None, schedule: Schedule,
                          device: str) -> float | None:
    """BatchNorm repair (below), then test accuracy; None when it did not run."""
    return accuracy(model, test, device) if repair_bn(model, train, schedule, device) else None


def repair_bn(model: nn.Module, train: ImageSet, schedule: Schedule, device: str) -> bool:
    """Re-estimate BatchNorm statistics after surgery, each layer scaled back to its trained pre-BN variance
    (netslim.train.bn.restore_scale). False when switched off or the model has no BatchNorm."""
    if schedule.bn_recal <= 0:
        return False
    used = restore_scale(model, lambda: batches(train, schedule.batch_size, shuffle=True, device=device, seed=7),
                         device, schedule.bn_recal)["images"]
    return bool(used)


@dataclass
class StageRecord:
    """The network after each stage and the test accuracy there (None: the stage did not run)."""

    model: nn.Module
    accuracy_after_surgery: float | None
    plan: Plan | None = None  # the Plan the cut applied (the method's, or a copy with ThiNet's channels)
    accuracy_before_finetune: float | None = None  # the method's own network (lda, lrs), before fine-tuning
    accuracy_after_refit: float | None = None
    accuracy_after_bn_recalibration: float | None = None
    accuracy: float | None = None  # what the user gets
    history: list[dict[str, Any]] = field(default_factory=list)
    finetune_seconds: float = 0.0
    repair: str = "none"  # what was done before fine-tuning: none | bn | lsq | the method's own network
    refit: RefitReport | None = None
    repair_seconds: float = 0.0
    kept: dict[str, Any] = field(default_factory=dict)  # under a time budget: fine-tuned or repaired, on validation
    bn_after_refit: dict[str, Any] = field(default_factory=dict)  # whether BN repair was kept after the refit
    selection: dict[str, Any] | None = None  # ThiNet's re-choice of the kept channels (Repair.select)

    def accuracies(self) -> dict[str, float]:
        keys = ("accuracy_after_surgery", "accuracy_before_finetune", "accuracy_after_refit",
                "accuracy_after_bn_recalibration", "accuracy")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


def run_stages(base: nn.Module, result: MethodResult, train: ImageSet, test: ImageSet | None, *,
               schedule: Schedule, device: str, init: str = "fine", checkpoint_dir: Any = None,
               teacher: nn.Module | None = None, repair: Repair | None = None) -> StageRecord:
    """Cut `base` to the result's Plan (or take the method's own network), repair, fine-tune; accuracy after each.

    The base is never modified. When `schedule.distill` > 0 the `teacher` (default: `base`; the task network
    when a class subset is kept) is distilled from.
    """
    repair = repair or Repair()
    plan, selection = result.plan, None
    thinet = repair.select == "thinet" and result.model is None and init != "scratch" and repair.mode != "none"
    images = refit_images(train, repair) if thinet or repair.mode == "lsq" else (train, None)
    if thinet:
        plan = copy.deepcopy(plan)
        selection = thinet_select(base, plan, lambda: batches(images[0], 128, device=device),
                                  positions=repair.positions, device=device)
    cut = apply_plan(clone(base), plan)
    if init == "scratch":
        reinitialise(cut)
    rec = StageRecord(cut, accuracy(cut, test, device), plan=plan, selection=selection)
    small = cut
    t0 = time.perf_counter()
    if result.model is not None and init != "scratch":  # the method fitted the weights itself
        small = result.model.to(device)
        rec.accuracy_before_finetune, rec.repair = accuracy(small, test, device), "method"
    elif init != "scratch" and repair.mode != "none":
        rec.repair = repair.mode
        if repair.mode == "lsq":
            rec.refit = refit(base, small, plan, images, repair, device)
            rec.accuracy_after_refit = accuracy(small, test, device)
            _refit_then_bn(rec, small, train, test, images[1], schedule, device)
        elif repair_bn(small, train, schedule, device):
            rec.accuracy_after_bn_recalibration = accuracy(small, test, device)
    rec.repair_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    budgeted = schedule.budget_minutes is not None and schedule.epochs > 0
    tune, val = split_holdout(train, min(0.1, VAL_IMAGES / len(train.labels)), seed=5) if budgeted else (train, None)
    before = accuracy(small, val, device) if val is not None else None
    saved = copy.deepcopy(small.state_dict()) if val is not None else None
    rec.history = finetune(small, tune, schedule, device, checkpoint_dir=checkpoint_dir,
                           teacher=base if teacher is None else teacher)
    if val is not None and saved is not None:  # keep the better network on images neither fit nor reported
        after = accuracy(small, val, device)
        kept = "fine-tuned" if after is not None and before is not None and after >= before else "repaired"
        if kept == "repaired":
            small.load_state_dict(saved)
        rec.kept = {"kept": kept, "validation_images": len(val.labels), "before": before, "after": after}
    rec.finetune_seconds = time.perf_counter() - t0
    rec.model = small
    if rec.history and rec.kept.get("kept", "fine-tuned") == "fine-tuned":
        rec.accuracy = accuracy(small, test, device)
    else:
        bn = rec.accuracy_after_bn_recalibration if rec.bn_after_refit.get("kept", True) else None
        last = [rec.accuracy_before_finetune, bn, rec.accuracy_after_refit, rec.accuracy_after_surgery]
        rec.accuracy = next((a for a in last if a is not None), None)
    return rec


def _refit_then_bn(rec: StageRecord, small: nn.Module, train: ImageSet, test: ImageSet | None,
                   hold: ImageSet | None, schedule: Schedule, device: str) -> None:
    """BN repair after the refit, kept only if it does not lower accuracy on the refit's held-out training
    images: the refit already matched each layer's pre-BN output, and re-estimated statistics can undo that."""
    before = accuracy(small, hold, device)
    saved = copy.deepcopy(small.state_dict())
    if not repair_bn(small, train, schedule, device):
        return
    rec.accuracy_after_bn_recalibration = accuracy(small, test, device)
    after = accuracy(small, hold, device)
    kept = before is None or after is None or after >= before
    if not kept:
        small.load_state_dict(saved)
    rec.bn_after_refit = {"kept": kept, "validation_images": 0 if hold is None else len(hold.labels),
                          "refit": before, "refit_bn": after}


def measure_speed(base: nn.Module, small: nn.Module, input_size: tuple[int, int, int], device: str,
                  target: Target | None = None) -> list[dict[str, Any]]:
    """Latency and throughput of the result next to the base, timed in turns: CPU fp32 at batch 1 and 64,
    and on CUDA batch 1 and 1024 in fp32 and bf16 (plus a latency target's own batch and threads); a target
    timed on onnxruntime adds rows of both networks on that runtime (`runtime` in each row)."""
    lat = target if target is not None and target.kind == "latency" else None
    on_cuda = lat is not None and str(lat.device).startswith("cuda")
    threads = lat.threads if lat is not None and not on_cuda else None
    cpu_extra = (lat.batch,) if lat is not None and not on_cuda else ()
    rows = compare_speed(base, small, input_size, "cpu", tuple(dict.fromkeys((1, 64, *cpu_extra))), threads)
    if lat is not None and lat.runtime != "torch":
        rows += compare_speed(base, small, input_size, "cpu", tuple(dict.fromkeys((1, 64, *cpu_extra))), threads,
                              runtime=lat.runtime)
    if torch.cuda.is_available() and str(device).startswith("cuda"):
        cuda_extra = (lat.batch,) if on_cuda else ()
        rows += compare_speed(base, small, input_size, device, tuple(dict.fromkeys((1, 1024, *cuda_extra))))
    return rows


def measured_pair(base: nn.Module, small: nn.Module, input_size: tuple[int, int, int], device: str, *,
                  target: Target | None = None, latency: bool = True) -> tuple[dict, dict, list[dict]]:
    """Size of base and result, and (with `latency`) their speeds timed in turns: one measurement."""
    before, after = dict(model_size(base, input_size)), dict(model_size(small, input_size))
    speed = measure_speed(base, small, input_size, device, target) if latency else []
    if speed:
        before["latency"], after["latency"] = latency_rows(speed, "base"), latency_rows(speed, "small")
    return before, after, speed


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": torch.get_num_threads(), "torch": torch.__version__, "netslim": __version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def measure_model(model: nn.Module, input_size: tuple[int, int, int], device: str,
                  latency: bool = True) -> dict[str, Any]:
    size = model_size(model, input_size)
    if latency:
        rows = time_model(model, input_size, batch_sizes=(1, 64), device="cpu", max_seconds=3.0)
        if torch.cuda.is_available() and str(device).startswith("cuda"):
            rows += time_model(model, input_size, batch_sizes=(1, 1024), device=device, max_seconds=3.0)
        size["latency"] = rows
    return size


def analyse(model: nn.Module, arch: str, train: ImageSet, method: str, target: Target | None,
            options: dict[str, Any], device: str, calib_size: int = 5000, val_fraction: float = 0.1,
            input_size: tuple[int, int, int] | None = None, cache: AnalysisCache | None = None,
            seed: int = 0, val: ImageSet | None = None) -> tuple[MethodResult, Context, float]:
    """Run a method's analysis and return its result (Plan, fitted network, report), the Context it saw, and
    the seconds it took. `cache`: analysis shared with other methods run on the same model and data (bench).

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
    ctx = Context(model=model.eval(), arch=arch, num_classes=outputs(model), input_size=shape,  # type: ignore[arg-type]
                  calib=calib, train=fit_part, val=val, target=target, options=options, device=device,
                  cache=cache if cache is not None else AnalysisCache())
    t0 = time.perf_counter()
    result = spec.fn(ctx)
    return result, ctx, time.perf_counter() - t0


def outputs(model: nn.Module) -> int:
    """How many classes the model's classifier scores."""
    return model.get_submodule(find_classifier(model)).out_features
