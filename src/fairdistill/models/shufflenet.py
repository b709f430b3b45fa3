"""ShuffleNetV2 x1.0 (Ma et al. 2018), MFD's CelebA model, with torchvision's parameter names.

Units end with concat + channel shuffle, so a stage output has no BatchNorm of its own. The
pre-ReLU stage feature used here is the stage output with the last unit's final ReLU(s) left
out: ``shuffle(cat(x1, branch2[:-1](x2)))`` for a stride-1 unit. Applying ReLU to it gives the
ordinary stage output exactly, since the passed-through half ``x1`` is itself a ReLU output.
Half of its channels come from a BN and half are passed through, so its ``stage_bns`` is None.
The fourth stage is conv5's BN output before its ReLU (exact BN).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import MODELS, FeatureModel, Features
from .resnet_imagenet import check_embedding


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave ``groups`` channel groups (ShuffleNet, Zhang et al. 2018, Fig. 1)."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


def depthwise(channels: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=False)


class InvertedResidual(nn.Module):
    """ShuffleNetV2 unit: split (stride 1) or duplicate (stride 2), two branches, concat, shuffle."""

    def __init__(self, inp: int, out: int, stride: int):
        super().__init__()
        self.stride = stride
        half = out // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                depthwise(inp, stride), nn.BatchNorm2d(inp),
                nn.Conv2d(inp, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
            )
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            nn.Conv2d(inp if stride > 1 else half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
            depthwise(half, stride), nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
        )

    def forward_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pre, out): the unit output without / with the branches' final ReLU."""
        if self.stride == 1:
            left, right = x.chunk(2, dim=1)
        else:
            left, right = self.branch1[:-1](x), x
        right = self.branch2[:-1](right)
        pre = channel_shuffle(torch.cat([left, right], dim=1), 2)
        if self.stride > 1:
            left = F.relu(left)
        out = channel_shuffle(torch.cat([left, F.relu(right)], dim=1), 2)
        return pre, out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            left, right = x.chunk(2, dim=1)
            out = torch.cat([left, self.branch2(right)], dim=1)
        else:
            out = torch.cat([self.branch1(x), self.branch2(x)], dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(FeatureModel):
    """ShuffleNetV2 with torchvision's layout, names and (PyTorch default) initialisation.

    Stages: the pre-ReLU outputs of stage2, stage3, stage4 (see the module docstring; BN None)
    and conv5's BN output (BN ``conv5[1]``, exact). ``embedding="map"`` (default): the post-ReLU
    conv5 map before the spatial mean, MFD's CelebA feature (1024x6x6 at 176 px,
    reference/mfd.md §1.1); ``"pooled"``: its spatial mean. ``extra["block"]``: the post-ReLU
    outputs of stage2, stage3, stage4 and conv5.
    """

    def __init__(self, repeats: list[int], channels: list[int], num_classes: int = 1000, embedding: str = "map"):
        super().__init__()
        self.embedding = check_embedding(embedding)
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, channels[0], 3, 2, 1, bias=False), nn.BatchNorm2d(channels[0]), nn.ReLU(inplace=True)
        )
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inp = channels[0]
        for k, (n, out) in enumerate(zip(repeats, channels[1:4]), start=2):
            units = [InvertedResidual(inp, out, 2)] + [InvertedResidual(out, out, 1) for _ in range(n - 1)]
            setattr(self, f"stage{k}", nn.Sequential(*units))
            inp = out
        self.conv5 = nn.Sequential(
            nn.Conv2d(inp, channels[-1], 1, bias=False), nn.BatchNorm2d(channels[-1]), nn.ReLU(inplace=True)
        )
        self.fc = nn.Linear(channels[-1], num_classes)
        self.stage_channels = list(channels[1:])

    def stage_bns(self) -> list[nn.Module | None]:
        return [None, None, None, self.conv5[1]]

    def forward_features(self, x: torch.Tensor) -> Features:
        x = self.maxpool(self.conv1(x))
        stages, block = [], []
        for stage in (self.stage2, self.stage3, self.stage4):
            x = stage[:-1](x)
            pre, x = stage[-1].forward_pre(x)
            stages.append(pre)
            block.append(x)
        pre = self.conv5[:-1](x)
        fmap = F.relu(pre)
        stages.append(pre)
        block.append(fmap)
        pooled = fmap.mean(dim=(2, 3))
        embedding = fmap if self.embedding == "map" else pooled
        return Features(logits=self.fc(pooled), stages=stages, embedding=embedding, extra={"block": block})


@MODELS.register("shufflenet_v2_x1_0")
def shufflenet_v2_x1_0(num_classes: int = 1000, embedding: str = "map") -> ShuffleNetV2:
    """ShuffleNetV2 x1.0 (2.28M parameters with 1000 classes), MFD's CelebA model."""
    return ShuffleNetV2([4, 8, 4], [24, 116, 232, 464, 1024], num_classes, embedding)
