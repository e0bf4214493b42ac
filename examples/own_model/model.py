"""A small MobileNetV2-style CIFAR network, written the way users write models: not in oaq-search's registry.

It has what a user's model brings: a stem whose two branches are concatenated, depthwise 3x3 convs in
inverted-residual blocks with residual adds, ReLU6, and a `.view` flatten before an `nn.Linear` head.
`build` is the factory a study file names (`factory = "model:build"`).
"""

from __future__ import annotations

import torch
from torch import nn


def conv_bn(in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1, groups: int = 1,
            activation: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
              nn.BatchNorm2d(out_channels)]
    return nn.Sequential(*layers, nn.ReLU6(inplace=True)) if activation else nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """1x1 expansion, depthwise 3x3, 1x1 linear projection; the input is added back when shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        self.expand = conv_bn(in_channels, hidden)
        self.depthwise = conv_bn(hidden, hidden, 3, stride, groups=hidden)
        self.project = conv_bn(hidden, out_channels, activation=False)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x):
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.residual else out


class Stem(nn.Module):
    """A 3x3 and a 1x1 view of the image, concatenated along the channels."""

    def __init__(self, out_channels: int):
        super().__init__()
        self.wide = conv_bn(3, out_channels * 3 // 4, 3)
        self.point = conv_bn(3, out_channels - out_channels * 3 // 4, 1)

    def forward(self, x):
        return torch.cat((self.wide(x), self.point(x)), dim=1)


class TinyMobileNet(nn.Module):
    # (expansion, output channels, blocks, stride of the first block)
    STAGES = ((1, 16, 1, 1), (4, 24, 2, 1), (4, 32, 2, 2), (4, 64, 2, 2))

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.stem = Stem(width)
        blocks, channels = [], width
        for expansion, out_channels, count, stride in self.STAGES:
            for index in range(count):
                blocks.append(InvertedResidual(channels, out_channels, stride if index == 0 else 1, expansion))
                channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.head = conv_bn(channels, 128)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, x):
        x = self.pool(self.head(self.blocks(self.stem(x))))
        return self.classifier(x.view(x.size(0), -1))


def build(num_classes: int = 10) -> TinyMobileNet:
    return TinyMobileNet(num_classes)
