"""Deployment runtimes: a network exported to ONNX (`ort`), quantized to int8 by onnxruntime (`quantize`), and
run as the user will deploy it (`forms`: eager PyTorch, onnxruntime fp32, onnxruntime int8).

Below the cost stage, so that a latency target is timed on the runtime it names; above surgery, whose BatchNorm
folding every exported network goes through.
"""
