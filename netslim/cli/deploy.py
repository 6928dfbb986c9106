"""Deployment commands: `export` (fold BatchNorm, ONNX / int8 ONNX / torch.export, checked and timed) and `pack`
(weight pruning, k-means sharing, Huffman coding). They read a run directory written by `compress`."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from netslim.cli.commands import app
from netslim.cli.options import CacheOpt, DeviceOpt, JsonOpt, OutOpt, OverwriteOpt
from netslim.cli.output import console, guarded
from netslim.cli.output import emit as _emit
from netslim.errors import NetslimError


@app.command()
@guarded
def export(run: Annotated[Path, typer.Argument(help="run directory (or model.safetensors) written by compress")],
           fmt: Annotated[str, typer.Option("--format", "-f", help="onnx | onnx-int8 | torch-export")] = "onnx",
           out: Annotated[Path | None, typer.Option("--out", "-o", help="file to write (default: in the run)")] = None,
           data: Annotated[str | None, typer.Option("--data", "-d", help="images to check predictions on "
                                                                         "(default: the run's --data)")] = None,
           images: Annotated[int, typer.Option(help="test images to compare predictions on")] = 1000,
           threads: Annotated[int | None, typer.Option(help="CPU threads for the timings")] = None,
           seconds: Annotated[float, typer.Option("--seconds", help="timing budget per batch size (rounds go on "
                                                  "until it is spent)")] = 10.0,
           calib_method: Annotated[str, typer.Option(help="onnx-int8: how activation ranges are calibrated: "
                                                     "minmax | entropy | percentile")] = "minmax",
           calib_images: Annotated[int, typer.Option(help="onnx-int8: training images to calibrate on")] = 100,
           max_int8_drop: Annotated[float | None, typer.Option(
               "--max-int8-drop", help="onnx-int8: keep in fp32 every conv/linear whose int8 form alone loses more "
                                       "than this many accuracy points on held-out training images")] = None,
           sensitivity_images: Annotated[int, typer.Option(help="onnx-int8: held-out training images of the "
                                                           "--max-int8-drop pass")] = 500,
           base: Annotated[Path | None, typer.Option(help="onnx-int8: weights of the network the run was cut from "
                                                     "(default: the run's --weights)")] = None,
           cache_dir: CacheOpt = None, overwrite: Annotated[bool, typer.Option(
               "--overwrite", help="replace an existing output file")] = False, as_json: JsonOpt = False) -> None:
    """Fold BatchNorm, export (ONNX, int8 ONNX or torch.export), check predictions against PyTorch, time both."""
    if fmt == "onnx-int8":
        from netslim.workflows.export_int8 import export_int8_run

        rep = export_int8_run(run, out, data, images, threads=threads, cache_dir=cache_dir, overwrite=overwrite,
                              max_seconds=seconds, calib_method=calib_method, calib_images=calib_images,
                              max_drop=max_int8_drop, sensitivity_images=sensitivity_images, base=base)
        _print_int8(rep)
        _emit(rep, as_json)
        return
    if max_int8_drop is not None or base is not None:
        raise NetslimError("--max-int8-drop and --base go with --format onnx-int8")
    from netslim.workflows.export import export_run

    rep = export_run(run, fmt, out, data, images, threads=threads, cache_dir=cache_dir, overwrite=overwrite,
                     max_seconds=seconds)
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


def _print_int8(rep: dict[str, Any]) -> None:
    """The int8 report as tables: accuracy and bytes per form, latency per batch, the factors, fp32 layers."""
    cal, nets = rep["quantization"]["calibration"], rep["networks"]
    console.print(f"onnx-int8 → {rep['file']} ({rep['bytes']:,} B) · calibrated ({cal['method']}) on "
                  f"{cal['images']} {cal['from']} · accuracy on {rep['test']['images']} {rep['test']['from']}")
    t = Table("network", "runtime", "accuracy", "bytes")
    for net, sc in nets.items():
        for rt, acc in sc["accuracy"].items():
            size = sc["bytes"][rt]
            t.add_row(net, rt, f"{acc:.4f}", f"{size:,}" if size is not None else "")
    console.print(t)
    for net, sc in nets.items():
        console.print(f"{net}: int8 agrees with fp32 ONNX on top-1 for {sc['top1_agreement_int8_vs_fp32']:.2%}; "
                      f"int8 file {sc['int8_bytes_over_fp32']:.2f}× the fp32 one")
    if not rep["base"]["available"]:
        console.print(f"no base network: {rep['base']['reason']}")
    t = Table("network", "runtime", "batch", "median ms", "img/s", "speedup", title=f"latency on {rep['threads']} "
              f"CPU threads, all timed in turns (speedup: against the first row)")
    for r in rep["latency"]:
        t.add_row(r["network"], r["runtime"], str(r["batch"]), f"{r['median_ms']:.3f}", f"{r['throughput']:,.1f}",
                  f"{r['speedup_vs_first']:.2f}×")
    console.print(t)
    for b, f in rep["factors"].items():
        console.print(f"batch {b}: " + " · ".join(f"{k} {v:.2f}×" for k, v in f.items()))
    sens = rep["sensitivity"]
    if sens is not None:
        kept = ", ".join(sens["kept_fp32"]) or "none"
        console.print(f"kept in fp32 (int8 alone loses > {sens['max_drop']:g} points on {sens['images']} held-out "
                      f"training images): {kept}")
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
         data: Annotated[str | None, typer.Option("--data", "-d", help="training and test images (default: the "
                                                  "run's own --data, recorded in its metrics.json)")] = None,
         out: OutOpt = None,
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
    from netslim.cli.prepare import pack_data, refuse_output
    from netslim.surgery.checkpoint import classes_of, plan_of, read_metadata
    from netslim.train import Schedule
    from netslim.workflows.api import pick_device
    from netslim.workflows.pack import PackConfig, load_run_data, pack_run_dir

    if not run.exists():
        raise NetslimError(f"{run} does not exist: give a run directory written by compress (or its model file)")
    sched = Schedule(epochs=finetune_epochs, lr=lr, batch_size=batch_size, distill=distill)  # before any data
    out = out or (run / "packed" if run.is_dir() else run.with_name(run.stem + "-packed"))
    refuse_output(out, overwrite)
    source = run / "model.safetensors" if run.is_dir() else run
    meta = read_metadata(source)
    cfg = PackConfig([n.strip() for n in layers.split(",") if n.strip()] if layers else None, sparsity, fc_sparsity,
                     _per_layer(layer_sparsity, float), conv_bits, fc_bits, _per_layer(layer_bits, int),
                     finetune=sched, train_subset=train_subset)
    train_set, test = load_run_data(pack_data(run, data), plan_of(meta, str(source)), cache_dir,
                                    classes_of(meta, str(source)), str(source))
    m = pack_run_dir(run, train_set, test, cfg, out, pick_device(device), overwrite,
                     command=shlex.join(["netslim", *sys.argv[1:]]))
    b, acc = m["bytes"], m["accuracy"]
    console.print(f"packed {b['dense_fp32_model']:,} B (dense fp32) into {b['packed_file']:,} B "
                  f"({b['ratio_file']}×; packed layers {b['ratio_layers']}×); test accuracy "
                  f"{acc['before']:.4f} → {acc['unpacked']:.4f}; decoded predictions identical → {out}"
                  if acc.get("before") is not None else f"packed into {b['packed_file']:,} B → {out}")
    _emit(m, as_json)
