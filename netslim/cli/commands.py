"""`netslim` command line: train, analyze, compress, evaluate, demo (and more as methods arrive).

Human-readable output goes to stderr; `--json` prints one JSON document on stdout for scripts.
Every bad input ends with one line `error: ...` and exit code 2.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from netslim.cli.options import (
    BUDGET_EPOCHS,
    BatchOpt,
    BudgetOpt,
    CacheOpt,
    ClassesOpt,
    DataOpt,
    DeviceOpt,
    DistillOpt,
    JsonOpt,
    MethodOpt,
    ModelOpt,
    OptimizerOpt,
    OptOpt,
    OutOpt,
    OverwriteOpt,
    RepairImagesOpt,
    RepairOpt,
    RepairTargetOpt,
    RoundOpt,
    RuntimeOpt,
    SelectOpt,
    TargetOpt,
    ValFromOpt,
    WarmupOpt,
    WeightsOpt,
    checked_bench_options,
    checked_options,
    checked_runtime,
)
from netslim.cli.options import for_device as _for_device
from netslim.cli.options import validation_split as _validation
from netslim.cli.output import before_after_table, console, guarded, option_rows, options_table
from netslim.cli.output import emit as _emit
from netslim.cli.prepare import checked_split, refuse_output, setup, train_outputs
from netslim.errors import NetslimError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Turn a trained PyTorch network into a physically smaller one and measure what it costs.")


@app.command()
@guarded
def evaluate(weights: WeightsOpt = None, model: ModelOpt = None, data: DataOpt = "digits",
             classes: ClassesOpt = None, split: Annotated[str, typer.Option(help="train | test")] = "test",
             batch_size: int = 256, device: DeviceOpt = "auto", cache_dir: CacheOpt = None,
             as_json: JsonOpt = False) -> None:
    """Accuracy, parameters, MACs and latency of a trained (or compressed) network on a dataset."""
    from netslim.workflows.stages import accuracy, measure_model
    from netslim.workflows.task import task_network

    split = checked_split(split)
    task, dev = setup(data, classes, cache_dir, weights, model, device)
    net, arch, scored = task_network(task)[0].to(dev), task.arch, task.train if split == "train" else task.test
    acc = accuracy(net, scored, dev, batch_size)
    m = measure_model(net, task.train.input_size, dev)
    payload = {"arch": arch, "weights": str(weights) if weights else None, "split": split, "accuracy": acc,
               "images": len(scored.labels), **m}
    console.print(f"{arch}: {split} accuracy [bold]{acc:.4f}[/bold] on {payload['images']} images · "
                  f"{m['params']:,} params · {m['macs']:,} MACs")
    _emit(payload, as_json)


@app.command()
@guarded
def train(model: ModelOpt = "small_cnn", data: DataOpt = "digits", out: OutOpt = Path("runs/train"),
          weights: WeightsOpt = None, epochs: int = 20, lr: float = 0.05, batch_size: int = 128,
          weight_decay: float = 5e-4, label_smoothing: float = 0.0,
          schedule: Annotated[str, typer.Option(help="onecycle | cosine | constant")] = "onecycle",
          optimizer: OptimizerOpt = "sgd", warmup_epochs: WarmupOpt = 0,
          resume: Annotated[bool, typer.Option(help="continue an interrupted run into --out")] = False,
          classes: ClassesOpt = None, device: DeviceOpt = "auto", cache_dir: CacheOpt = None,
          overwrite: OverwriteOpt = False, as_json: JsonOpt = False) -> None:
    """Train a network (from scratch, or continue from --weights); checkpoints every epoch, --resume."""
    from netslim.io import atomic_dir, atomic_write_text
    from netslim.surgery.checkpoint import save_model
    from netslim.train import Schedule, finetune
    from netslim.workflows.stages import accuracy, measure_model
    from netslim.workflows.task import task_network

    sched = Schedule(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay, optimizer=optimizer,
                     label_smoothing=label_smoothing, schedule=schedule,
                     warmup_epochs=warmup_epochs)  # checked before any data is decoded
    assert out is not None
    state = train_outputs(out, overwrite, resume)
    task, dev = setup(data, classes, cache_dir, weights, model, device)
    (net, plan), arch, train_set, names = task_network(task), task.arch, task.train, task.train.classes
    history = finetune(net.to(dev), train_set, sched, dev, checkpoint_dir=state, resume=resume)
    acc = accuracy(net, task.test, dev)
    metrics = {"arch": arch, "data": data, "class_names": names, "accuracy": acc, "history": history,
               **measure_model(net, plan.input_size, dev, False)}
    with atomic_dir(out, overwrite) as tmp:  # the model and its Plan agree: both score the task's classes
        save_model(tmp / "model.safetensors", net, plan, {"test_accuracy": f"{acc:.4f}"}, classes=names)
        atomic_write_text(tmp / "metrics.json", json.dumps(metrics, indent=1, default=str))
    import shutil

    shutil.rmtree(state, ignore_errors=True)
    console.print(f"trained {arch} for {epochs} epochs: test accuracy [bold]{acc:.4f}[/bold] → {out}")
    _emit(metrics, as_json)


@app.command()
@guarded
def compress(weights: WeightsOpt = None, model: ModelOpt = None, data: DataOpt = "digits",
             method: MethodOpt = "pfa-kl", target: TargetOpt = None, out: OutOpt = Path("runs/compress"),
             opt: OptOpt = None, round_to: RoundOpt = None, batch: BatchOpt = 1, runtime: RuntimeOpt = "torch",
             finetune_epochs: Annotated[int, typer.Option("--finetune-epochs", "--epochs",
                                                          help="epochs of training after surgery")] = 0,
             lr: float = 0.01, batch_size: int = 128, label_smoothing: float = 0.0,
             init: Annotated[str | None, typer.Option(help="fine|inherit (keep surviving weights) | scratch (random "
                                                           "init); default: the method's (`netslim methods`)")] = None,
             calib_size: Annotated[int, typer.Option(help="calibration images from the training split")] = 5000,
             train_subset: Annotated[int | None, typer.Option(help="fine-tune on this many training images")] = None,
             classes: ClassesOpt = None, device: DeviceOpt = "auto",
             cache_dir: CacheOpt = None, no_latency: bool = False, overwrite: OverwriteOpt = False,
             val_from: ValFromOpt = "train", distill: DistillOpt = 0.5, repair: RepairOpt = "lsq",
             repair_images: RepairImagesOpt = 2000, repair_target: RepairTargetOpt = "block",
             select: SelectOpt = "method",
             unused: Annotated[str, typer.Option(help="modules inference never uses (auxiliary heads): keep | remove "
                                                      "(dropped with the cut)")] = "keep",
             budget_minutes: BudgetOpt = None,
             as_json: JsonOpt = False) -> None:
    """Analyse, cut, repair, fine-tune, measure: writes plan.json, model.safetensors, metrics.json, report.md."""
    from netslim.cost.targets import parse_target
    from netslim.repair import Repair
    from netslim.train import Schedule
    from netslim.workflows.compress import compress as run
    from netslim.workflows.stages import resolve_init

    options = checked_options(method, opt, round_to=round_to)  # before any data is decoded
    sched = Schedule(epochs=finetune_epochs or (BUDGET_EPOCHS if budget_minutes else 0), lr=lr,
                     batch_size=batch_size, label_smoothing=label_smoothing, distill=distill,
                     budget_minutes=budget_minutes)
    fix = Repair(mode=repair, images=repair_images, target=repair_target, select=select)
    if unused not in ("keep", "remove"):
        raise NetslimError(f"--unused must be keep or remove, not {unused!r}")
    init = resolve_init(init if init is not None else options.get("init"), method)
    tgt = parse_target(target) if target else None
    checked_runtime(tgt, runtime, device)
    refuse_output(out, overwrite)
    task, dev = setup(data, classes, cache_dir, weights, model, device)
    train_set, net, arch, plan, idx = task.train, task.model, task.arch, task.plan, task.outputs
    val, test = _validation(val_from, task.test)
    if plan is not None and (plan.keep or plan.drop or plan.factorize):
        raise NetslimError(f"{weights} is already compressed; compress its base network instead")
    tgt, options = _for_device(tgt, options, dev, batch, runtime)
    if init == "scratch" and finetune_epochs <= 0:
        console.print("[yellow]warning:[/yellow] the network is re-initialised (init scratch) and not trained; "
                      "give --epochs N to train it")
    if train_subset:
        from netslim.data import calibration_subset

        train_set = calibration_subset(train_set, train_subset, seed=1)
    res = run(net, arch, train_set, test, method=method, target=tgt, options=options, schedule=sched,
              device=dev, calib_size=calib_size, init=init, classes=idx, out=out, overwrite=overwrite,
              command=shlex.join(["netslim", *sys.argv[1:]]), measure_latency=not no_latency, val=val, repair=fix,
              data=data, unused=unused)
    console.print(before_after_table(res.metrics))
    console.print(f"run directory: {out}")
    _emit(res.metrics, as_json)


@app.command()
@guarded
def analyze(weights: WeightsOpt = None, model: ModelOpt = None, data: DataOpt = "digits",
            method: MethodOpt = "pfa-kl", target: TargetOpt = None, out: OutOpt = Path("runs/analyze"),
            opt: OptOpt = None, round_to: RoundOpt = None, batch: BatchOpt = 1, runtime: RuntimeOpt = "torch",
            calib_size: int = 5000,
            classes: ClassesOpt = None, device: DeviceOpt = "auto", cache_dir: CacheOpt = None,
            overwrite: OverwriteOpt = False, val_from: ValFromOpt = "train", as_json: JsonOpt = False) -> None:
    """Statistics + Plan only (no surgery): writes plan.json, report.md and the method's plots."""
    from netslim.cost.targets import parse_target
    from netslim.workflows.analyse import analyse_to_dir

    options = checked_options(method, opt, round_to=round_to)  # before any data is decoded
    tgt = parse_target(target) if target else None
    checked_runtime(tgt, runtime, device)
    refuse_output(out, overwrite)
    task, dev = setup(data, classes, cache_dir, weights, model, device)
    train_set, net, arch, idx = task.train, task.model, task.arch, task.outputs
    val, _ = _validation(val_from, task.test)
    tgt, options = _for_device(tgt, options, dev, batch, runtime)
    metrics = analyse_to_dir(net, arch, train_set, method=method, target=tgt, options=options, device=dev,
                             calib_size=calib_size, classes=idx, out=out, overwrite=overwrite,
                             command=shlex.join(["netslim", *sys.argv[1:]]), val=val)
    console.print(f"{method}: planned {metrics['planned']['params']:,} params "
                  f"({metrics['planned']['params'] / metrics['base']['params']:.3f} of the base), "
                  f"{metrics['planned']['macs']:,} MACs "
                  f"({metrics['planned']['macs'] / metrics['base']['macs']:.3f}), "
                  f"in {metrics['analysis_seconds']:.1f} s → {out}"
                  + (f"; drops {', '.join(metrics['drop'])}" if metrics["drop"] else ""))
    _emit(metrics, as_json)


@app.command()
@guarded
def methods(name: Annotated[str | None, typer.Argument(help="a method: list its options (--opt key=value)")]
            = None, as_json: JsonOpt = False) -> None:
    """List the compression methods, or one method's options (name, type, default, help)."""
    from netslim.methods import get_method, list_methods

    if name is not None:
        spec = get_method(name)
        rows = option_rows(spec.options)
        console.print(options_table(spec.name, spec.summary, rows))
        _emit({"method": spec.name, "summary": spec.summary, "needs_labels": spec.needs_labels,
               "retrain": spec.retrain, "options": rows}, as_json)
        return
    t = Table("method", "labels", "after surgery", "what it does")
    for spec in list_methods():
        t.add_row(spec.name, "yes" if spec.needs_labels else "no", spec.retrain, spec.summary)
    console.print(t)
    console.print("`netslim methods NAME` lists a method's options.")
    _emit({s.name: s.summary for s in list_methods()}, as_json)


@app.command()
@guarded
def demo(out: OutOpt = Path("runs/demo"), method: MethodOpt = "pfa-kl", epochs: int = 15,
         finetune_epochs: int = 8, overwrite: OverwriteOpt = False, as_json: JsonOpt = False) -> None:
    """The whole job offline on the embedded digits data: train a small CNN, compress, fine-tune, compare."""
    from netslim.workflows.demo import run_demo

    metrics = run_demo(out, method, epochs, finetune_epochs, console, overwrite)
    console.print(before_after_table(metrics))
    console.print(f"report: {out / 'report.md' if out else '-'}")
    _emit(metrics, as_json)


@app.command()
@guarded
def bench(weights: WeightsOpt = None, model: ModelOpt = None, data: DataOpt = "digits",
          methods: Annotated[str, typer.Option(help="comma-separated methods")] = "pfa-kl,pfa-en,tp-l1,tp-random",
          targets: Annotated[str, typer.Option("--targets", "--target", help="e.g. params=0.5,params=0.125")]
          = "params=0.125",
          finetune_epochs: int = 1, lr: float = 0.01, batch_size: int = 128, label_smoothing: float = 0.0,
          schedule: str = "onecycle", calib_size: int = 5000,
          train_subset: Annotated[int | None, typer.Option(help="fine-tune on this many training images")] = None,
          test_subset: Annotated[int | None, typer.Option(help="evaluate on this many test images")] = None,
          classes: ClassesOpt = None, opt: OptOpt = None, out: OutOpt = Path("runs/bench"),
          resume: Annotated[bool, typer.Option(help="continue a killed bench in --out (same inputs only)")] = False,
          overwrite: OverwriteOpt = False,
          no_latency: bool = False, device: DeviceOpt = "auto", cache_dir: CacheOpt = None,
          distill: DistillOpt = 0.5, repair: RepairOpt = "lsq", repair_images: RepairImagesOpt = 2000,
          repair_target: RepairTargetOpt = "block", select: SelectOpt = "method", as_json: JsonOpt = False) -> None:
    """Every method and torch-pruning's criteria at the same budget, repair and fine-tuning schedule, one table.

    A method named METHOD+REPAIR (e.g. tp-l1+bn) gets that repair instead of --repair's."""
    from netslim.cost.targets import parse_target
    from netslim.data import calibration_subset
    from netslim.repair import Repair
    from netslim.train import Schedule
    from netslim.workflows.bench import run_bench
    from netslim.workflows.bench_inputs import check_out

    tgts = [parse_target(t.strip()) for t in targets.split(",") if t.strip()]
    names = [m.strip() for m in methods.split(",") if m.strip()]
    options = checked_bench_options(names, opt)  # before any data is decoded
    sched = Schedule(epochs=finetune_epochs, lr=lr, batch_size=batch_size, label_smoothing=label_smoothing,
                     schedule=schedule, distill=distill)
    fix = Repair(mode=repair, images=repair_images, target=repair_target, select=select)
    if classes:
        raise NetslimError("bench compares methods on all classes of the data; drop --classes")
    assert out is not None
    check_out(out, resume, overwrite)  # before any data is decoded
    task, dev = setup(data, None, cache_dir, weights, model, device)
    tune = calibration_subset(task.train, train_subset, seed=1) if train_subset else task.train
    test = calibration_subset(task.test, test_subset, seed=2) if test_subset else task.test
    res = run_bench(task.model, task.arch, tune, test, methods=names, targets=tgts, schedule=sched, repair=fix,
                    out=out, device=dev, calib_size=calib_size, options=options, measure_latency=not no_latency,
                    resume=resume, overwrite=overwrite, command=shlex.join(["netslim", *sys.argv[1:]]),
                    log=console.print, inputs={"data": data, "train_subset": train_subset, "test_subset": test_subset})
    console.print((out / "report.md").read_text())
    _emit(res, as_json)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
