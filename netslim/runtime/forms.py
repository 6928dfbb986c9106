"""A network in the form the runtime a user deploys on runs it: eager PyTorch as it is, or BatchNorm folded,
exported to ONNX and run by onnxruntime, in fp32 or quantized to int8.

`write_onnx` is the one sequence both the int8 export (workflows/export_int8.py) and a latency target timed
on `onnx-int8` go through (fold, export, onnxruntime's pre-processing, `quantize`), so the graph a target is
timed on is the graph `netslim export --format onnx-int8` writes. `as_runtime` makes a network to *time*:
its int8 form is calibrated on seeded random inputs, not on images. That is sound for timing only: a QDQ
graph's operators, shapes, fusions and kernels do not depend on the calibrated ranges, but its accuracy does,
so nothing measured on these forms is an accuracy.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from netslim.errors import NetslimError

RUNTIMES = {"torch": "eager PyTorch", "onnx": "onnxruntime fp32", "onnx-int8": "onnxruntime int8"}
TIMING_CALIBRATION = (2, 8)  # random batches x images that calibrate an int8 form made only to be timed


def check_runtime(runtime: str, device: str = "cpu") -> str:
    """`runtime` when it can be timed on `device`; one error line otherwise: an unknown name, an onnxruntime
    runtime on a GPU (netslim times onnxruntime's CPU kernels), or onnx / onnxruntime not installed."""
    if runtime not in RUNTIMES:
        raise NetslimError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
    if runtime == "torch":
        return runtime
    if str(device).startswith("cuda"):
        raise NetslimError(f"runtime {runtime} is timed on the CPU (onnxruntime's CPU kernels), not on {device}: "
                           f"drop --device {device}, or time on the GPU with --runtime torch")
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise NetslimError(f"runtime {runtime} needs onnx and onnxruntime: pip install 'netslim[export]'") from None
    return runtime


@dataclass
class OnnxFiles:
    """What `write_onnx` wrote: the fp32 file and, when quantized, its pre-processed copy and the int8 file."""

    fp32: Path
    exporter: str
    ready: Path | None = None
    int8: Path | None = None
    preprocess: str | None = None


def write_onnx(model: nn.Module, input_size: Sequence[int], work: Path, name: str,
               arrays: list[np.ndarray] | None = None, method: str = "minmax", *,
               cache: Path | None = None) -> OnnxFiles:
    """`model` with BatchNorm folded, as fp32 ONNX (`work/NAME-fp32.onnx`) and, given calibration `arrays`,
    pre-processed (`NAME-pre.onnx`) and quantized to int8 with `method` (`NAME-int8.onnx`; `cache`: the
    calibrated ranges, for quantize's later calls on the same model)."""
    from netslim.runtime.ort import export_onnx
    from netslim.runtime.quantize import preprocess, quantize
    from netslim.surgery.fold import fold_batchnorm

    size = tuple(int(s) for s in input_size)
    fp32, ready, int8 = work / f"{name}-fp32.onnx", work / f"{name}-pre.onnx", work / f"{name}-int8.onnx"
    example = torch.randn((2, *size), generator=torch.Generator().manual_seed(0))
    exporter = export_onnx(fold_batchnorm(model, input_size=size), example, fp32)
    if arrays is None:
        return OnnxFiles(fp32, exporter)
    how = preprocess(fp32, ready)
    quantize(ready, int8, arrays, method, cache=cache)
    return OnnxFiles(fp32, exporter, ready, int8, how)


def random_calibration(input_size: Sequence[int], seed: int = 0) -> list[np.ndarray]:
    """Seeded standard-normal batches that calibrate an int8 form made only to be timed (module docstring)."""
    rng = np.random.default_rng(seed)
    batches, images = TIMING_CALIBRATION
    return [rng.standard_normal((images, *input_size), dtype=np.float32) for _ in range(batches)]


def as_runtime(model: nn.Module, runtime: str, input_size: Sequence[int],
               threads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """`model` (on the CPU, float32) as `runtime` runs it, to be timed: the module itself for torch; else an
    onnxruntime session of its folded (and, for onnx-int8, quantized) ONNX form on `threads` threads that do not
    spin. The files are gone once the session has read them."""
    check_runtime(runtime)
    if runtime == "torch":
        return model
    from netslim.runtime.ort import OnnxRunner

    with tempfile.TemporaryDirectory(prefix="netslim-runtime-") as tmp:
        arrays = random_calibration(input_size) if runtime == "onnx-int8" else None
        files = write_onnx(model, input_size, Path(tmp), "timed", arrays)
        return OnnxRunner(files.int8 or files.fp32, threads)
