"""Where an ONNX file's bytes go: layer weights, biases, quantization parameters, other constants, and the
graph itself (node and tensor names, shapes, attributes: the file size less every constant's data).

The int8 file's weights are exactly a quarter of the fp32 file's, but its biases stay 32-bit (int32 in QDQ),
every output channel adds a scale and a zero point, and each quantized tensor adds Quantize/Dequantize
nodes to the graph. The split says which of these keeps a file above a quarter, so a report can show it.
"""

from __future__ import annotations

from pathlib import Path

PARTS = ("weights", "biases", "quantization", "other", "graph")
LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
QDQ = ("QuantizeLinear", "DequantizeLinear")


def onnx_bytes(path: Path) -> dict[str, int]:
    """Bytes of `path` by part (see PARTS); they sum to the file size."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    consumers: dict[str, list[tuple[str, int, str]]] = {}  # tensor -> (op, input index, output of that node)
    for node in graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node.op_type, i, node.output[0] if node.output else ""))

    def role(name: str) -> str:
        for op, i, out in consumers.get(name, []):
            if op in LAYERS and i in (1, 2):
                return "weights" if i == 1 else "biases"
            if op in QDQ and i > 0:
                return "quantization"
            if op == "DequantizeLinear":  # a stored int8/int32 tensor: the role of what it becomes
                found = role(out)
                if found != "other":
                    return found
        return "other"

    parts = dict.fromkeys(PARTS, 0)
    for t in graph.initializer:
        parts[role(t.name)] += int(numpy_helper.to_array(t).nbytes)
    parts["graph"] = Path(path).stat().st_size - sum(parts.values())
    return parts


def compact(path: Path) -> None:
    """Rewrite `path` with short names for every node and inner tensor, and without doc strings or stored
    shape annotations (onnxruntime infers them again). The graph's input and output names stay. Names are
    most of a small int8 file's graph bytes (onnxruntime's quantizer appends `_quantized`, `_scale` and
    `_zero_point` to exporter paths such as `/layer1/layer1.0/conv1/Conv_output_0`); nothing runs differently."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    keep = {v.name for v in graph.input} | {v.name for v in graph.output} | {""}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if name in keep:
            return name
        return names.setdefault(name, f"t{len(names):x}")

    for t in graph.initializer:
        t.name = short(t.name)
        t.doc_string = ""
    for i, node in enumerate(graph.node):
        node.name = f"n{i:x}"
        node.doc_string = ""
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]
    del graph.value_info[:]
    graph.doc_string = model.doc_string = ""
    onnx.save(model, str(path))
