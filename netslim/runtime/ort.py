"""A network as onnxruntime runs it: exported to ONNX with a dynamic batch axis, and an onnxruntime session
called like a module.

Kept below the workflows because two stages need them: `export` writes and checks the files, and the cost
stage times a latency target on the runtime the user deploys on (netslim.runtime.forms). A session's
threads sleep when idle (NO_SPINNING): timed in turns with PyTorch, spinning threads would steal its cores.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from netslim.errors import NetslimError


def onnx_exporter() -> str:
    """'dynamo' when onnxscript is installed (torch's current exporter), else the TorchScript one."""
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        return "torchscript"
    return "dynamo"


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, opset: int = 18) -> str:
    """Write `model` as ONNX with a dynamic batch axis; returns the exporter used."""
    try:
        import onnx
    except ImportError:
        raise NetslimError("ONNX export needs the onnx package: pip install 'netslim[export]'") from None
    kind = onnx_exporter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "dynamo":
            try:
                batch = torch.export.Dim("batch", min=1, max=1 << 16)
                torch.onnx.export(model, (example,), str(path), dynamo=True, input_names=["input"],
                                  output_names=["logits"], dynamic_shapes=({0: batch},), opset_version=opset)
            except Exception:  # noqa: BLE001 (any capture failure): the TorchScript exporter may still manage
                kind = "torchscript"
        if kind == "torchscript":
            torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["input"],
                              output_names=["logits"], opset_version=min(opset, 17),
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    onnx.checker.check_model(str(path))
    return kind


# onnxruntime's idle worker threads spin by default: timed in turns with PyTorch, they keep the cores busy
# while the PyTorch model runs next and inflate its time (3x on a 2-core VGG-16 at batch 1)
NO_SPINNING = {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"}


class OnnxRunner:
    """An onnxruntime session called like a module: float32 torch tensor in, torch tensor out. Its threads
    sleep when idle (NO_SPINNING), so what is timed next to it gets the cores."""

    def __init__(self, path: Path, threads: int) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise NetslimError("checking an ONNX export needs onnxruntime: pip install 'netslim[export]'") from None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        for key, value in NO_SPINNING.items():
            opts.add_session_config_entry(key, value)
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.name = self.session.get_inputs()[0].name
        self.version = ort.__version__

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.name: x.detach().cpu().numpy()})[0])
