"""Dilated ResNet backbones for DeepLabV3+ (reference/dense.md §1.1), with pre-ReLU stage outputs.

The blocks are ``models.resnet_imagenet``'s, so the parameter names are torchvision's (``conv1``,
``bn1``, ``layerK.J.convN``, ``downsample.0/1``; no ``fc``) and OFD's ReLU relocation holds: each
block starts with ``relu(x)`` and ends without a ReLU, so the outputs of ``layer1..layer4`` are
pre-ReLU (BN output + shortcut). Strides and dilations follow the official DeepLab code (the
pytorch-deeplab-xception base of OFD's Segmentation/):

- output stride 16: layer strides [1, 2, 2, 1], dilations [1, 1, 1, 2];
- output stride 8: strides [1, 2, 1, 1], dilations [1, 1, 2, 4].

Every block of a dilated layer, the first included, uses the layer's dilation (torchvision's
``replace_stride_with_dilation`` keeps the previous dilation in the first block; the official code
does not). With ``multi_grid`` the blocks of layer4 get dilations ``multi_grid[j] * dilation``: the
official ResNet-101 uses (1, 2, 4), i.e. 2, 4, 8 at output stride 16 and 4, 8, 16 at 8; its
ResNet-18 uses none.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import kaiming_init
from .resnet_imagenet import BasicBlock, Bottleneck, conv1x1

LAYOUTS = {16: ([1, 2, 2, 1], [1, 1, 1, 2]), 8: ([1, 2, 1, 1], [1, 1, 2, 4])}
"""output stride -> (strides, dilations) of layer1..layer4 behind the stride-4 ImageNet stem."""


def check_output_stride(output_stride: int) -> int:
    """Return ``output_stride`` or fail with a ConfigError: DeepLab supports 16 and 8."""
    if output_stride not in LAYOUTS:
        raise ConfigError(f"model option output_stride: {output_stride!r} is not supported; expected 16 or 8.")
    return output_stride


class BackboneOutput:
    """What a DeepLab backbone hands to the head.

    stages: the four pre-activation OFD positions, shallow to deep.
    low:    the decoder's low-level input (stride 4).
    high:   the ASPP input (the deepest feature, after its activation where it has one).
    block:  post-activation versions of ``stages`` (None unless asked for).
    """

    __slots__ = ("stages", "low", "high", "block")

    def __init__(self, stages: list[torch.Tensor], low: torch.Tensor, high: torch.Tensor,
                 block: list[torch.Tensor] | None):
        self.stages, self.low, self.high, self.block = stages, low, high, block


class DilatedResNet(nn.Module):
    """A ResNet without ``fc``, strided and dilated per layer, giving pre-ReLU stage outputs.

    block, layers: block type and blocks per layer (with ``multi_grid`` layer4 has
                   ``len(multi_grid)`` blocks, as the official ``_make_MG_unit``).
    strides, dilations: per layer (4 each).
    widths:        planes per layer (64, 128, 256, 512 for the ImageNet nets).
    stem:          ``"imagenet"``: 7x7/2 conv (64 ch), BN, ReLU, 3x3/2 max pool (stride 4);
                   ``"small"``: 3x3/2 conv to ``widths[0]`` channels, BN, ReLU (stride 2).
    Convolutions ~ N(0, 2 / (k^2 out)) (the official backbone init, = kaiming fan_out); BN 1/0.
    """

    IGNORED_KEYS = ("fc.",)  # torchvision classifier keys, dropped when loading ImageNet weights

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int], strides: list[int],
                 dilations: list[int], multi_grid: tuple[int, ...] | None = None,
                 widths: tuple[int, ...] = (64, 128, 256, 512), stem: str = "imagenet"):
        super().__init__()
        if stem == "imagenet":
            self.inplanes = 64
            self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            stem_stride = 4
        elif stem == "small":
            self.inplanes = widths[0]
            self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=2, padding=1, bias=False)
            self.maxpool = nn.Identity()
            stem_stride = 2
        else:
            raise ValueError(f"unknown stem {stem!r}")
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        grids = [[1] * n for n in layers]
        if multi_grid is not None:
            grids[3] = list(multi_grid)
        for k in range(4):
            dil = [g * dilations[k] for g in grids[k]]
            setattr(self, f"layer{k + 1}", self._make_layer(block, widths[k], strides[k], dil))
        self.stage_channels = [w * block.expansion for w in widths]
        self.stage_strides = [stem_stride * math.prod(strides[: k + 1]) for k in range(4)]
        self.low_channels = self.stage_channels[0]
        self.out_channels = self.stage_channels[3]
        self.output_stride = self.stage_strides[3]
        kaiming_init(self)

    def _make_layer(self, block, planes: int, stride: int, dilations: list[int]) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        mods = [block(self.inplanes, planes, stride, downsample, dilation=dilations[0])]
        self.inplanes = planes * block.expansion
        mods += [block(self.inplanes, planes, dilation=d) for d in dilations[1:]]
        return nn.Sequential(*mods)

    def layers(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def stage_bns(self) -> list[nn.BatchNorm2d]:
        """The last BN of each layer's last block (bn3 / bn2): OFD's margin BNs, approximate
        because the stage feature also holds the shortcut (reference/dense.md §1.2)."""
        return [layer[-1].last_bn for layer in self.layers()]

    def forward_stages(self, x: torch.Tensor, collect: bool = False) -> BackboneOutput:
        """Stages = raw layer outputs; low = relu(layer1), high = relu(layer4), as the official
        ``extract_feature``. ``collect`` adds the post-ReLU stages as ``block``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        stages = []
        for layer in self.layers():
            x = layer(x)  # the next block applies relu(x) out of place: x stays pre-ReLU
            stages.append(x)
        low, high = F.relu(stages[0]), F.relu(stages[3])
        block = [low, F.relu(stages[1]), F.relu(stages[2]), high] if collect else None
        return BackboneOutput(stages, low, high, block)


def dilated_resnet101(output_stride: int = 16) -> DilatedResNet:
    """The official teacher backbone: Bottleneck [3, 4, 23, 3], layer4 multi-grid (1, 2, 4)."""
    strides, dilations = LAYOUTS[check_output_stride(output_stride)]
    return DilatedResNet(Bottleneck, [3, 4, 23, 3], strides, dilations, multi_grid=(1, 2, 4))


def dilated_resnet18(output_stride: int = 16) -> DilatedResNet:
    """The official student backbone A: BasicBlock [2, 2, 2, 2], plain dilation (no multi-grid)."""
    strides, dilations = LAYOUTS[check_output_stride(output_stride)]
    return DilatedResNet(BasicBlock, [2, 2, 2, 2], strides, dilations)
