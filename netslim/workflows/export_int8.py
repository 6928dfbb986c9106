"""`netslim export RUN --format onnx-int8`: the compressed network as a static int8 ONNX model, measured end to
end against its fp32 forms and against the base network it was cut from.

Each network (the run's, and the base when it is known) is exported three ways — eager PyTorch as loaded,
fp32 ONNX with BatchNorm folded (`--format onnx`'s file, checked against PyTorch the same way), and int8
ONNX quantized by onnxruntime from that file on training images (runtime/quantize.py), with the layers that
quantize badly kept in fp32 when `max_drop` is set (workflows/sensitivity.py). The report gives test
accuracy and file bytes of each, top-1 agreement of int8 with fp32, and the latency of all six at each batch
size, timed in turns in this process, with the factors from pruning and from quantization apart.
Everything is built in a temporary directory beside the output; the int8 file is moved into place and the
report written only once every check and timing has run, so a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netslim.errors import NetslimError
from netslim.runtime.anatomy import compact, onnx_bytes
from netslim.runtime.forms import write_onnx
from netslim.runtime.ort import OnnxRunner
from netslim.runtime.quantize import (
    calibration_arrays,
    check_method,
    fp32_neighbourhood,
    layer_nodes,
    quantize,
    settings,
)
from netslim.workflows.export import RTOL, check_predictions, data_spec_of, predict, run_split
from netslim.workflows.sensitivity import check_max_drop, kept_in_fp32, layer_sensitivity

RUNTIMES = ("pytorch fp32", "onnxruntime fp32", "onnxruntime int8")


@dataclass
class Forms:
    """One network's three deployable forms, and how its int8 file was made."""

    model: nn.Module
    fp32: Path
    int8: Path
    exporter: str
    preprocess: str
    source_bytes: int | None = None  # the PyTorch weights file
    source_dtypes: list[str] | None = None  # what that file stores its tensors as (float16 halves its bytes)


def _forms(model: nn.Module, name: str, size: tuple[int, ...], work: Path, arrays: list, method: str,
           sens: tuple[list[torch.Tensor], torch.Tensor, float, int] | None = None) -> tuple[Forms, dict | None]:
    """Fold, export, pre-process and quantize `model` in `work`; with `sens` (held-out inputs, labels, max
    drop, threads) the layers that lose more than the max drop alone are kept fp32."""
    cache = work / f"{name}-ranges.json"
    files = write_onnx(model, size, work, name, arrays, method, cache=cache)
    ready, int8 = files.ready, files.int8
    assert ready is not None and int8 is not None  # quantized: calibration arrays were given
    report = None
    if sens is not None:
        inputs, labels, max_drop, threads = sens
        report = layer_sensitivity(ready, arrays, inputs, labels, work, method=method, threads=threads, cache=cache)
        nodes = kept_in_fp32(report["layers"], max_drop)
        names, excluded = layer_nodes(ready), fp32_neighbourhood(ready, nodes)
        report |= {"max_drop": max_drop, "kept_fp32": [names[n] for n in nodes], "kept_fp32_nodes": excluded}
        if nodes:
            quantize(ready, int8, arrays, method, exclude=excluded, cache=cache)
    compact(int8)  # the file a user ships: short names (node names in reports are the fp32 file's)
    return Forms(model, files.fp32, int8, files.exporter, str(files.preprocess)), report


def _scores(forms: Forms, inputs: list[torch.Tensor], labels: torch.Tensor, threads: int) -> dict[str, Any]:
    """Test accuracy and bytes of each form, and how often int8 picks the class fp32 ONNX picks."""
    preds = {rt: predict(m, inputs) for rt, m in zip(RUNTIMES, _runners(forms, threads), strict=True)}
    bytes_ = {"pytorch fp32": forms.source_bytes, "onnxruntime fp32": forms.fp32.stat().st_size,
              "onnxruntime int8": forms.int8.stat().st_size}
    return {"accuracy": {rt: float((p == labels).float().mean()) for rt, p in preds.items()}, "bytes": bytes_,
            "int8_bytes_over_fp32": bytes_["onnxruntime int8"] / bytes_["onnxruntime fp32"],
            "parts": (parts := {rt: onnx_bytes(f) for rt, f in (("onnxruntime fp32", forms.fp32),
                                                                ("onnxruntime int8", forms.int8))}),
            "int8_weight_bytes_over_fp32": parts["onnxruntime int8"]["weights"] / parts["onnxruntime fp32"]["weights"],
            "top1_agreement_int8_vs_fp32": float((preds["onnxruntime int8"] == preds["onnxruntime fp32"]).float()
                                                 .mean()),
            "top1_agreement_int8_vs_pytorch": float((preds["onnxruntime int8"] == preds["pytorch fp32"]).float()
                                                    .mean()),
            "pytorch_file_dtypes": forms.source_dtypes, "exporter": forms.exporter, "preprocess": forms.preprocess}


def stored_dtypes(path: Path) -> list[str]:
    """The dtypes a safetensors file stores its tensors in ("pytorch fp32" bytes are the file as it is)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return sorted({str(f.get_slice(k).get_dtype()) for k in f.keys()})


def _runners(forms: Forms, threads: int) -> list[Any]:
    return [forms.model, OnnxRunner(forms.fp32, threads), OnnxRunner(forms.int8, threads)]


def _speedup(times: list[list[float]], slow: int, fast: int) -> float:
    """Median over rounds of slow/fast: each ratio pairs timings taken moments apart."""
    return statistics.median(a / b for a, b in zip(times[slow], times[fast], strict=True))


def time_forms(networks: dict[str, Forms], size: Sequence[int], batches: Sequence[int], threads: int,
               max_seconds: float) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    """Latency rows of every (network, runtime) at each batch, all timed in turns, and per batch the factors:
    pruning (base → compressed, both fp32 onnxruntime), quantization (compressed fp32 → int8 onnxruntime),
    runtime (compressed eager → fp32 onnxruntime) and combined (base eager → compressed int8)."""
    from netslim.cost.timing import Conditions, cpu_threads, interleaved_times, random_input

    keys = [(net, rt) for net in networks for rt in RUNTIMES]
    rows: list[dict[str, Any]] = []
    factors: dict[str, dict[str, float]] = {}
    with cpu_threads(threads):
        models = [m for forms in networks.values() for m in _runners(forms, threads)]
        for b in batches:
            x = random_input((b, *size), Conditions("cpu", threads=threads), seed=1)
            times = interleaved_times(models, x, max_seconds=max_seconds)
            for (net, rt), t in zip(keys, times, strict=True):
                ms = statistics.median(t) * 1e3
                rows.append({"network": net, "runtime": rt, "batch": b, "threads": threads, "median_ms": ms,
                             "throughput": b / ms * 1e3, "rounds": len(t),
                             "speedup_vs_first": _speedup(times, 0, keys.index((net, rt)))})
            base = {rt: keys.index(("base", rt)) for rt in RUNTIMES} if "base" in networks else None
            ours = {rt: keys.index(("compressed", rt)) for rt in RUNTIMES}
            eager, fp32, int8 = RUNTIMES
            f = {"quantization": _speedup(times, ours[fp32], ours[int8]),
                 "runtime": _speedup(times, ours[eager], ours[fp32])}
            if base is not None:
                f |= {"pruning": _speedup(times, base[fp32], ours[fp32]),
                      "pruning_eager": _speedup(times, base[eager], ours[eager]),
                      "combined": _speedup(times, base[eager], ours[int8])}
            factors[str(b)] = f
    return rows, factors


def export_int8_run(run_dir: Path, out: Path | None = None, data: str | None = None, images: int = 1000,
                    batches: Sequence[int] = (1, 64), threads: int | None = None, cache_dir: Path | None = None,
                    max_seconds: float = 10.0, overwrite: bool = False, *, calib_method: str = "minmax",
                    calib_images: int = 100, max_drop: float | None = None, sensitivity_images: int = 500,
                    base: Path | None = None) -> dict[str, Any]:
    """Quantize a run's model to int8 ONNX and measure it against fp32 and the base; writes `out` (default
    RUN/model-int8.onnx) and, beside a run directory, export_onnx-int8.json. `max_drop` (accuracy points)
    keeps in fp32 the layers whose int8 form alone loses more on `sensitivity_images` held-out training images."""
    from netslim.data import batches as batches_of
    from netslim.data import calibration_subset
    from netslim.io import atomic_write_text, refuse_existing
    from netslim.surgery.checkpoint import classes_of, load_model, read_metadata
    from netslim.workflows.export_inputs import base_network, training_images

    check_method(calib_method)
    check_max_drop(max_drop)
    if images < 1 or (max_drop is not None and sensitivity_images < 1):
        raise NetslimError("--images and --sensitivity-images must be at least 1")
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise NetslimError(f"run directory {run_dir} does not exist")
    home = run_dir if run_dir.is_dir() else run_dir.parent
    out = Path(out) if out is not None else home / "model-int8.onnx"
    refuse_existing(out, overwrite)
    if out.is_dir():
        raise NetslimError(f"--out {out} is a directory; give the file to write")
    source = run_dir / "model.safetensors" if run_dir.is_dir() else run_dir
    model, plan = load_model(run_dir, "cpu")
    classes = classes_of(read_metadata(source), str(source))
    size = tuple(plan.input_size)
    data = data or (data_spec_of(run_dir) if run_dir.is_dir() else None)
    if data is None:
        raise NetslimError(f"{run_dir} does not record the data it was made with; int8 calibration needs its "
                           f"training images: give --data")
    train = run_split(data, "train", plan, cache_dir, str(source), classes)
    calib, held = training_images(train, calib_images, sensitivity_images if max_drop is not None else 0)
    arrays = calibration_arrays((x for x, _ in batches_of(calib, 50)), size)
    test = run_split(data, "test", plan, cache_dir, str(source), classes)
    test = calibration_subset(test, min(images, len(test.labels)), seed=0)
    inputs, labels = map(list, zip(*batches_of(test, 100), strict=True))
    labels = torch.cat(labels)
    base_model, base_note = base_network(run_dir, plan, base)  # a bad --base fails here, before the slow work
    threads = int(threads or torch.get_num_threads())
    model = model.float().eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        work = Path(tmp)
        sens = None
        if held is not None and max_drop is not None:
            h_in, h_lab = map(list, zip(*batches_of(held, 100), strict=True))
            sens = (h_in, torch.cat(h_lab), max_drop, threads)
        compressed, sensitivity = _forms(model, "compressed", size, work, arrays, calib_method, sens)
        compressed.source_bytes, compressed.source_dtypes = source.stat().st_size, stored_dtypes(source)
        check = check_predictions(model, OnnxRunner(compressed.fp32, threads), inputs)
        check["inputs"] = f"{len(labels)} test images of {data}"
        if not check["ok"]:
            raise NetslimError(f"the fp32 ONNX model does not predict like PyTorch on {check['inputs']}: max relative "
                               f"logit difference {check['max_rel_logit_diff']:.2e} (tolerance {RTOL:g})")
        networks = {"compressed": compressed}
        if base_model is not None:
            networks["base"], _ = _forms(base_model, "base", size, work, arrays, calib_method)
            weights, forms = Path(base_note["weights"]), networks["base"]
            forms.source_bytes, forms.source_dtypes = weights.stat().st_size, stored_dtypes(weights)
        with torch.inference_mode():
            scores = {name: _scores(f, inputs, labels, threads) for name, f in networks.items()}
        latency, factors = time_forms(dict(reversed(networks.items())), size, batches, threads, max_seconds)
        compressed.int8.replace(out)
    import onnxruntime

    report = {"run": str(run_dir), "format": "onnx-int8", "file": str(out), "bytes": out.stat().st_size,
              "arch": plan.arch, "input_size": list(size), "threads": threads,
              "quantization": {**settings(), "tool": f"onnxruntime {onnxruntime.__version__} quantize_static",
                               "calibration": {"method": calib_method, "images": len(calib.labels),
                                               "from": f"training images of {data}"}},
              "sensitivity": sensitivity and {**sensitivity, "from": f"held-out training images of {data}"},
              "check": check, "test": {"images": int(len(labels)), "from": f"test images of {data}"},
              "networks": scores, "base": base_note, "latency": latency,
              "latency_note": "medians of interleaved rounds; speedup_vs_first is against the first row's network "
                              "and runtime (the base's eager PyTorch when the base is known)",
              "factors": factors, "torch": torch.__version__,
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if run_dir.is_dir():
        atomic_write_text(run_dir / "export_onnx-int8.json", json.dumps(report, indent=1))
    return report
