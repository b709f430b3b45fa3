"""CIFAR ResNets of depth 6n+2 (He et al., CVPR 2016, §4.2) with OFD's relocated ReLU.

Layout as in OFD's CIFAR-100 ResNet56 student (reference/ofd.md §1.4): stem conv3x3-16 + BN, three
stages of n BasicBlocks at 16/32/64 channels, projection shortcuts (1x1 conv + BN, "option B")
wherever the shape changes, global average pooling, linear head. Module names follow that code
(``conv1, bn1, layer1..3, fc``; blocks ``conv1, bn1, conv2, bn2, downsample``).

ReLU relocation (OFD, gotcha G3): a block *begins* with ReLU and ends at BN + shortcut, and the
network applies one ReLU before pooling. ReLU(stem) -> block -> ReLU -> block ... is the same
function as the standard post-activation ResNet, but now every stage output is pre-ReLU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..registry import check_number
from .base import MODELS, FeatureModel, Features, kaiming_init


class BasicBlock(nn.Module):
    """ReLU, conv3x3-BN-ReLU-conv3x3-BN, plus shortcut; no closing ReLU (see module docstring)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x)
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return out + (x if self.downsample is None else self.downsample(x))


class CifarResNet(FeatureModel):
    """ResNet-(6n+2) for 32x32 inputs (any size works: pooling is global).

    Features: stages = raw outputs of layer1..3 (pre-ReLU: BN output + shortcut), channels
    [16, 32, 64]; embedding = pooled ReLU(layer3) (64); extra["block"] = ReLU of each stage
    output, i.e. the stage outputs of the standard network.
    """

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, n, 1)
        self.layer2 = self._stage(16, 32, n, 2)
        self.layer3 = self._stage(32, 64, n, 2)
        self.fc = nn.Linear(64, num_classes)
        self.stage_channels = [16, 32, 64]
        kaiming_init(self)

    @staticmethod
    def _stage(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        first = BasicBlock(in_planes, planes, stride)
        return nn.Sequential(first, *[BasicBlock(planes, planes) for _ in range(n - 1)])

    def forward_features(self, x: torch.Tensor) -> Features:
        s1 = self.layer1(self.bn1(self.conv1(x)))  # layer1's first block applies the stem's ReLU
        s2 = self.layer2(s1)
        s3 = self.layer3(s2)
        block = [F.relu(s) for s in (s1, s2, s3)]
        embedding = block[-1].mean(dim=(2, 3))
        return Features(logits=self.fc(embedding), stages=[s1, s2, s3], embedding=embedding, extra={"block": block})

    def stage_bns(self) -> list[nn.Module | None]:
        """Approximate (as OFD's code, gotcha G13): the last block's bn2 of each stage.

        The stage feature is that BN's output *plus the shortcut*, so its batch statistics are not
        exactly (bias, |weight|); OFD uses these BNs for the margin all the same.
        """
        return [layer[-1].bn2 for layer in (self.layer1, self.layer2, self.layer3)]


@MODELS.register("resnet_cifar")
def resnet_cifar(num_classes: int, depth: int = 56, in_channels: int = 3) -> CifarResNet:
    """CIFAR ResNet of ``depth`` = 6n+2 (20, 32, 44, 56, 110, ...)."""
    for name, v, low in (("depth", depth, 8), ("in_channels", in_channels, 1), ("num_classes", num_classes, 1)):
        check_number(v, f"resnet_cifar.{name}", integer=True, ge=low)
    if (depth - 2) % 6:
        raise ConfigError(f"resnet_cifar: option depth={depth} is invalid; expected 6n+2 (20, 32, 44, 56, 110).")
    return CifarResNet(depth, num_classes, in_channels)


def _preset(depth: int):
    def build(num_classes: int, in_channels: int = 3) -> CifarResNet:
        return resnet_cifar(num_classes, depth=depth, in_channels=in_channels)

    build.__doc__ = f"CIFAR ResNet-{depth}."
    return build


for _depth in (20, 56, 110):
    MODELS.register(f"resnet{_depth}", _preset(_depth))
