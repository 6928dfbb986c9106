"""AlexNet shrunk for 32x32 inputs: five 3x3 conv-BN-ReLU layers, three max-pools, a two-layer FC head.

The hidden Linear (classifier.1) gives the zoo one prunable fully connected layer.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv(in_width: int, out_width: int) -> list[nn.Module]:
    return [nn.Conv2d(in_width, out_width, 3, padding=1, bias=False), nn.BatchNorm2d(out_width),
            nn.ReLU(inplace=True)]


class CifarAlexNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, hidden: int = 512) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv(in_channels, 64), nn.MaxPool2d(2),
            *_conv(64, 192), nn.MaxPool2d(2),
            *_conv(192, 384), *_conv(384, 256), *_conv(256, 256), nn.MaxPool2d(2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(256 * 4, hidden), nn.ReLU(inplace=True),
                                        nn.Dropout(0.5), nn.Linear(hidden, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))
