"""The small torchvision ViT the attention-head tests share: 2 blocks on 16x16 images (17 tokens of 32 channels,
4 heads of 8), its classifier re-drawn (torchvision zeroes it, so nothing upstream would matter to the loss), and
how those tests compare a module's outputs before and after a cut."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from netslim.plan import Plan

SIDE, D, HEADS, LAYERS, MLP = 16, 32, 4, 2, 64
HEAD_DIM = D // HEADS


def att(i: int) -> str:
    return f"encoder.layers.encoder_layer_{i}.self_attention"


def small_vit(seed: int = 0, num_classes: int = 10, head_std: float = 0.1) -> nn.Module:
    from torchvision.models import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(image_size=SIDE, patch_size=4, num_layers=LAYERS, num_heads=HEADS, hidden_dim=D,
                              mlp_dim=MLP, num_classes=num_classes).eval()
    nn.init.normal_(model.heads.head.weight, std=head_std)
    return model


def outputs_of(net: nn.Module, name: str, data: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Module `name`'s output (the first of a tuple) over `data`."""
    seen: list[torch.Tensor] = []
    hook = net.get_submodule(name).register_forward_hook(
        lambda m, a, out: seen.append((out[0] if isinstance(out, tuple) else out).detach().clone()))
    try:
        with torch.no_grad():
            for x, _ in data:
                net.eval()(x)
    finally:
        hook.remove()
    return torch.cat(seen)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def reloads_and_exports(cut: nn.Module, plan: Plan, x: torch.Tensor, tmp: Path) -> nn.Module:
    """Save `cut` with its Plan into the folder `tmp`, reload it from that file alone: bit-identical outputs on
    `x`; exported to ONNX, onnxruntime's output on x[:1] matches PyTorch's. The reloaded network."""
    import pytest

    from netslim.runtime.ort import export_onnx
    from netslim.surgery.checkpoint import load_model, save_model

    ort = pytest.importorskip("onnxruntime")
    save_model(tmp / "cut.safetensors", cut, plan)
    again, stored = load_model(tmp / "cut.safetensors")
    assert stored.heads == plan.heads
    with torch.no_grad():
        want = cut.eval()(x)
        torch.testing.assert_close(again.eval()(x), want, rtol=0, atol=0)
    export_onnx(again, x[:1], tmp / "cut.onnx")
    sess = ort.InferenceSession(str(tmp / "cut.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x[:1].numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), want[:1], rtol=1e-4, atol=1e-4)
    return again
