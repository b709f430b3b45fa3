"""MobileNet v1 (Howard et al. 2017), OFD's ImageNet student (4.23M parameters, 1000 classes).

Layout of OFD's ImageNet code (reference/ofd.md §1.4): ``model`` is a Sequential of one strided
conv_bn stem and 13 conv_dw blocks (depthwise 3x3-BN-ReLU, pointwise 1x1-BN-ReLU), then average
pooling and ``fc``. The stages are the pointwise-BN outputs, before the block's last ReLU, of
``model[3]`` (128 ch), ``model[5]`` (256), ``model[11]`` (512) and ``model[13]`` (1024).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import MODELS, FeatureModel, Features, kaiming_init

# (input channels, output channels, stride) of the 13 conv_dw blocks, model[1]..model[13].
CONV_DW = [
    (32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2),
    (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1),
    (512, 1024, 2), (1024, 1024, 1),
]
STAGE_BLOCKS = (3, 5, 11, 13)


def conv_bn(inp: int, out: int, stride: int) -> nn.Sequential:
    """3x3 conv-BN-ReLU stem."""
    return nn.Sequential(nn.Conv2d(inp, out, 3, stride, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True))


def conv_dw(inp: int, out: int, stride: int) -> nn.Sequential:
    """Depthwise-separable block: depthwise 3x3-BN-ReLU then pointwise 1x1-BN-ReLU."""
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False), nn.BatchNorm2d(inp), nn.ReLU(inplace=True),
        nn.Conv2d(inp, out, 1, 1, 0, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True),
    )


class MobileNetV1(FeatureModel):
    """MobileNet v1 with OFD's four pre-ReLU positions; ``stage_bns`` are exact.

    The pooling is adaptive (OFD's fixed ``AvgPool2d(7)`` gives the same result at 224 px and
    also works on smaller inputs). Convs get kaiming fan_out init, BNs weight 1 and bias 0.
    Embedding: the pooled 1024 vector. ``extra["block"]``: post-ReLU outputs of the stage blocks.
    """

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.model = nn.Sequential(conv_bn(3, 32, 2), *[conv_dw(i, o, s) for i, o, s in CONV_DW])
        self.fc = nn.Linear(1024, num_classes)
        self.stage_channels = [CONV_DW[k - 1][1] for k in STAGE_BLOCKS]
        kaiming_init(self)

    def stage_bns(self) -> list[nn.Module | None]:
        return [self.model[k][4] for k in STAGE_BLOCKS]

    def forward_features(self, x: torch.Tensor) -> Features:
        stages, block = [], []
        for k, layer in enumerate(self.model):
            if k in STAGE_BLOCKS:
                pre = layer[:-1](x)
                x = F.relu(pre)  # the block's last ReLU, not in place: ``pre`` is returned
                stages.append(pre)
                block.append(x)
            else:
                x = layer(x)
        pooled = x.mean(dim=(2, 3))
        return Features(logits=self.fc(pooled), stages=stages, embedding=pooled, extra={"block": block})


@MODELS.register("mobilenet_v1")
def mobilenet_v1(num_classes: int = 1000) -> MobileNetV1:
    """MobileNet v1, the OFD ImageNet student (ResNet50 -> MobileNet, reference/ofd.md §1.8)."""
    return MobileNetV1(num_classes)
