"""MobileNetV2 for 32x32 inputs, laid out like torchvision's (features.N.conv..., classifier.1).

As in common CIFAR ports, the stem and the 24-channel stage use stride 1 instead of 2, so a 32x32
input reaches the last stage at 4x4 rather than 1x1.
"""

from __future__ import annotations

import torch
from torch import nn

# expansion t, output width c, repeats n, first stride s
SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
            (6, 320, 1, 1)]


def conv_bn_act(in_width: int, out_width: int, kernel: int = 3, stride: int = 1,
                groups: int = 1) -> nn.Sequential:
    conv = nn.Conv2d(in_width, out_width, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(out_width), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """Expand (1x1) - depthwise (3x3) - project (1x1, linear); residual add when shapes allow."""

    def __init__(self, in_width: int, out_width: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = in_width * expand
        self.use_res_connect = stride == 1 and in_width == out_width
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn_act(in_width, hidden, kernel=1))
        layers += [conv_bn_act(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, out_width, 1, bias=False), nn.BatchNorm2d(out_width)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, last_width: int = 1280) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv_bn_act(in_channels, 32, stride=1)]
        width = 32
        for t, c, n, s in SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(width, c, s if i == 0 else 1, t))
                width = c
        layers.append(conv_bn_act(width, last_width, kernel=1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last_width, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))
