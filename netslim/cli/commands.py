"""`netslim` command line: train, analyze, compress, evaluate, demo (and more as methods arrive).

Human-readable output goes to stderr; `--json` prints one JSON document on stdout for scripts.
Every bad input ends with one line `error: ...` and exit code 2.
"""

from __future__ import annotations

import functools
import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from netslim.errors import NetslimError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Turn a trained PyTorch network into a physically smaller one that keeps its accuracy.")
console = Console(stderr=True)

ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="architecture: vgg16_bn, resnet56, tv:resnet18, "
                                                                    "pkg.module:function (read from netslim files)")]
WeightsOpt = Annotated[Path | None, typer.Option("--weights", "-w", help="trained weights (.safetensors)")]
DataOpt = Annotated[str, typer.Option("--data", "-d", help="digits | cifar10:ROOT | archive.tar.gz | ImageFolder dir")]
ClassesOpt = Annotated[str | None, typer.Option("--classes", help="comma-separated subset of classes (task)")]
OutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="run directory to write")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print a JSON document on stdout")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda[:N]")]
CacheOpt = Annotated[Path | None, typer.Option("--cache-dir", help="where decoded datasets are cached")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="replace an existing run directory")]


def guarded(fn: Any) -> Any:
    """Turn NetslimError (and a Ctrl-C) into one clear line and exit code 2."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except NetslimError as e:
            sys.stderr.write(f"error: {e}\n")
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("[red]interrupted[/red]; nothing half-written was left in place")
            raise typer.Exit(130) from None

    return run


def _emit(payload: dict[str, Any], as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(payload, indent=1, default=str) + "\n")


def _classes(text: str | None) -> list[str] | None:
    return [c.strip() for c in text.split(",") if c.strip()] if text else None


def _options(pairs: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise NetslimError(f"option {pair!r} must look like key=value")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = value
    return out


def _setup(data: str, classes: str | None, cache_dir: Path | None, weights: Path | None, model: str | None,
           device: str) -> tuple[Any, ...]:
    from netslim.workflows.api import load_data, load_trained, resolve_device

    train, test, idx, n = load_data(data, _classes(classes), cache_dir)
    net, arch, plan = load_trained(weights, model, n, int(train.images.shape[1]))
    return train, test, idx, net, arch, plan, resolve_device(device)


def _validation(val_from: str, test: Any) -> tuple[Any, Any]:
    """(val, test): None and the test split, or two disjoint stratified halves of the test split."""
    if val_from == "train":
        return None, test
    if val_from != "test":
        raise NetslimError(f"--val-from must be train or test, not {val_from!r}")
    if test is None or len(test) < 2:
        raise NetslimError("--val-from test needs a test split of at least two images")
    from netslim.data import split_holdout

    return split_holdout(test, 0.5, seed=0)


def before_after_table(metrics: dict[str, Any]) -> Table:
    from netslim.report.markdown import comparison_rows

    b, a = metrics["before"], metrics["after"]
    t = Table(title=f"{metrics['method']} · {metrics['target'] or 'method default'}")
    for col in ("", "before", "after", "after/before"):
        t.add_column(col, justify="right" if col else "left")
    for r in comparison_rows(b, a):
        t.add_row(*[_cell(v) for v in r])
    return t


def _cell(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4f}" if v < 10 else f"{v:,.2f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


@app.command()
@guarded
def evaluate(weights: WeightsOpt = None, model: ModelOpt = None, data: DataOpt = "digits",
             classes: ClassesOpt = None, split: Annotated[str, typer.Option(help="train | test")] = "test",
             batch_size: int = 256, device: DeviceOpt = "auto", cache_dir: CacheOpt = None,
             as_json: JsonOpt = False) -> None:
    """Accuracy, parameters, MACs and latency of a trained (or compressed) network on a dataset."""
    from netslim.plan import Plan
    from netslim.surgery.apply import apply_plan
    from netslim.workflows.compress import accuracy, measure_model

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
    from netslim.workflows.compress import Schedule, accuracy, finetune, measure_model

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


TargetOpt = Annotated[str | None, typer.Option("--target", "-t", help="params=F | flops=F | latency=F (kept)")]
MethodOpt = Annotated[str, typer.Option("--method", help="compression method (netslim methods list)")]
OptOpt = Annotated[list[str] | None, typer.Option("--opt", help="method option key=value (repeatable; in bench, "
                                                                 "METHOD.key=value applies to one method)")]
MinAccOpt = Annotated[float | None, typer.Option(help="lda: keep pruning while validation accuracy stays >= this")]
DistillOpt = Annotated[float, typer.Option("--distill", help="weight of the unpruned network's softened outputs in "
                                           "the fine-tuning loss, 0..1 (knowledge distillation; 0: labels only)")]
ValFromOpt = Annotated[str, typer.Option("--val-from", help="validation images for accuracy decisions (lda): "
                                         "train (10% held out of it) | test (half of the test split, stratified; "
                                         "the other half is reported). Use test when the model was trained on the "
                                         "whole training split, whose held-out part it has memorised")]
VarianceOpt = Annotated[float | None, typer.Option(help="pca: fraction of each layer's response variance kept "
                                                        "(significant dimensions; default 0.999)")]
RoundOpt = Annotated[int | None, typer.Option("--round-to", help="round kept widths to a multiple of this "
                                                                  "(up; to the nearest under --target); default 8 on "
                                                                  "CUDA, 1 on CPU")]
BatchOpt = Annotated[int, typer.Option("--batch", help="batch size a latency target is timed at")]
LayersOpt = Annotated[str | None, typer.Option("--layers", help="car: comma-separated layers to prune (default all)")]
EvalSizeOpt = Annotated[int | None, typer.Option("--eval-size", help="car: training images accuracy is measured on "
                                                                      "(default 2000)")]
PerStepOpt = Annotated[int | None, typer.Option("--per-step", help="car: re-rank every K removals (default 1: "
                                                                    "recompute CAR after every removal)")]


def _car_options(layers: str | None, eval_size: int | None, per_step: int | None) -> dict[str, Any]:
    return {k: v for k, v in (("layers", layers), ("eval_size", eval_size), ("per_step", per_step)) if v is not None}


RankOpt = Annotated[int | None, typer.Option("--rank", help="lrs: rank of each factorized layer's low-rank part")]
RankRatioOpt = Annotated[float | None, typer.Option("--rank-ratio", help="lrs: rank as a fraction of each layer's "
                                                                         "min(outputs, inputs·k·k)")]
SparsityOpt = Annotated[float | None, typer.Option("--sparsity", help="lrs: fraction of each layer's weights the "
                                                                      "sparse part leaves at zero (0.95 keeps 5%)")]


def _lrs_options(rank: int | None, rank_ratio: float | None, sparsity: float | None) -> dict[str, Any]:
    return {k: v for k, v in (("rank", rank), ("rank_ratio", rank_ratio), ("sparsity", sparsity)) if v is not None}


def _for_device(tgt: Any, options: dict[str, Any], device: str, batch: int) -> tuple[Any, dict[str, Any]]:
    """Width rounding by default for the device (unless given), and a latency target timed on it at `batch`."""
    from dataclasses import replace

    from netslim.cost.latency_table import round_to_default

    if options.get("round_to") is None:
        options = options | {"round_to": round_to_default(device)}
    if int(options["round_to"]) < 1:
        raise NetslimError(f"--round-to must be at least 1, not {options['round_to']}")
    if tgt is not None and tgt.kind == "latency":
        if batch < 1:
            raise NetslimError(f"--batch must be at least 1, not {batch}")
        tgt = replace(tgt, batch=batch, device=device)
    return tgt, options


@app.command()
@guarded
def compress(weights: WeightsOpt = None, model: ModelOpt = None, data: DataOpt = "digits",
             method: MethodOpt = "pfa-kl", target: TargetOpt = None, out: OutOpt = Path("runs/compress"),
             energy: Annotated[float | None, typer.Option(help="PFA-En / PCA energy (variance) kept")] = None,
             min_accuracy: MinAccOpt = None, variance: VarianceOpt = None, round_to: RoundOpt = None,
             batch: BatchOpt = 1, layers: LayersOpt = None, eval_size: EvalSizeOpt = None,
             per_step: PerStepOpt = None, rank: RankOpt = None, rank_ratio: RankRatioOpt = None,
             sparsity: SparsityOpt = None,
             finetune_epochs: Annotated[int, typer.Option("--finetune-epochs", "--epochs",
                                                          help="epochs of training after surgery")] = 0,
             lr: float = 0.01, batch_size: int = 128, label_smoothing: float = 0.0,
             init: Annotated[str | None, typer.Option(help="fine|inherit (keep surviving weights) | scratch (random "
                                                           "init); default: the method's (`netslim methods`)")] = None,
             calib_size: Annotated[int, typer.Option(help="calibration images from the training split")] = 5000,
             train_subset: Annotated[int | None, typer.Option(help="fine-tune on this many training images")] = None,
             classes: ClassesOpt = None, opt: OptOpt = None, device: DeviceOpt = "auto",
             cache_dir: CacheOpt = None, no_latency: bool = False, overwrite: OverwriteOpt = False,
             val_from: ValFromOpt = "train", distill: DistillOpt = 0.0, as_json: JsonOpt = False) -> None:
    """Analyse, cut, fine-tune, measure: writes plan.json, model.safetensors, metrics.json, report.md."""
    from netslim.cost.budget import parse_target
    from netslim.methods import get_method
    from netslim.workflows.compress import Schedule
    from netslim.workflows.compress import compress as run

    get_method(method)
    tgt = parse_target(target) if target else None
    if out is not None and out.exists() and not overwrite:
        raise NetslimError(f"output directory {out} already exists; pass --overwrite to replace it")
    train_set, test, idx, net, arch, plan, dev = _setup(data, classes, cache_dir, weights, model, device)
    val, test = _validation(val_from, test)
    if plan is not None and (plan.keep or plan.drop or plan.factorize):
        raise NetslimError(f"{weights} is already compressed; compress its base network instead")
    options = _options(opt) | ({"energy": energy} if energy is not None else {})
    options |= {"min_accuracy": min_accuracy} if min_accuracy is not None else {}
    options |= {k: v for k, v in (("variance", variance), ("round_to", round_to)) if v is not None}
    options |= _car_options(layers, eval_size, per_step) | _lrs_options(rank, rank_ratio, sparsity)
    tgt, options = _for_device(tgt, options, dev, batch)
    from netslim.workflows.compress import resolve_init

    init = resolve_init(init, method)
    if init == "scratch" and finetune_epochs <= 0:
        console.print("[yellow]warning:[/yellow] the network is re-initialised (init scratch) and not trained; "
                      "give --epochs N to train it")
    if train_subset:
        from netslim.data import calibration_subset

        train_set = calibration_subset(train_set, train_subset, seed=1)
    res = run(net, arch, train_set, test, method=method, target=tgt, options=options,
              schedule=Schedule(epochs=finetune_epochs, lr=lr, batch_size=batch_size,
                                label_smoothing=label_smoothing, distill=distill),
              device=dev, calib_size=calib_size, init=init, classes=idx, out=out, overwrite=overwrite,
              command=shlex.join(["netslim", *sys.argv[1:]]), measure_latency=not no_latency, val=val)
    console.print(before_after_table(res.metrics))
    console.print(f"run directory: {out}")
    _emit(res.metrics, as_json)


@app.command()
@guarded
def analyze(weights: WeightsOpt = None, model: ModelOpt = None, data: DataOpt = "digits",
            method: MethodOpt = "pfa-kl", target: TargetOpt = None, out: OutOpt = Path("runs/analyze"),
            energy: Annotated[float | None, typer.Option(help="PFA-En / PCA energy (variance) kept")] = None,
            min_accuracy: MinAccOpt = None, variance: VarianceOpt = None, round_to: RoundOpt = None,
            batch: BatchOpt = 1, layers: LayersOpt = None, eval_size: EvalSizeOpt = None,
            per_step: PerStepOpt = None, rank: RankOpt = None, rank_ratio: RankRatioOpt = None,
            sparsity: SparsityOpt = None,
            classwise: Annotated[bool, typer.Option("--classwise", help="car: per-class accuracy change per "
                                                                        "filter (heat map)")] = False,
            calib_size: int = 5000, classes: ClassesOpt = None, opt: OptOpt = None,
            device: DeviceOpt = "auto", cache_dir: CacheOpt = None, overwrite: OverwriteOpt = False,
            val_from: ValFromOpt = "train", as_json: JsonOpt = False) -> None:
    """Statistics + Plan only (no surgery): writes plan.json, report.md and the method's plots."""
    from netslim.cost.budget import parse_target
    from netslim.workflows.analyse import analyse_to_dir

    tgt = parse_target(target) if target else None
    train_set, test, idx, net, arch, _, dev = _setup(data, classes, cache_dir, weights, model, device)
    val, _ = _validation(val_from, test)
    options = _options(opt) | ({"energy": energy} if energy is not None else {})
    options |= {"min_accuracy": min_accuracy} if min_accuracy is not None else {}
    options |= {k: v for k, v in (("variance", variance), ("round_to", round_to)) if v is not None}
    options |= _car_options(layers, eval_size, per_step) | ({"classwise": True} if classwise else {})
    options |= _lrs_options(rank, rank_ratio, sparsity)
    tgt, options = _for_device(tgt, options, dev, batch)
    metrics = analyse_to_dir(net, arch, train_set, method=method, target=tgt, options=options, device=dev,
                             calib_size=calib_size, classes=idx, out=out, overwrite=overwrite, command=shlex.join(["netslim", *sys.argv[1:]]), val=val)
    console.print(f"{method}: planned {metrics['planned']['params']:,} params "
                  f"({metrics['planned']['params'] / metrics['base']['params']:.3f} of the base), "
                  f"{metrics['planned']['macs']:,} MACs "
                  f"({metrics['planned']['macs'] / metrics['base']['macs']:.3f}), "
                  f"in {metrics['analysis_seconds']:.1f} s → {out}"
                  + (f"; drops {', '.join(metrics['drop'])}" if metrics["drop"] else ""))
    _emit(metrics, as_json)


@app.command()
@guarded
def methods(as_json: JsonOpt = False) -> None:
    """List the compression methods."""
    from netslim.methods import REGISTRY, get_method

    get_method("l1")
    t = Table("method", "labels", "after surgery", "what it does")
    for spec in sorted(REGISTRY.values(), key=lambda s: s.name):
        t.add_row(spec.name, "yes" if spec.needs_labels else "no", spec.retrain, spec.summary)
    console.print(t)
    _emit({s.name: s.summary for s in REGISTRY.values()}, as_json)


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
          distill: DistillOpt = 0.0, as_json: JsonOpt = False) -> None:
    """Every method and torch-pruning's criteria at the same budget and fine-tuning schedule, one table."""
    from netslim.cost.budget import parse_target
    from netslim.data import calibration_subset
    from netslim.workflows.bench import run_bench
    from netslim.workflows.compress import Schedule

    tgts = [parse_target(t.strip()) for t in targets.split(",") if t.strip()]
    names = [m.strip() for m in methods.split(",") if m.strip()]
    train_set, test, idx, net, arch, plan, dev = _setup(data, classes, cache_dir, weights, model, device)
    if idx is not None:
        raise NetslimError("bench compares methods on all classes of the data; drop --classes")
    tune = calibration_subset(train_set, train_subset, seed=1) if train_subset else train_set
    test = calibration_subset(test, test_subset, seed=2) if test_subset else test
    assert out is not None
    res = run_bench(net, arch, train_set if not train_subset else tune, test, methods=names, targets=tgts,
                    schedule=Schedule(epochs=finetune_epochs, lr=lr, batch_size=batch_size,
                                      label_smoothing=label_smoothing, schedule=schedule, distill=distill),
                    out=out, device=dev, calib_size=calib_size, options=_options(opt),
                    measure_latency=not no_latency, resume=resume, command=shlex.join(["netslim", *sys.argv[1:]]),
                    log=console.print)
    console.print((out / "report.md").read_text())
    _emit(res, as_json)


@app.command()
@guarded
def export(run: Annotated[Path, typer.Argument(help="run directory (or model.safetensors) written by compress")],
           fmt: Annotated[str, typer.Option("--format", "-f", help="onnx | torch-export")] = "onnx",
           out: Annotated[Path | None, typer.Option("--out", "-o", help="file to write (default: in the run)")] = None,
           data: Annotated[str | None, typer.Option("--data", "-d", help="images to check predictions on "
                                                                         "(default: the run's --data)")] = None,
           images: Annotated[int, typer.Option(help="test images to compare predictions on")] = 1000,
           threads: Annotated[int | None, typer.Option(help="CPU threads for the timings")] = None,
           cache_dir: CacheOpt = None, as_json: JsonOpt = False) -> None:
    """Fold BatchNorm, export (ONNX or torch.export), check predictions against PyTorch, time both."""
    from netslim.workflows.export import export_run

    rep = export_run(run, fmt, out, data, images, threads=threads, cache_dir=cache_dir)
    c = rep["check"]
    console.print(f"{rep['format']} ({rep['exporter']}) → {rep['file']} · {rep['batchnorms_folded']}/"
                  f"{rep['batchnorms']} BatchNorms folded · {c['inputs']}: top-1 agreement "
                  f"{c['top1_agreement']:.4f}, max relative logit difference {c['max_rel_logit_diff']:.1e} "
                  f"(tolerance {c['rtol']:g})")
    t = Table("runtime", "batch", "threads", "median ms", "img/s", "speedup vs PyTorch")
    for r in rep["latency"]:
        t.add_row(r["runtime"], str(r["batch"]), str(r["threads"]), f"{r['median_ms']:.3f}",
                  f"{r['throughput']:,.1f}", f"{r['speedup_vs_pytorch']:.2f}×")
    console.print(t)
    _emit(rep, as_json)


def _per_layer(pairs: list[str] | None, kind: type) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        try:
            out[name.strip()] = kind(value)
        except ValueError:
            sep = ""
        if not sep:
            raise NetslimError(f"{pair!r} must look like LAYER={kind.__name__}")
    return out


@app.command()
@guarded
def pack(run: Annotated[Path, typer.Argument(help="run directory (or model.safetensors) written by compress")],
         data: DataOpt = "digits", out: OutOpt = None,
         layers: Annotated[str | None, typer.Option(help="comma-separated Conv2d/Linear layers (default all)")] = None,
         sparsity: Annotated[float, typer.Option(help="fraction of conv weights pruned by magnitude")] = 0.5,
         fc_sparsity: Annotated[float, typer.Option(help="fraction of Linear weights pruned")] = 0.5,
         layer_sparsity: Annotated[list[str] | None, typer.Option(help="LAYER=F override (repeatable)")] = None,
         conv_bits: Annotated[int, typer.Option(help="k-means shared values per conv layer: 2^bits")] = 8,
         fc_bits: Annotated[int, typer.Option(help="shared values per Linear layer: 2^bits")] = 5,
         layer_bits: Annotated[list[str] | None, typer.Option(help="LAYER=BITS override (repeatable)")] = None,
         finetune_epochs: Annotated[int, typer.Option(help="fine-tuning epochs with the pruning mask fixed")] = 1,
         lr: float = 0.005, batch_size: int = 128,
         train_subset: Annotated[int | None, typer.Option(help="fine-tune on this many training images")] = None,
         device: DeviceOpt = "auto", cache_dir: CacheOpt = None, overwrite: OverwriteOpt = False,
         distill: Annotated[float, typer.Option("--distill", help="weight of the unpacked network's softened "
                                                "outputs in the fine-tuning loss, 0..1 (0: labels only)")] = 0.0,
         as_json: JsonOpt = False) -> None:
    """Storage compression: weight pruning + fine-tuning, k-means sharing, Huffman coding -> packed file."""
    from netslim.surgery.checkpoint import plan_of, read_tensors
    from netslim.workflows.api import resolve_device
    from netslim.workflows.pack import PackConfig, load_run_data, pack_run_dir

    if not run.exists():
        raise NetslimError(f"{run} does not exist: give a run directory written by compress (or its model file)")
    out = out or (run / "packed" if run.is_dir() else run.with_name(run.stem + "-packed"))
    if out.exists() and not overwrite:
        raise NetslimError(f"output directory {out} already exists; pass --overwrite to replace it")
    _, meta = read_tensors(run / "model.safetensors" if run.is_dir() else run)
    train_set, test = load_run_data(data, plan_of(meta), cache_dir)
    cfg = PackConfig([n.strip() for n in layers.split(",") if n.strip()] if layers else None, sparsity, fc_sparsity,
                     _per_layer(layer_sparsity, float), conv_bits, fc_bits, _per_layer(layer_bits, int),
                     finetune_epochs, lr, batch_size, train_subset, distill)
    m = pack_run_dir(run, train_set, test, cfg, out, resolve_device(device), overwrite,
                     command=shlex.join(["netslim", *sys.argv[1:]]))
    b, acc = m["bytes"], m["accuracy"]
    console.print(f"packed {b['dense_fp32_model']:,} B (dense fp32) into {b['packed_file']:,} B "
                  f"({b['ratio_file']}×; packed layers {b['ratio_layers']}×); test accuracy "
                  f"{acc['before']:.4f} → {acc['unpacked']:.4f}; decoded predictions identical → {out}"
                  if acc.get("before") is not None else f"packed into {b['packed_file']:,} B → {out}")
    _emit(m, as_json)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
