"""The small torchvision ViT the attention-head tests share: 2 blocks on 16x16 images (17 tokens of 32 channels,
4 heads of 8), its classifier re-drawn (torchvision zeroes it, so nothing upstream would matter to the loss), and
how those tests compare a module's outputs before and after a cut."""

from __future__ import annotations

import torch
from torch import nn

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
