"""Static int8 post-training quantization of an ONNX file, done by onnxruntime's own tools.

netslim writes no quantizer: `quant_pre_process` (shape inference, graph clean-up) and `quantize_static`
do the work, in QDQ format (what onnxruntime's CPU kernels fuse into int8 convolutions) with per-channel
int8 weights and 8-bit activations whose ranges are calibrated on *training* images. The activation type
follows onnxruntime's advice for the CPU it runs on (`cpu_choice`): on x86, uint8 activations (its fast
u8×s8 kernels; int8 ones measured slower than fp32 on a Zen 4 core), with weights cut to 7 bits where the
core lacks VNNI (saturation); elsewhere int8 activations. What is netslim's:
refusing a calibration set that cannot calibrate (empty, wrong shape, not finite) in one line before
onnxruntime sees it, and naming each conv/linear node after the layer it came from, so that a user reads
`features.10` where onnxruntime says `/features/features.10/Conv`. The same `quantize` makes the export's int8
file and the int8 networks a `--runtime onnx-int8` latency target is timed on (netslim.runtime.forms).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import platform
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from netslim.errors import NetslimError

CALIB_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
LAYER_OPS = ("Conv", "Gemm", "MatMul")  # the conv/linear nodes a sensitivity pass quantizes one at a time


@functools.lru_cache(maxsize=1)
def cpu_choice() -> dict[str, Any]:
    """Activation type and weight range for this CPU, as onnxruntime's quantize_static documentation advises."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return {"activations": "int8", "reduce_range": False, "why": f"{platform.machine()} CPU: s8s8 kernels"}
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    vnni = "avx512_vnni" in flags or "avx_vnni" in flags or not flags  # unknown: assume a current core
    return {"activations": "uint8", "reduce_range": not vnni,
            "why": "x86 CPU: u8s8 kernels" + ("" if vnni else "; no VNNI: 7-bit weights against saturation")}


def settings() -> dict[str, Any]:
    """What the report says about how the int8 model is made."""
    return {"format": "QDQ", "per_channel": True, "weights": "int8 (symmetric, per output channel)", **cpu_choice()}


def _ort_quantization() -> Any:
    try:
        from onnxruntime import quantization
    except ImportError:
        raise NetslimError("int8 export needs onnxruntime: pip install 'netslim[export]'") from None
    return quantization


def check_method(method: str) -> str:
    """`method` if onnxruntime can calibrate with it; one error line naming the choices otherwise."""
    if method not in CALIB_METHODS:
        raise NetslimError(f"unknown calibration method {method!r}; choose from {', '.join(CALIB_METHODS)}")
    return method


def calibration_arrays(batches: Iterable[torch.Tensor | np.ndarray], input_size: Sequence[int]) -> list[np.ndarray]:
    """The calibration batches as float32 arrays, refused when they cannot calibrate the model: none at all,
    images of another shape than `input_size`, or values that are not finite."""
    want = tuple(int(s) for s in input_size)
    out = []
    for i, b in enumerate(batches):
        a = np.ascontiguousarray((b.detach().cpu().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)),
                                 dtype=np.float32)
        if a.ndim != len(want) + 1 or tuple(a.shape[1:]) != want:
            raise NetslimError(f"calibration batch {i} holds images of shape {'×'.join(map(str, a.shape[1:]))}, "
                               f"but the model takes {'×'.join(map(str, want))}: calibrate on the run's own "
                               f"training images")
        if len(a) == 0:
            continue
        if not np.isfinite(a).all():
            raise NetslimError(f"calibration batch {i} holds values that are not finite (NaN or infinity)")
        out.append(a)
    if not out:
        raise NetslimError("the calibration set is empty: int8 ranges need at least one training image")
    return out


def _reader(name: str, arrays: list[np.ndarray]) -> Any:
    """A CalibrationDataReader over `arrays`, fed to the input called `name` (one pass; make one per call)."""
    base = _ort_quantization().CalibrationDataReader

    class Reader(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            self.left = iter(arrays)

        def get_next(self) -> dict[str, np.ndarray] | None:
            a = next(self.left, None)
            return None if a is None else {name: a}

    return Reader()


def preprocess(src: Path, dst: Path) -> str:
    """onnxruntime's quantization pre-processing (symbolic shape inference, graph clean-up) from `src` to `dst`;
    where it fails (exotic ops), `src` is copied as it is. Returns what was done, for the report."""
    _ort_quantization()
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            quant_pre_process(str(src), str(dst))
        return "quant_pre_process"
    except Exception as e:  # noqa: BLE001 (onnxruntime raises many types); quantization still works without it
        shutil.copyfile(src, dst)
        return f"skipped ({type(e).__name__}: {str(e)[:120]})"


def input_name(path: Path) -> str:
    import onnx

    return onnx.load(str(path), load_external_data=False).graph.input[0].name


def layer_nodes(path: Path) -> dict[str, str]:
    """{ONNX node name: layer name} of the conv/linear nodes of `path`, in graph order. The layer name is the
    weight's name without `.weight` (the PyTorch module), else one rebuilt from the node's scope path."""
    import onnx

    graph = onnx.load(str(path)).graph
    weights = {t.name for t in graph.initializer}
    out = {}
    for node in graph.node:
        if node.op_type not in LAYER_OPS:
            continue
        named = [i for i in node.input[1:2] if i in weights and i.endswith(".weight")]
        out[node.name] = named[0][: -len(".weight")] if named else _scope_name(node.name)
    return out


def _scope_name(node: str) -> str:
    """'/layer1/layer1.0/conv1/Conv' -> 'layer1.0.conv1' (the exporter's scopes, each a child of the last)."""
    path = ""
    for part in [p for p in node.split("/") if p][:-1]:
        path = part if not path or part.startswith(path + ".") else f"{path}.{part}"
    return path or node


def fp32_neighbourhood(path: Path, nodes: Sequence[str]) -> list[str]:
    """`nodes` and the one-input ops (activations, pooling, reshapes) that lie between each of them and the
    next conv/linear up and down the graph. Keeping a layer fp32 must keep its input and output fp32 too, and
    onnxruntime quantizes a tensor whenever any op beside it is quantized: excluding the layer alone would
    leave the ranges that hurt it in place."""
    import onnx

    graph = onnx.load(str(path)).graph
    constants = {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant"
                                                       for o in n.output}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def data_inputs(n: Any) -> list[str]:
        return [i for i in n.input if i and i not in constants]

    def passes(n: Any) -> bool:
        return n.op_type not in LAYER_OPS and n.op_type != "Constant" and len(data_inputs(n)) == 1

    by_name = {n.name: n for n in graph.node}
    keep = list(dict.fromkeys(nodes))
    for name in nodes:
        node = by_name[name]
        up = producer.get(data_inputs(node)[0]) if data_inputs(node) else None
        while up is not None and passes(up) and up.name not in keep:
            keep.append(up.name)
            up = producer.get(data_inputs(up)[0])
        todo = [c for o in node.output for c in consumers.get(o, [])]
        while todo:
            c = todo.pop()
            if passes(c) and c.name not in keep:
                keep.append(c.name)
                todo += [d for o in c.output for d in consumers.get(o, [])]
    return keep


def _cache_arg(q: Any, cache: Path | None) -> dict[str, Any]:
    """Ranges computed once, reused by later calls (onnxruntime versions that can; older ones recalibrate)."""
    if cache is None or "calibration_cache_path" not in inspect.signature(q.quantize_static).parameters:
        return {}
    return {"calibration_cache_path": str(cache)}


def quantize(src: Path, dst: Path, arrays: list[np.ndarray], method: str = "minmax", *,
             exclude: Sequence[str] = (), only: Sequence[str] | None = None, cache: Path | None = None) -> None:
    """Write the int8 (QDQ, per-channel) model of the fp32 model `src` to `dst`, calibrated on `arrays` with
    `method`. `exclude`: nodes kept in fp32; `only`: quantize just these nodes. `cache`: a file (absent at
    first) holding the calibrated ranges, so that repeated calls on the same model calibrate once."""
    q = _ort_quantization()
    check_method(method)
    cpu = cpu_choice()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print progress on stdout
            q.quantize_static(str(src), str(dst), _reader(input_name(src), arrays), quant_format=q.QuantFormat.QDQ,
                              per_channel=True, reduce_range=cpu["reduce_range"], weight_type=q.QuantType.QInt8,
                              activation_type=q.QuantType.QUInt8 if cpu["activations"] == "uint8" else
                              q.QuantType.QInt8, calibrate_method=getattr(q.CalibrationMethod, CALIB_METHODS[method]),
                              nodes_to_exclude=list(exclude) or None, nodes_to_quantize=list(only) if only else None,
                              **_cache_arg(q, cache))
    except NetslimError:
        raise
    except Exception as e:  # noqa: BLE001 (onnxruntime's errors have many types); one line for the user
        raise NetslimError(f"onnxruntime could not quantize {src.name}: {type(e).__name__}: {e}") from None
