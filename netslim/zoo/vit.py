"""vit_tiny: torchvision's VisionTransformer at CIFAR size, so a checkpoint's keys are torchvision's own.

32x32 images in 4x4 patches give 64 tokens plus the class token; 6 blocks of 4 heads over 128 channels with
an MLP of 256 hidden units, about 0.8 M parameters: the transformer counterpart of resnet56 for the CIFAR
benchmarks. torchvision is imported on first build (it adds ~1 s to every netslim command otherwise).
"""

from __future__ import annotations

import math

from torch import nn

VIT_TINY = {"image_size": 32, "patch_size": 4, "num_layers": 6, "num_heads": 4, "hidden_dim": 128, "mlp_dim": 256}


def vit_tiny(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """The CIFAR-size ViT; `in_channels` other than 3 replaces the patch embedding, initialised as torchvision's."""
    from torchvision.models import VisionTransformer

    model = VisionTransformer(num_classes=num_classes, **VIT_TINY)
    if in_channels != 3:
        patch, width = VIT_TINY["patch_size"], VIT_TINY["hidden_dim"]
        model.conv_proj = nn.Conv2d(in_channels, width, kernel_size=patch, stride=patch)
        nn.init.trunc_normal_(model.conv_proj.weight, std=math.sqrt(1 / (in_channels * patch * patch)))
        nn.init.zeros_(model.conv_proj.bias)
    return model
