"""The original's dilated ResNet: MIT deep stem, stride on the 3x3 convolution, output stride 8.

Module names follow the original code (and the MIT ``resnet101-imagenet.pth``): ``conv1, bn1, conv2, bn2, conv3,
bn3, layer1 .. layer4``; inside a block ``conv1, bn1, conv2, bn2, conv3, bn3, downsample.0, downsample.1``.
"""
from dataclasses import dataclass
from typing import Sequence, Tuple

import torch
from torch import nn

from libs.norm import NormFactory


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution without bias, padded to keep the size (divided by ``stride``)."""
    return nn.Conv2d(
        in_channels, out_channels, 3, stride=stride, padding=dilation, dilation=dilation, bias=False
    )


class Bottleneck(nn.Module):
    """ResNet bottleneck (1x1 -> 3x3 (stride, dilation) -> 1x1, x4 channels) with a residual connection.

    Shapes: ``(N, inplanes, H, W) -> (N, 4 * planes, H / stride, W / stride)``.
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        norm: NormFactory,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module = None,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = conv3x3(planes, planes, stride, dilation)
        self.bn2 = norm(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = norm(planes * self.expansion)
        # Not in place after a norm: InPlaceABN's backward needs its output intact.
        self.relu = nn.ReLU()
        self.relu_inplace = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu_inplace(out + residual)


@dataclass(frozen=True)
class BackboneSpec:
    """Depth and widths of a dilated ResNet and of the heads built on it.

    ``stem_width``: channels of conv1/conv2 (conv3 has twice as many); ``base_width``: the planes of layer1,
    doubled at each following layer; ``head_width``: the channels inside the RCCA and DSN heads.
    """

    blocks: Tuple[int, int, int, int]
    stem_width: int = 64
    base_width: int = 64
    head_width: int = 512

    @property
    def layer3_channels(self) -> int:
        return self.base_width * 4 * Bottleneck.expansion

    @property
    def layer4_channels(self) -> int:
        return self.base_width * 8 * Bottleneck.expansion


BACKBONES = {
    "resnet101": BackboneSpec(blocks=(3, 4, 23, 3)),
    "resnet50": BackboneSpec(blocks=(3, 4, 6, 3)),
    # Same structure and names, narrow: for CPU tests and the demo.
    "tiny": BackboneSpec(blocks=(1, 1, 1, 1), stem_width=16, base_width=16, head_width=64),
}


class DilatedResNet(nn.Module):
    """Deep-stem ResNet with layer3 / layer4 dilated (2 / 4 x ``multi_grid``) instead of strided: output stride 8.

    ``forward_features(x)``: ``(N, 3, H, W) -> (layer3 (N, 16 * base, h, w), layer4 (N, 32 * base, h, w))`` with
    ``h`` about ``H / 8`` (769 -> 97, 1024 -> 129: the max-pool rounds up).
    """

    def __init__(self, spec: BackboneSpec, norm: NormFactory, multi_grid: Sequence[int] = (1, 1, 1)):
        super().__init__()
        stem, base = spec.stem_width, spec.base_width
        self.conv1 = conv3x3(3, stem, stride=2)
        self.bn1 = norm(stem)
        self.conv2 = conv3x3(stem, stem)
        self.bn2 = norm(stem)
        self.conv3 = conv3x3(stem, stem * 2)
        self.bn3 = norm(stem * 2)
        self.relu = nn.ReLU()  # not in place: InPlaceABN's backward needs its output intact
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1, ceil_mode=True)
        self.inplanes = stem * 2
        self.layer1 = self._make_layer(base, spec.blocks[0], norm)
        self.layer2 = self._make_layer(base * 2, spec.blocks[1], norm, stride=2)
        self.layer3 = self._make_layer(base * 4, spec.blocks[2], norm, dilation=2)
        self.layer4 = self._make_layer(base * 8, spec.blocks[3], norm, dilation=4, multi_grid=multi_grid)

    def _make_layer(
        self, planes: int, blocks: int, norm: NormFactory, stride: int = 1, dilation: int = 1, multi_grid=(1,)
    ) -> nn.Sequential:
        out_channels = planes * Bottleneck.expansion
        downsample = None
        if stride != 1 or self.inplanes != out_channels:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, out_channels, 1, stride=stride, bias=False), norm(out_channels)
            )
        layers = []
        for index in range(blocks):
            layers.append(
                Bottleneck(
                    self.inplanes,
                    planes,
                    norm,
                    stride=stride if index == 0 else 1,
                    dilation=dilation * multi_grid[index % len(multi_grid)],
                    downsample=downsample if index == 0 else None,
                )
            )
            self.inplanes = out_channels
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.relu(self.bn3(self.conv3(x)))
        x = self.maxpool(x)
        x = self.layer2(self.layer1(x))
        c3 = self.layer3(x)
        return c3, self.layer4(c3)
