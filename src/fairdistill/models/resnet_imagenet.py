"""ImageNet ResNets 18-152 (He et al. 2016) with OFD's pre-ReLU stage outputs.

Parameter names are torchvision's (``conv1``, ``bn1``, ``layerK.J.convN``, ``downsample.0/1``,
``fc``), so a torchvision state dict loads with ``strict=True``. As in OFD's ImageNet code
(reference/ofd.md §1.4) the block-final ReLU is moved to the start of the next block and applied
explicitly after ``layer4``: the network computes the standard function, and the raw outputs of
``layer1..layer4`` are pre-ReLU (BN output + shortcut).

The blocks take an optional ``dilation`` (default 1, the classification nets never set it): the
dilated segmentation backbones of ``models.resnet_dilated`` use it as the official DeepLab code
does (reference/dense.md §1.1), dilating both 3x3 convs of a basic block and the 3x3 conv of a
bottleneck, with padding equal to the dilation so that the spatial size is kept.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import MODELS, FeatureModel, Features, kaiming_init

EMBEDDINGS = ("pooled", "map")


def check_embedding(embedding: str, choices: tuple[str, ...] = EMBEDDINGS) -> str:
    """Return ``embedding`` or fail with a ConfigError listing the valid choices."""
    if embedding not in choices:
        raise ConfigError(f"model option embedding: unknown value {embedding!r}; expected one of {', '.join(choices)}.")
    return embedding


def conv3x3(inp: int, out: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inp, out, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def conv1x1(inp: int, out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inp, out, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """relu(x) -> 3x3 conv-BN-ReLU -> 3x3 conv-BN, plus shortcut; no ReLU at the end."""

    expansion = 1

    def __init__(self, inp: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 dilation: int = 1):
        super().__init__()
        self.conv1 = conv3x3(inp, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x)  # the previous block's ReLU, relocated; not in place: x may be a stage feature
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out)) + identity


class Bottleneck(nn.Module):
    """relu(x) -> 1x1, 3x3 (strided, as torchvision), 1x1 conv-BN, plus shortcut; no final ReLU."""

    expansion = 4

    def __init__(self, inp: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 dilation: int = 1):
        super().__init__()
        self.conv1 = conv1x1(inp, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x)  # relocated ReLU of the previous block
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out)) + identity


class ResNet(FeatureModel):
    """ImageNet ResNet with torchvision's layout and initialisation (kaiming fan_out, BN 1/0).

    Stages: the pre-ReLU outputs of layer1..layer4. ``stage_bns`` gives the last block's bn2
    (basic) / bn3 (bottleneck): an approximation (reference/ofd.md G13), since the stage feature
    is that BN's output plus the shortcut. ``embedding="pooled"`` gives the pooled vector
    (B, 512 * expansion); ``"map"`` gives the post-ReLU layer4 map (B, C, H, W), MFD's feature
    (reference/mfd.md §1.1). ``extra["block"]`` holds the post-ReLU layer outputs.
    """

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int], num_classes: int = 1000,
                 embedding: str = "pooled"):
        super().__init__()
        self.embedding = check_embedding(embedding)
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        widths = [64, 128, 256, 512]
        self.layer1 = self._make_layer(block, widths[0], layers[0], stride=1)
        self.layer2 = self._make_layer(block, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        self.stage_channels = [w * block.expansion for w in widths]
        kaiming_init(self)

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride), nn.BatchNorm2d(planes * block.expansion)
            )
        mods = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        mods += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def layers(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def stage_bns(self) -> list[nn.Module | None]:
        return [layer[-1].last_bn for layer in self.layers()]

    def forward_features(self, x: torch.Tensor) -> Features:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        stages, block = [], []
        for layer in self.layers():
            x = layer(x)
            stages.append(x)
            block.append(F.relu(x))
        fmap = block[-1]
        pooled = torch.flatten(self.avgpool(fmap), 1)
        logits = self.fc(pooled)
        embedding = pooled if self.embedding == "pooled" else fmap
        return Features(logits=logits, stages=stages, embedding=embedding, extra={"block": block})


@MODELS.register("resnet18")
def resnet18(num_classes: int = 1000, embedding: str = "pooled") -> ResNet:
    """ResNet-18 (11.69M parameters with 1000 classes); MFD's UTKFace model with ``embedding="map"``."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, embedding)


@MODELS.register("resnet34")
def resnet34(num_classes: int = 1000, embedding: str = "pooled") -> ResNet:
    """ResNet-34 (21.80M parameters with 1000 classes)."""
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes, embedding)


@MODELS.register("resnet50")
def resnet50(num_classes: int = 1000, embedding: str = "pooled") -> ResNet:
    """ResNet-50 (25.56M parameters with 1000 classes); OFD's ImageNet student / teacher."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, embedding)


@MODELS.register("resnet101")
def resnet101(num_classes: int = 1000, embedding: str = "pooled") -> ResNet:
    """ResNet-101 (44.55M parameters with 1000 classes)."""
    return ResNet(Bottleneck, [3, 4, 23, 3], num_classes, embedding)


@MODELS.register("resnet152")
def resnet152(num_classes: int = 1000, embedding: str = "pooled") -> ResNet:
    """ResNet-152 (60.19M parameters with 1000 classes); OFD's ImageNet teacher."""
    return ResNet(Bottleneck, [3, 8, 36, 3], num_classes, embedding)
