"""ResNet-20/56/110 for CIFAR (He et al. 2016): three stages of BasicBlocks with widths 16/32/64.

Shape-changing blocks use a 1x1 conv + BN `downsample` shortcut (keys as in the shared resnet56
checkpoint). Blocks keep no state outside themselves, so a block with an identity shortcut can be
replaced by nn.Identity to remove it.
"""

from __future__ import annotations

import torch
from torch import nn

DEPTHS = {"resnet20": 3, "resnet56": 9, "resnet110": 18}


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus shortcut, then ReLU; two separate ReLU modules so each fires once."""

    def __init__(self, in_width: int, width: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_width, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_width != width:
            self.downsample = nn.Sequential(nn.Conv2d(in_width, width, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(width))
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + shortcut)


class CifarResNet(nn.Module):
    def __init__(self, blocks_per_stage: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = _stage(16, 16, blocks_per_stage, 1)
        self.layer2 = _stage(16, 32, blocks_per_stage, 2)
        self.layer3 = _stage(32, 64, blocks_per_stage, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _stage(in_width: int, width: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [BasicBlock(in_width, width, stride)]
    layers += [BasicBlock(width, width) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def resnet(name: str, num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(DEPTHS[name], num_classes, in_channels)
