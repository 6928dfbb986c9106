"""A three-conv network for small grayscale digits (8x8 or 16x16): trains in seconds on a CPU."""

from __future__ import annotations

import torch
from torch import nn


def _conv(in_width: int, out_width: int) -> list[nn.Module]:
    return [nn.Conv2d(in_width, out_width, 3, padding=1, bias=False), nn.BatchNorm2d(out_width),
            nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1,
                 widths: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        a, b, c = widths
        self.features = nn.Sequential(*_conv(in_channels, a), nn.MaxPool2d(2), *_conv(a, b), nn.MaxPool2d(2),
                                      *_conv(b, c))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))
