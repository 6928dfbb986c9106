"""`netslim` command line: train, analyze, compress, evaluate, demo (and more as methods arrive).

Human-readable output goes to stderr; `--json` prints one JSON document on stdout for scripts.
Every bad input ends with one line `error: ...` and exit code 2.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

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
    OptOpt,
    OutOpt,
    OverwriteOpt,
    RepairImagesOpt,
    RepairOpt,
    RoundOpt,
    TargetOpt,
    ValFromOpt,
    WeightsOpt,
    checked_bench_options,
    checked_options,
    classes_of,
)
from netslim.cli.options import for_device as _for_device
from netslim.cli.options import validation_split as _validation
from netslim.cli.output import before_after_table, console, guarded, option_rows, options_table
from netslim.cli.output import emit as _emit
from netslim.errors import NetslimError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Turn a trained PyTorch network into a physically smaller one that keeps its accuracy.")


def _setup(data: str, classes: str | None, cache_dir: Path | None, weights: Path | None, model: str | None,
           device: str) -> tuple[Any, ...]:
    from netslim.workflows.api import load_data, load_trained, pick_device

    train, test, idx, n = load_data(data, classes_of(classes), cache_dir)
    net, arch, plan = load_trained(weights, model, n, int(train.images.shape[1]))
    return train, test, idx, net, arch, plan, pick_device(device)


@app.command()
@guarded
def evaluate(weights: WeightsOpt = None, model: ModelOpt = None, data: DataOpt = "digits",
             classes: ClassesOpt = None, split: Annotated[str, typer.Option(help="train | test")] = "test",
             batch_size: int = 256, device: DeviceOpt = "auto", cache_dir: CacheOpt = None,
             as_json: JsonOpt = False) -> None:
    """Accuracy, parameters, MACs and latency of a trained (or compressed) network on a dataset."""
    from netslim.plan import Plan
    from netslim.surgery.apply import apply_plan
    from netslim.workflows.stages import accuracy, measure_model

    train, test, idx, net, arch, plan, dev = _setup(data, classes, cache_dir, weights, model, device)
    if idx is not None and (plan is None or plan.classes is None):
        from netslim.surgery.apply import find_classifier

        outputs = net.get_submodule(find_classifier(net)).out_features
        net = apply_plan(net, Plan(arch=arch, num_classes=outputs, input_size=tuple(train.images.shape[1:]),
                                   classes=idx))
    net = net.to(dev)
    acc = accuracy(net, train if split == "train" else test, dev, batch_size)
    m = measure_model(net, tuple(train.images.shape[1:]), dev)
    payload = {"arch": arch, "weights": str(weights) if weights else None, "split": split, "accuracy": acc,
               "images": len((train if split == "train" else test).labels), **m}
    console.print(f"{arch}: {split} accuracy [bold]{acc:.4f}[/bold] on {payload['images']} images · "
                  f"{m['params']:,} params · {m['macs']:,} MACs")
    _emit(payload, as_json)


@app.command()
@guarded
def train(model: ModelOpt = "small_cnn", data: DataOpt = "digits", out: OutOpt = Path("runs/train"),
          weights: WeightsOpt = None, epochs: int = 20, lr: float = 0.05, batch_size: int = 128,
          weight_decay: float = 5e-4, label_smoothing: float = 0.0,
          schedule: Annotated[str, typer.Option(help="onecycle | cosine | constant")] = "onecycle",
          resume: Annotated[bool, typer.Option(help="continue an interrupted run into --out")] = False,
          classes: ClassesOpt = None, device: DeviceOpt = "auto", cache_dir: CacheOpt = None,
          overwrite: OverwriteOpt = False, as_json: JsonOpt = False) -> None:
    """Train a network (from scratch, or continue from --weights); checkpoints every epoch, --resume."""
    from netslim.io import atomic_dir, atomic_write_text
    from netslim.plan import Plan
    from netslim.surgery.checkpoint import save_model
    from netslim.train import Schedule, finetune
    from netslim.workflows.stages import accuracy, measure_model

    train_set, test, _, net, arch, plan, dev = _setup(data, classes, cache_dir, weights, model, device)
    assert out is not None
    state = out.with_name(out.name + ".train-state")
    if out.exists() and not overwrite:
        raise NetslimError(f"output directory {out} already exists; pass --overwrite to replace it")
    if state.exists() and not resume:
        raise NetslimError(f"{state} holds an interrupted run; pass --resume to continue it or delete it")
    sched = Schedule(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                     label_smoothing=label_smoothing, schedule=schedule)
    history = finetune(net.to(dev), train_set, sched, dev, checkpoint_dir=state, resume=resume)
    acc = accuracy(net, test, dev)
    plan = plan or Plan(arch=arch, num_classes=len(train_set.classes), input_size=tuple(train_set.images.shape[1:]))
    metrics = {"arch": arch, "accuracy": acc, "history": history, **measure_model(net, plan.input_size, dev, False)}
    with atomic_dir(out, overwrite) as tmp:
        save_model(tmp / "model.safetensors", net, plan, {"test_accuracy": f"{acc:.4f}"})
        atomic_write_text(tmp / "metrics.json", json.dumps(metrics, indent=1, default=str))
    import shutil

    shutil.rmtree(state, ignore_errors=True)
    console.print(f"trained {arch} for {epochs} epochs: test accuracy [bold]{acc:.4f}[/bold] → {out}")
    _emit(metrics, as_json)


@app.command()
@guarded
def compress(weights: WeightsOpt = None, model: ModelOpt = None, data: DataOpt = "digits",
             method: MethodOpt = "pfa-kl", target: TargetOpt = None, out: OutOpt = Path("runs/compress"),
             opt: OptOpt = None, round_to: RoundOpt = None, batch: BatchOpt = 1,
             finetune_epochs: Annotated[int, typer.Option("--finetune-epochs", "--epochs",
                                                          help="epochs of training after surgery")] = 0,
             lr: float = 0.01, batch_size: int = 128, label_smoothing: float = 0.0,
             init: Annotated[str | None, typer.Option(help="fine|inherit (keep surviving weights) | scratch (random "
                                                           "init); default: the method's (`netslim methods`)")] = None,
             calib_size: Annotated[int, typer.Option(help="calibration images from the training split")] = 5000,
             train_subset: Annotated[int | None, typer.Option(help="fine-tune on this many training images")] = None,
             classes: ClassesOpt = None, device: DeviceOpt = "auto",
             cache_dir: CacheOpt = None, no_latency: bool = False, overwrite: OverwriteOpt = False,
             val_from: ValFromOpt = "train", distill: DistillOpt = 0.0, repair: RepairOpt = "lsq",
             repair_images: RepairImagesOpt = 2000, budget_minutes: BudgetOpt = None,
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
    fix = Repair(mode=repair, images=repair_images)
    init = resolve_init(init if init is not None else options.get("init"), method)
    tgt = parse_target(target) if target else None
    if out is not None and out.exists() and not overwrite:
        raise NetslimError(f"output directory {out} already exists; pass --overwrite to replace it")
    train_set, test, idx, net, arch, plan, dev = _setup(data, classes, cache_dir, weights, model, device)
    val, test = _validation(val_from, test)
    if plan is not None and (plan.keep or plan.drop or plan.factorize):
        raise NetslimError(f"{weights} is already compressed; compress its base network instead")
    tgt, options = _for_device(tgt, options, dev, batch)
    if init == "scratch" and finetune_epochs <= 0:
        console.print("[yellow]warning:[/yellow] the network is re-initialised (init scratch) and not trained; "
                      "give --epochs N to train it")
    if train_subset:
        from netslim.data import calibration_subset

        train_set = calibration_subset(train_set, train_subset, seed=1)
    res = run(net, arch, train_set, test, method=method, target=tgt, options=options, schedule=sched,
              device=dev, calib_size=calib_size, init=init, classes=idx, out=out, overwrite=overwrite,
              command=shlex.join(["netslim", *sys.argv[1:]]), measure_latency=not no_latency, val=val, repair=fix)
    console.print(before_after_table(res.metrics))
    console.print(f"run directory: {out}")
    _emit(res.metrics, as_json)


@app.command()
@guarded
def analyze(weights: WeightsOpt = None, model: ModelOpt = None, data: DataOpt = "digits",
            method: MethodOpt = "pfa-kl", target: TargetOpt = None, out: OutOpt = Path("runs/analyze"),
            opt: OptOpt = None, round_to: RoundOpt = None, batch: BatchOpt = 1, calib_size: int = 5000,
            classes: ClassesOpt = None, device: DeviceOpt = "auto", cache_dir: CacheOpt = None,
            overwrite: OverwriteOpt = False, val_from: ValFromOpt = "train", as_json: JsonOpt = False) -> None:
    """Statistics + Plan only (no surgery): writes plan.json, report.md and the method's plots."""
    from netslim.cost.targets import parse_target
    from netslim.workflows.analyse import analyse_to_dir

    options = checked_options(method, opt, round_to=round_to)  # before any data is decoded
    tgt = parse_target(target) if target else None
    train_set, test, idx, net, arch, _, dev = _setup(data, classes, cache_dir, weights, model, device)
    val, _ = _validation(val_from, test)
    tgt, options = _for_device(tgt, options, dev, batch)
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
         finetune_epochs: int = 8, as_json: JsonOpt = False) -> None:
    """The whole job offline on the embedded digits data: train a small CNN, compress, fine-tune, compare."""
    from netslim.workflows.demo import run_demo

    metrics = run_demo(out, method, epochs, finetune_epochs, console)
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
          resume: Annotated[bool, typer.Option(help="continue a killed bench in --out")] = False,
          no_latency: bool = False, device: DeviceOpt = "auto", cache_dir: CacheOpt = None,
          distill: DistillOpt = 0.0, repair: RepairOpt = "lsq", repair_images: RepairImagesOpt = 2000,
          as_json: JsonOpt = False) -> None:
    """Every method and torch-pruning's criteria at the same budget, repair and fine-tuning schedule, one table.

    A method named METHOD+REPAIR (e.g. tp-l1+bn) gets that repair instead of --repair's."""
    from netslim.cost.targets import parse_target
    from netslim.data import calibration_subset
    from netslim.repair import Repair
    from netslim.train import Schedule
    from netslim.workflows.bench import run_bench

    tgts = [parse_target(t.strip()) for t in targets.split(",") if t.strip()]
    names = [m.strip() for m in methods.split(",") if m.strip()]
    options = checked_bench_options(names, opt)  # before any data is decoded
    sched = Schedule(epochs=finetune_epochs, lr=lr, batch_size=batch_size, label_smoothing=label_smoothing,
                     schedule=schedule, distill=distill)
    fix = Repair(mode=repair, images=repair_images)
    train_set, test, idx, net, arch, plan, dev = _setup(data, classes, cache_dir, weights, model, device)
    if idx is not None:
        raise NetslimError("bench compares methods on all classes of the data; drop --classes")
    tune = calibration_subset(train_set, train_subset, seed=1) if train_subset else train_set
    test = calibration_subset(test, test_subset, seed=2) if test_subset else test
    assert out is not None
    res = run_bench(net, arch, train_set if not train_subset else tune, test, methods=names, targets=tgts,
                    schedule=sched, repair=fix, out=out, device=dev, calib_size=calib_size, options=options,
                    measure_latency=not no_latency, resume=resume, command=shlex.join(["netslim", *sys.argv[1:]]),
                    log=console.print)
    console.print((out / "report.md").read_text())
    _emit(res, as_json)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
