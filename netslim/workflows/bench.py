"""`netslim bench`: several methods and torch-pruning's criteria on one model, one budget, one schedule.

Every method sees the same calibration data and shares one statistics pass where it can (one
AnalysisCache serves them all; each method's own outputs come back in its MethodResult). Each finished
(target, method) is saved at once, so a killed bench resumes with the methods it has not finished.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from torch import nn

from netslim.cost.targets import Target
from netslim.data import ImageSet
from netslim.errors import NetslimError
from netslim.io import atomic_dir, atomic_write_text
from netslim.methods import AnalysisCache, get_method
from netslim.repair import MODES, SELECTIONS, Repair
from netslim.report.markdown import table, write_markdown
from netslim.report.plots import figure, save_figure
from netslim.train import Schedule
from netslim.workflows.bench_inputs import (
    MANIFEST,
    bench_inputs,
    check_out,
    check_resume,
    occupied,
    write_manifest,
)
from netslim.workflows.stages import (
    accuracy,
    analyse,
    machine,
    measure_model,
    measured_pair,
    resolve_init,
    run_stages,
)


def _declared(method: str) -> set[str]:
    return {f.name for f in fields(get_method(method).options)}


def method_options(options: dict[str, Any], method: str) -> dict[str, Any]:
    """The options one method sees: the unscoped ones it declares (one --opt can reach several methods),
    overridden by its `METHOD.key` ones (e.g. car.eval_size), which it must declare."""
    mine = method.replace("-", "_") + "."
    scoped = {k[len(mine):]: v for k, v in options.items() if k.replace("-", "_").startswith(mine)}
    declared = _declared(method)
    return {k: v for k, v in options.items() if "." not in k and k.replace("-", "_") in declared} | scoped


def check_options(options: dict[str, Any], methods: list[str]) -> None:
    """Refuse, before anything runs, an unscoped key no benched method declares, a scope that names no
    benched method, and any key or value a method's own declaration refuses."""
    from netslim.methods import validate_options

    scopes = {m.replace("-", "_") for m in methods}
    declared = set().union(*(_declared(m) for m in methods)) if methods else set()
    for key in options:
        scope, dot, name = key.replace("-", "_").rpartition(".")
        if dot and scope not in scopes:
            raise NetslimError(f"option {key!r} is scoped to {scope!r}, which is not a benched method "
                               f"({', '.join(methods)})")
        if not dot and name not in declared:
            raise NetslimError(f"unknown option {key!r}: no benched method declares it; valid keys: "
                               f"{', '.join(sorted(declared))}")
    for m in methods:
        validate_options(m, method_options(options, m))


def row_spec(spec: str, default: Repair) -> tuple[str, Repair]:
    """`METHOD`, `METHOD+REPAIR` (e.g. tp-l1+lsq) and/or `+thinet` (ThiNet's choice of channels at the method's
    widths, e.g. pfa-en+lsq+thinet): the method and the repair its row gets."""
    method, *extras = spec.split("+")
    get_method(method)
    fix = default
    for extra in extras:
        if extra in MODES:
            fix = replace(fix, mode=extra)
        elif extra in SELECTIONS:
            fix = replace(fix, select=extra)
        else:
            raise NetslimError(f"bench row {spec!r}: after '+' comes a repair ({', '.join(MODES)}) or a channel "
                               f"selection ({', '.join(SELECTIONS)}), not {extra!r}")
    return method, fix


def run_bench(model: nn.Module, arch: str, train: ImageSet, test: ImageSet, *, methods: list[str],
              targets: list[Target], schedule: Schedule, out: Path, device: str = "cpu", calib_size: int = 5000,
              options: dict[str, Any] | None = None, measure_latency: bool = True, resume: bool = False,
              command: str = "", log: Any = print, repair: Repair | None = None, overwrite: bool = False,
              inputs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Rows are `METHOD` (repaired as `repair` says, default lsq) or `METHOD+REPAIR`, so one table can show a
    criterion with and without the least-squares refit (tp-l1+bn next to tp-l1+lsq).

    An existing non-empty `out` is continued with `resume` only if it was benched with the same inputs (model
    weights, data, schedule, repair, calibration, options; `inputs` adds what the caller knows, e.g. the data
    spec), and replaced with `overwrite` only once the new bench is complete."""
    repair = repair or Repair()
    specs = {m: row_spec(m, repair) for m in methods}
    check_options(options or {}, list(dict.fromkeys(method for method, _ in specs.values())))
    out = Path(out)
    check_out(out, resume, overwrite)
    record = bench_inputs(model, arch, train, test, schedule, repair, calib_size, options or {}, measure_latency,
                          inputs or {})
    if occupied(out) and resume:
        check_resume(out, record)
    args = (model, arch, train, test, methods, targets, schedule, device, calib_size, options or {},
            measure_latency, command, log, repair, specs, record)
    if occupied(out) and overwrite:
        with atomic_dir(out, overwrite=True) as work:  # the old bench stays whole until this one is complete
            return _bench(work, *args)
    return _bench(out, *args)


def _bench(out: Path, model: nn.Module, arch: str, train: ImageSet, test: ImageSet, methods: list[str],
           targets: list[Target], schedule: Schedule, device: str, calib_size: int, options: dict[str, Any],
           measure_latency: bool, command: str, log: Any, repair: Repair, specs: dict[str, tuple[str, Repair]],
           record: dict[str, Any]) -> dict[str, Any]:
    done_dir = out / "runs"
    done_dir.mkdir(parents=True, exist_ok=True)
    if not (out / MANIFEST).is_file():  # first, so that a killed bench can be verified when resumed
        write_manifest(out, record)
    model = model.to(device).eval()
    size = tuple(train.images.shape[1:])
    base_file = out / "base.json"
    if base_file.exists():
        base = json.loads(base_file.read_text())
    else:
        base = measure_model(model, size, device, measure_latency)  # type: ignore[arg-type]
        base["accuracy"] = accuracy(model, test, device)
        atomic_write_text(base_file, json.dumps(base, indent=1))
    cache = AnalysisCache()
    rows = []
    for target in targets:
        for method in methods:
            path = done_dir / f"{str(target).replace('=', '-')}__{method}.json"
            if path.exists():
                rows.append(json.loads(path.read_text()))
                log(f"{target} {method}: done earlier, kept")
                continue
            log(f"{target} {method}: analysing…")
            row = _one(model, arch, train, test, method, target, schedule, device, calib_size, options,
                       cache, measure_latency, specs[method])
            atomic_write_text(path, json.dumps(row, indent=1, default=str))
            rows.append(row)
            log(f"{target} {method}: acc {row['accuracy_after_surgery']:.4f} → {row['accuracy']:.4f}, "
                f"params {row['params_kept']:.3f}")
    result = {"arch": arch, "base": base, "rows": rows, "schedule": asdict(schedule), "repair": asdict(repair),
              "calibration_images": calib_size, "train_images": len(train.labels), "test_images": len(test.labels),
              "machine": machine(), "command": command,
              "statistics_passes": list(cache.passes), "date": _now()}
    write_results(out, result)
    return result


def _one(model: nn.Module, arch: str, train: ImageSet, test: ImageSet, method: str, target: Target,
         schedule: Schedule, device: str, calib_size: int, options: dict[str, Any], cache: AnalysisCache,
         measure_latency: bool, spec: tuple[str, Repair]) -> dict[str, Any]:
    """One (target, method) row: the same stages as `compress` (netslim.workflows.stages), so every accuracy
    column means what it means in a compress report."""
    label, (method, repair) = method, spec
    options = method_options(options, method)
    knob_target: Target | None = target if method != "pfa-kl" else None  # pfa-kl has no knob to bisect
    passes_before = len(cache.passes)
    found, _, seconds = analyse(model, arch, train, method, knob_target, options, device, calib_size=calib_size,
                                cache=cache)
    init = resolve_init(options.get("init"), method)
    rec = run_stages(model, found, train, test, schedule=schedule, device=device, init=init, repair=repair)
    before, size, _ = measured_pair(model, rec.model, tuple(train.images.shape[1:]), device,  # type: ignore[arg-type]
                                    latency=measure_latency)
    plan = rec.plan or found.plan
    return {"method": label, "target": str(target), "met_target": knob_target is not None, "init": init,
            "repair": rec.repair,
            "repair_seconds": round(rec.repair_seconds, 1),
            **{k: getattr(rec, k) for k in ("accuracy_after_surgery", "accuracy_before_finetune",
                                            "accuracy_after_refit", "accuracy_after_bn_recalibration",
                                            "accuracy")},
            "bn_after_refit": rec.bn_after_refit, "selection": rec.selection,
            "params": size["params"], "macs": size["macs"], "flops": size["flops"], "bytes": size["bytes"],
            "params_kept": size["params"] / before["params"], "latency": size.get("latency", []),
            "analysis_seconds": round(seconds, 3), "finetune_seconds": round(rec.finetune_seconds, 1),
            "new_statistics_passes": len(cache.passes) - passes_before,
            "widths": plan.widths(), "heads": {k: len(v) for k, v in plan.heads.items()}, "drop": plan.drop,
            "factorized": sorted(plan.factorize),
            "plan_meta": plan.meta, "history": rec.history}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _latency(row: dict[str, Any], batch: int) -> float | None:
    from netslim.report.markdown import latency_of

    return latency_of(row, batch)


def _ms(value: float | None) -> str | None:
    return None if value is None else f"{value:.1f}"


def write_results(out: Path, result: dict[str, Any]) -> None:
    """results.json, report.md (the comparison table) and accuracy_vs_macs.png."""
    atomic_write_text(out / "results.json", json.dumps(result, indent=1, default=str))
    base = result["base"]
    header = ["target", "method", "acc after surgery", "after LSQ refit", "after BN recal.", "method's network",
              "acc after fine-tune", "params", "kept", "MACs", "CPU ms (b=1)", "CPU ms (b=64)", "bytes", "analysis s"]
    rows = [["base", "–", base["accuracy"], None, None, None, base["accuracy"], base["params"], "1.000", base["macs"],
             _ms(_latency(base, 1)), _ms(_latency(base, 64)), base["bytes"], None]]
    for r in result["rows"]:
        rows.append([r["target"] + ("" if r["met_target"] else " (own size)"), r["method"],
                     r["accuracy_after_surgery"], r.get("accuracy_after_refit"),
                     r.get("accuracy_after_bn_recalibration"),
                     r.get("accuracy_before_finetune"), r["accuracy"],
                     r["params"], f"{r['params_kept']:.3f}", r["macs"],
                     _ms(_latency(r, 1)), _ms(_latency(r, 64)), r["bytes"], f"{r['analysis_seconds']:.1f}"])
    s = result["schedule"]
    write_markdown(out / "report.md", [
        f"# netslim bench: {result['arch']}",
        f"Fine-tuning for every method: {s['epochs']} epoch{'s' if s['epochs'] != 1 else ''}, lr {s['lr']}, "
        f"batch {s['batch_size']}, "
        f"{s['schedule']} schedule, label smoothing {s['label_smoothing']}. Calibration: "
        f"{result['calibration_images']} training images. Statistics passes run: "
        f"{', '.join(result['statistics_passes']) or 'none'}. {result['date']} · torch {result['machine']['torch']}",
        table(header, rows),
        "![accuracy vs MACs](accuracy_vs_macs.png)",
        f"Command: `{result['command']}`" if result["command"] else "",
    ])
    _plot(out / "accuracy_vs_macs.png", result)


def _plot(path: Path, result: dict[str, Any]) -> None:
    fig, ax = figure(figsize=(6.5, 4.5))
    by_method: dict[str, list[dict]] = {}
    for r in result["rows"]:
        by_method.setdefault(r["method"], []).append(r)
    for method, rs in sorted(by_method.items()):
        rs = sorted(rs, key=lambda r: r["macs"])
        ax.plot([r["macs"] / 1e6 for r in rs], [r["accuracy"] for r in rs], "o-", label=method)
    base = result["base"]
    ax.plot([base["macs"] / 1e6], [base["accuracy"]], "k*", ms=12, label="base")
    ax.set_xscale("log")
    ax.set_xlabel("MACs per image (millions)")
    ax.set_ylabel("test accuracy after fine-tuning")
    ax.set_title(f"{result['arch']}: accuracy vs MACs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
