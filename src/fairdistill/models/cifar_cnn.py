"""The six-conv CNN MFD uses on CIFAR-10S (Jung et al., CVPR 2021, supplement §1.1).

Three blocks of [conv3x3 -> ReLU -> conv3x3 -> ReLU -> maxpool 2 -> dropout 0.25] with 32, 64 and
128 channels (padding 1), then fc 128*(s/8)^2 -> 256 + ReLU and a linear head (no BatchNorm,
PyTorch's default initialisation). Module names follow MFD's code (``conv1..conv6, fc1, last``).

Features: stages = pre-ReLU outputs of conv2, conv4, conv6 (no BN precedes these ReLUs, so
``stage_bns`` is [None] * 3); embedding = ReLU(fc1), the 256-d feature MFD distils;
extra["block"] = ReLU of conv2, conv4, conv6.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..registry import check_number
from .base import MODELS, FeatureModel, Features


class OrderedDropout(nn.Dropout):
    """``nn.Dropout`` whose mask follows the tensor's logical (N, C, H, W) order in every memory
    layout: a channels-last input drops the same units as its NCHW copy (``nn.Dropout`` draws
    in memory order). A contiguous input takes ``F.dropout`` itself (the same draws)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.is_contiguous() or self.p == 1:
            return super().forward(x)
        keep = 1.0 - self.p
        return x * torch.empty(x.shape, dtype=x.dtype, device=x.device).bernoulli_(keep).div_(keep)


class MFDCNN(FeatureModel):
    """The CIFAR-10S CNN for ``image_size`` x ``image_size`` inputs (``image_size`` divisible by 8)."""

    def __init__(self, num_classes: int, image_size: int = 32, in_channels: int = 3, dropout: float = 0.25):
        super().__init__()
        self.image_size = image_size
        widths = [in_channels, 32, 32, 64, 64, 128, 128]
        for i in range(6):
            setattr(self, f"conv{i + 1}", nn.Conv2d(widths[i], widths[i + 1], 3, padding=1))
        self.drop = OrderedDropout(dropout)  # the same units in both layouts (channels_last: auto)
        self.fc1 = nn.Linear(128 * (image_size // 8) ** 2, 256)
        self.last = nn.Linear(256, num_classes)
        self.stage_channels = [32, 64, 128]

    def forward_features(self, x: torch.Tensor) -> Features:
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise ConfigError(
                f"mfd-cnn was built for {self.image_size}x{self.image_size} images (option image_size) "
                f"but got {x.shape[-2]}x{x.shape[-1]}; set the model option image_size to the data's size."
            )
        convs = [self.conv1, self.conv2, self.conv3, self.conv4, self.conv5, self.conv6]
        h, stages, block = x, [], []
        for i in range(3):
            pre = convs[2 * i + 1](F.relu(convs[2 * i](h)))
            act = F.relu(pre)
            stages.append(pre)
            block.append(act)
            h = self.drop(F.max_pool2d(act, 2))
        embedding = F.relu(self.fc1(h.flatten(1)))
        return Features(
            logits=self.last(embedding),
            stages=stages,
            embedding=embedding,
            extra={"block": block},
        )


@MODELS.register("mfd-cnn")
def mfd_cnn(num_classes: int, image_size: int = 32, in_channels: int = 3, dropout: float = 0.25) -> MFDCNN:
    """MFD's CIFAR-10S CNN; ``dropout`` is the rate after each block (0.25 in MFD's code)."""
    dropout = check_number(dropout, "mfd-cnn.dropout", ge=0, lt=1)
    for name, v in (("image_size", image_size), ("in_channels", in_channels), ("num_classes", num_classes)):
        check_number(v, f"mfd-cnn.{name}", integer=True, ge=1)
    if image_size % 8:
        raise ConfigError(
            f"mfd-cnn: option image_size={image_size} is invalid; expected a multiple of 8 "
            "(three 2x2 max-poolings), e.g. 32."
        )
    return MFDCNN(num_classes, image_size, in_channels, float(dropout))
