"""MobileNetV2 (Sandler et al. 2018), width 1.0, with torchvision's parameter names and OFD positions.

Layout and names are torchvision's ``mobilenet_v2``: ``features.0`` is a 3x3/2 conv-BN-ReLU6 stem
(``features.0.0``, ``.1``), ``features.1..17`` are inverted residual blocks (``features.N.conv``: for
expansion t > 1 ``conv.0`` = 1x1 expansion conv-BN-ReLU6, ``conv.1`` = 3x3 depthwise conv-BN-ReLU6,
``conv.2`` = 1x1 pw-linear conv, ``conv.3`` its BN; for t = 1 the expansion is absent),
``features.18`` is the 1x1 conv-BN-ReLU6 to 1280 channels and ``classifier.1`` the linear layer
(``classifier.0`` is Dropout(0.2)). A torchvision state dict therefore loads with ``strict=True``.

OFD positions (reference/dense.md §1.2, the official segmentation backbone's ``extract_feature``):
1-3 are the pre-ReLU6 outputs of the *next* block's expansion conv + BN, i.e. of ``features[4]``
(144 ch, stride 4), ``features[7]`` (192 ch, stride 8) and ``features[14]`` (576 ch, stride 16 in
the classifier); 4 is the output of ``features[17]``, the 320-ch pw-linear BN (no activation
follows it and no shortcut is added, so its ``stage_bns`` entry is exact, as are 1-3).

Output stride (the official DeepLab backbone's rule): once the running stride has reached the
target, every later group of blocks gets stride 1 and the dilation accumulated so far, which is
then multiplied by the group's nominal stride. At 16 this leaves the 160-ch group at dilation 1
and gives the 320-ch block dilation 2; at 32 it is the standard network. Depthwise convs pad by
their dilation (torchvision's rule). The official code instead zero-pads each block's *input*
before the whole block (``fixed_padding``), so its expansion conv + BN + ReLU6 also runs on the
padding: border pixels differ from this (and torchvision's) function; parameters do not.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import MODELS, FeatureModel, Features
from .resnet_dilated import BackboneOutput
from .resnet_imagenet import check_embedding

SETTINGS = [  # expansion t, output channels c, blocks n, first stride s (Sandler et al. Table 2)
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
]
POSITION_BLOCKS = (4, 7, 14)  # blocks whose expansion conv + BN output is an OFD position
LOW_LEVEL_END = 4  # features[0:4] is the DeepLab decoder's low-level feature (24 ch, stride 4)
LAST_CHANNEL = 1280


class ConvBNReLU6(nn.Sequential):
    """conv (no bias) - BN - ReLU6, torchvision's ``Conv2dNormActivation`` layout (0, 1, 2)."""

    def __init__(self, inp: int, out: int, kernel: int = 3, stride: int = 1, groups: int = 1, dilation: int = 1):
        pad = (kernel - 1) // 2 * dilation
        super().__init__(nn.Conv2d(inp, out, kernel, stride, pad, dilation=dilation, groups=groups, bias=False),
                         nn.BatchNorm2d(out), nn.ReLU6())


class InvertedResidual(nn.Module):
    """Expansion 1x1 (t > 1), depthwise 3x3 (strided or dilated), pw-linear 1x1 + BN; shortcut
    when the stride is 1 and the channels match. ReLU6s are out of place."""

    def __init__(self, inp: int, out: int, stride: int, expand_ratio: int, dilation: int = 1):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == out
        self.expands = expand_ratio != 1
        layers: list[nn.Module] = [ConvBNReLU6(inp, hidden, kernel=1)] if self.expands else []
        layers += [ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden, dilation=dilation),
                   nn.Conv2d(hidden, out, 1, 1, 0, bias=False), nn.BatchNorm2d(out)]
        self.conv = nn.Sequential(*layers)
        self.out_channels = out

    @property
    def expansion_bn(self) -> nn.BatchNorm2d:
        return self.conv[0][1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return x + y if self.use_res_connect else y

    def forward_expanded(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(expansion BN output before ReLU6, its ReLU6, block output), with one pass."""
        pre = self.conv[0][1](self.conv[0][0](x))
        act = F.relu6(pre)
        y = self.conv[1:](act)
        return pre, act, (x + y if self.use_res_connect else y)


def inverted_residuals(output_stride: int = 32) -> list[InvertedResidual]:
    """``features[1..17]`` with the official output-stride rule (module docstring)."""
    blocks, inp, current, rate = [], 32, 2, 1
    for t, c, n, s in SETTINGS:
        if current == output_stride:
            stride, dilation = 1, rate
            rate *= s
        else:
            stride, dilation = s, 1
            current *= s
        for i in range(n):
            blocks.append(InvertedResidual(inp, c, stride if i == 0 else 1, t, dilation))
            inp = c
    return blocks


def run_positions(features: nn.Sequential, x: torch.Tensor, collect: bool) -> BackboneOutput:
    """Run ``features[0..17]`` once, returning the four OFD positions, the low-level feature
    (``features[0:4]`` output) and the 320-ch output. ``block`` (when ``collect``): ReLU6 of
    positions 1-3 (what the block computes next) and position 4 itself (it has no activation)."""
    stages, acts, low = [], [], None
    for k in range(18):
        if k == LOW_LEVEL_END:
            low = x
        if k in POSITION_BLOCKS:
            pre, act, x = features[k].forward_expanded(x)
            stages.append(pre)
            acts.append(act)
        else:
            x = features[k](x)
    stages.append(x)
    return BackboneOutput(stages, low, x, acts + [x] if collect else None)


def position_bns(features: nn.Sequential) -> list[nn.BatchNorm2d]:
    """The BNs whose outputs are the four positions (all exact)."""
    return [features[k].expansion_bn for k in POSITION_BLOCKS] + [features[17].conv[3]]


POSITION_CHANNELS = [144, 192, 576, 320]


class MobileNetV2Backbone(nn.Module):
    """The DeepLabV3+ backbone of OFD's MobileNetV2 student: ``features[0..17]``, no 1280 conv.

    Output stride 16 (8 as an option) by the module's rule. Init as the official backbone:
    convs ``kaiming_normal_`` (fan_in, ReLU gain), BN 1/0. ImageNet weights: a torchvision
    ``mobilenet_v2`` state dict; its ``features.18`` and ``classifier`` keys are ignored.
    """

    IGNORED_KEYS = ("features.18.", "classifier.")

    def __init__(self, output_stride: int = 16):
        super().__init__()
        self.features = nn.Sequential(ConvBNReLU6(3, 32, stride=2), *inverted_residuals(output_stride))
        self.stage_channels = list(POSITION_CHANNELS)
        self.stage_strides = [4, 8, min(16, output_stride), output_stride]
        self.low_channels, self.out_channels, self.output_stride = 24, 320, output_stride
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def stage_bns(self) -> list[nn.BatchNorm2d]:
        return position_bns(self.features)

    def forward_stages(self, x: torch.Tensor, collect: bool = False) -> BackboneOutput:
        return run_positions(self.features, x, collect)


class MobileNetV2(FeatureModel):
    """ImageNet MobileNetV2 classifier (3.50M parameters with 1000 classes), torchvision layout.

    Stages: the four positions of the module docstring (144/192/576/320 channels at strides
    4/8/16/32); ``stage_bns`` are exact. ``embedding="pooled"``: the pooled 1280 vector before the
    dropout and ``classifier.1``; ``"map"``: the post-ReLU6 ``features.18`` map (B, 1280, H/32, W/32).
    ``extra["block"]``: ReLU6 of positions 1-3 and position 4 itself. Init as torchvision: convs
    kaiming normal (fan_out), BN 1/0, linear N(0, 0.01) with zero bias.
    """

    def __init__(self, num_classes: int = 1000, embedding: str = "pooled"):
        super().__init__()
        self.embedding = check_embedding(embedding)
        self.features = nn.Sequential(ConvBNReLU6(3, 32, stride=2), *inverted_residuals(32),
                                      ConvBNReLU6(320, LAST_CHANNEL, kernel=1))
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(LAST_CHANNEL, num_classes))
        self.stage_channels = list(POSITION_CHANNELS)
        self.stage_strides = [4, 8, 16, 32]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def stage_bns(self) -> list[nn.Module | None]:
        return position_bns(self.features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))

    def forward_features(self, x: torch.Tensor) -> Features:
        out = run_positions(self.features, x, collect=True)
        fmap = self.features[18](out.high)
        pooled = fmap.mean(dim=(2, 3))
        return Features(logits=self.classifier(pooled), stages=out.stages,
                        embedding=pooled if self.embedding == "pooled" else fmap, extra={"block": out.block})


@MODELS.register("mobilenetv2")
def mobilenetv2(num_classes: int = 1000, embedding: str = "pooled") -> MobileNetV2:
    """MobileNetV2 width 1.0 (torchvision names; 3,504,872 parameters with 1000 classes)."""
    return MobileNetV2(num_classes, embedding)
