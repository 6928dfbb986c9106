"""The command line's shared option types and the parsing that turns them into checked values.

Method options are not flags: each method declares them (netslim.methods.<name>.options) and the user
passes `--opt key=value`; they are checked against the declaration here, before any data is decoded, so
a typo costs an instant error instead of a run with the default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from netslim.errors import NetslimError

ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="architecture: vgg16_bn, resnet56, vit_tiny, "
                                                                    "tv:resnet18, timm:resnet18, pkg.module:function "
                                                                    "(read from netslim files)")]
WeightsOpt = Annotated[Path | None, typer.Option("--weights", "-w", help="trained weights (.safetensors)")]
DataOpt = Annotated[str, typer.Option("--data", "-d", help="digits | cifar10:ROOT | archive.tar.gz | ImageFolder dir")]
ClassesOpt = Annotated[str | None, typer.Option("--classes", help="comma-separated subset of classes (task)")]
OutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="run directory to write")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print a JSON document on stdout")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda[:N]")]
CacheOpt = Annotated[Path | None, typer.Option("--cache-dir", help="where decoded datasets are cached")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="replace an existing run directory")]
TargetOpt = Annotated[str | None, typer.Option("--target", "-t", help="params=F | flops=F | latency=F (kept)")]
MethodOpt = Annotated[str, typer.Option("--method", help="compression method (netslim methods list)")]
OptOpt = Annotated[list[str] | None, typer.Option("--opt", help="method option key=value, repeatable (`netslim "
                                                                 "methods NAME` lists a method's; in bench, "
                                                                 "METHOD.key=value applies to one method)")]
BUDGET_EPOCHS = 30  # what --budget-minutes shortens when no --epochs is given (the papers' fine-tune)
BudgetOpt = Annotated[float | None, typer.Option("--budget-minutes", help="fine-tune for at most this many minutes: "
                                                 "the onecycle schedule (--epochs, default 30) is shortened to fit, "
                                                 "and the better of the repaired and the fine-tuned network on "
                                                 "1,000 held-out training images is kept")]
RepairOpt = Annotated[str, typer.Option("--repair", help="between the cut and fine-tuning: none | bn (BatchNorm "
                                        "re-estimation) | lsq (least-squares refit of every layer whose inputs were "
                                        "cut, then bn)")]
RepairImagesOpt = Annotated[int, typer.Option("--repair-images", help="training images the least-squares refit fits "
                                              "on (256 others check it)")]
RepairTargetOpt = Annotated[str, typer.Option("--repair-target", help="what the refit matches for a layer that feeds "
                                              "a residual sum: block (the sum) | layer (its own output)")]
SelectOpt = Annotated[str, typer.Option("--select", help="which channels a cut keeps: method (the method's own "
                                        "choice) | thinet (ThiNet's greedy on the consumers' error, at the method's "
                                        "widths; with --repair bn or lsq)")]
DistillOpt = Annotated[float, typer.Option("--distill", help="weight of the unpruned network's softened outputs in "
                                           "the fine-tuning loss, 0..1 (knowledge distillation; 0: labels only; "
                                           "default 0.5 for compress and bench, measured better than 0 at the same "
                                           "schedule in benchmarks/results/repair_resnet56_block_thinet_cpu.json)")]
ValFromOpt = Annotated[str, typer.Option("--val-from", help="validation images for accuracy decisions (lda): "
                                         "train (10% held out of it) | test (half of the test split, stratified; "
                                         "the other half is reported). Use test when the model was trained on the "
                                         "whole training split, whose held-out part it has memorised")]
RoundOpt = Annotated[int | None, typer.Option("--round-to", help="round kept widths to a multiple of this "
                                                                  "(up; to the nearest under --target); default 8 on "
                                                                  "CUDA, 1 on CPU")]
OptimizerOpt = Annotated[str, typer.Option("--optimizer", help="sgd (momentum, nesterov; decays every parameter) | "
                                           "adamw (as transformers are trained: no decay on biases, norms, position "
                                           "embedding and class token; e.g. --lr 1e-3 --weight-decay 0.05)")]
WarmupOpt = Annotated[int, typer.Option("--warmup-epochs", help="epochs of linear learning-rate warm-up before the "
                                        "cosine or constant schedule (onecycle warms up on its own)")]
BatchOpt = Annotated[int, typer.Option("--batch", help="batch size a latency target is timed at")]
RuntimeOpt = Annotated[str, typer.Option("--runtime", help="what a latency target is timed on: torch (eager "
                                         "PyTorch) | onnx (onnxruntime fp32) | onnx-int8 (onnxruntime int8, "
                                         "quantized as `export --format onnx-int8` does); onnx runtimes on the CPU")]


def classes_of(text: str | None) -> list[str] | None:
    return [c.strip() for c in text.split(",") if c.strip()] if text else None


def parse_pairs(pairs: list[str] | None) -> dict[str, str]:
    """`--opt key=value` pairs as {key: value}; values stay text until the method's declaration types them."""
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise NetslimError(f"option {pair!r} must look like key=value")
        out[key.strip().replace("-", "_")] = value
    return out


def checked_options(method: str, pairs: list[str] | None, **generic: Any) -> dict[str, Any]:
    """The options the user gave `method` (`--opt` pairs, then generic flags that are set), checked against
    its declaration and typed ("0.5" -> 0.5), so that metrics.json records what the method used."""
    from netslim.methods import validate_options

    given: dict[str, Any] = parse_pairs(pairs) | {k: v for k, v in generic.items() if v is not None}
    opts = validate_options(method, given)
    return {k: getattr(opts, k) for k in given}


def checked_bench_options(methods: list[str], pairs: list[str] | None) -> dict[str, Any]:
    """`--opt` pairs for a bench, each method's share checked (METHOD.key scopes a key to one method)."""
    from netslim.repair import Repair
    from netslim.workflows.bench import check_options, row_spec

    options = parse_pairs(pairs)
    check_options(options, list(dict.fromkeys(row_spec(m, Repair())[0] for m in methods)))
    return options


def validation_split(val_from: str, test: Any) -> tuple[Any, Any]:
    """(val, test): None and the test split, or two disjoint stratified halves of the test split."""
    if val_from == "train":
        return None, test
    if val_from != "test":
        raise NetslimError(f"--val-from must be train or test, not {val_from!r}")
    if test is None or len(test) < 2:
        raise NetslimError("--val-from test needs a test split of at least two images")
    from netslim.data import split_holdout

    return split_holdout(test, 0.5, seed=0)


def checked_runtime(tgt: Any, runtime: str, device: str) -> str:
    """`--runtime`, checked before any data is decoded: a known runtime, given only with a latency target, and
    an onnxruntime one neither on an explicit `--device cuda` nor without onnxruntime installed."""
    from netslim.runtime.forms import check_runtime

    check_runtime(runtime, device)
    if runtime != "torch" and (tgt is None or tgt.kind != "latency"):
        raise NetslimError(f"--runtime {runtime} says what a latency target is timed on: give --target latency=F")
    return runtime


def for_device(tgt: Any, options: dict[str, Any], device: str, batch: int,
               runtime: str = "torch") -> tuple[Any, dict[str, Any]]:
    """Width rounding by default for the device the target is timed on (unless given), and a latency target
    timed at `batch` on `runtime`: on `device` for torch, on the CPU for onnxruntime."""
    from dataclasses import replace

    from netslim.cost.latency_table import round_to_default

    timed_on = device if runtime == "torch" else "cpu"
    if options.get("round_to") is None:
        options = options | {"round_to": round_to_default(timed_on)}
    if int(options["round_to"]) < 1:
        raise NetslimError(f"--round-to must be at least 1, not {options['round_to']}")
    if tgt is not None and tgt.kind == "latency":
        if batch < 1:
            raise NetslimError(f"--batch must be at least 1, not {batch}")
        tgt = replace(tgt, batch=batch, device=timed_on, runtime=runtime)
    return tgt, options
