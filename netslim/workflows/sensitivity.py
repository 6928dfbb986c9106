"""Which layers quantize badly: every conv/linear quantized alone, its accuracy drop measured, and those over
`--max-int8-drop` kept in fp32.

Quantizing one node at a time (onnxruntime's `nodes_to_quantize`) charges each layer with its own error only;
the drops are measured on held-out *training* images (never the test split the report scores, never the
calibration images), so choosing which layers stay fp32 does not tune the model on its own test score.
The calibrated ranges are shared by all the one-layer models (quantize's `cache`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from netslim.errors import NetslimError
from netslim.runtime.ort import OnnxRunner
from netslim.runtime.quantize import layer_nodes, quantize
from netslim.workflows.export import predict


def check_max_drop(max_drop: float | None) -> None:
    if max_drop is not None and not max_drop >= 0:
        raise NetslimError(f"--max-int8-drop is in accuracy points and must be 0 or more, not {max_drop}")


def layer_sensitivity(fp32: Path, arrays: list[np.ndarray], inputs: Sequence[torch.Tensor], labels: torch.Tensor,
                      work: Path, *, method: str = "minmax", threads: int = 1,
                      cache: Path | None = None) -> dict[str, Any]:
    """The fp32 accuracy on the held-out images (`inputs`, `labels`) and, per conv/linear node, the accuracy
    with that node alone in int8 and the drop in points (positive: worse)."""
    reference = float((predict(OnnxRunner(fp32, threads), inputs) == labels).float().mean())
    rows = []
    one = work / "one-layer-int8.onnx"
    for node, layer in layer_nodes(fp32).items():
        quantize(fp32, one, arrays, method, only=[node], cache=cache)
        acc = float((predict(OnnxRunner(one, threads), inputs) == labels).float().mean())
        rows.append({"node": node, "layer": layer, "accuracy": acc, "drop": (reference - acc) * 100})
    one.unlink(missing_ok=True)
    return {"images": int(len(labels)), "fp32_accuracy": reference, "layers": rows}


def kept_in_fp32(layers: list[dict[str, Any]], max_drop: float) -> list[str]:
    """The nodes whose own int8 error costs more than `max_drop` accuracy points."""
    return [r["node"] for r in layers if r["drop"] > max_drop]
