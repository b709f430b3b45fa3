"""PyramidNet (Han, Kim & Kim, "Deep Pyramidal Residual Networks", CVPR 2017) for CIFAR.

Design of the paper (and of the model OFD uses: PyramidNet-200, alpha 240, bottleneck, teacher;
PyramidNet-110, alpha 84, basic, student):
- widths grow additively: every block adds alpha / (3n) channels (Eq. 3); the running width is
  accumulated in floating point and rounded per block, as the authors' code does;
- shortcuts are identities, 2x2 average-pooled (ceil mode) where the block downsamples, and
  zero-padded to the block's width;
- blocks: BN-conv-BN-ReLU-conv-BN (basic) or BN-conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1-BN with
  4x expansion (bottleneck); no ReLU after the first BN, none at the end of a block;
- stem conv3x3-16 + BN (no ReLU); BN-ReLU, global average pooling and a linear head at the end.
Module names follow the authors' code (``conv1, bn1, layer1..3, bn_final, fc``; blocks ``bn1..``).

Distillation positions (OFD, reference/ofd.md §1.4), each the first pre-ReLU BN output after
the stage end, computed once in the normal forward pass:
- bottleneck: layer2[0].bn2(conv1(bn1(g1))), the same at layer3[0], and bn_final(g3);
- basic: layer2[0].bn1(g1), layer3[0].bn1(g2) (no ReLU follows these, as in OFD) and bn_final(g3).
``stage_bns`` returns exactly the BNs that produce these features. (OFD's code returns bn2 for
the basic block, which is not the BN of the feature; gotcha G13. Ours is exact.)

``official_bn_updates=True`` reproduces a side effect of the official ``extract_feature``
(CIFAR-100/models/PyramidNet.py; reference/ofd.md gotcha G12), which recomputes the three
positions after the normal forward: in training mode the BNs on the way take a second momentum
update per step with the same batch statistics: layer2[0].bn1 and bn2, layer3[0].bn1 and bn2
and bn_final (bottleneck), layer2[0].bn1, layer3[0].bn1 and bn_final (basic). Here
``forward_features`` then re-runs the official expressions on the same inputs without autograd
(features, losses and gradients do not change); ``forward`` updates every BN once, as the
official ``forward`` (see ``models/wrn.py``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..registry import check_number
from .base import MODELS, FeatureModel, Features, kaiming_init
from .wrn import update_bn_again


def _shortcut(x: torch.Tensor, stride: int, channels: int) -> torch.Tensor:
    """Identity shortcut: 2x2 average pooling when downsampling, zero channels appended."""
    if stride != 1:
        x = F.avg_pool2d(x, 2, stride=2, ceil_mode=True)
    return F.pad(x, (0, 0, 0, 0, 0, channels - x.shape[1]))


class PyramidBasic(nn.Module):
    """BN-conv3x3-BN-ReLU-conv3x3-BN plus zero-padded shortcut; entry point bn1(x)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.stride = stride
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)

    @property
    def entry_bn(self) -> nn.BatchNorm2d:
        return self.bn1

    def entry(self, x: torch.Tensor) -> torch.Tensor:
        """OFD's distillation point of this block: bn1(x)."""
        return self.bn1(x)

    def forward(self, x: torch.Tensor, entry: torch.Tensor | None = None) -> torch.Tensor:
        """``entry`` = self.entry(x) when the caller already computed it (the network does, once)."""
        out = self.entry(x) if entry is None else entry
        out = self.bn3(self.conv2(F.relu(self.bn2(self.conv1(out)))))
        return out + _shortcut(x, self.stride, out.shape[1])


class PyramidBottleneck(nn.Module):
    """BN-conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1(4x)-BN plus shortcut; entry point bn2(conv1(bn1(x)))."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.stride = stride
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn4 = nn.BatchNorm2d(planes * 4)

    @property
    def entry_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def entry(self, x: torch.Tensor) -> torch.Tensor:
        """OFD's distillation point of this block: bn2(conv1(bn1(x))), the first BN->ReLU."""
        return self.bn2(self.conv1(self.bn1(x)))

    def forward(self, x: torch.Tensor, entry: torch.Tensor | None = None) -> torch.Tensor:
        """``entry`` = self.entry(x) when the caller already computed it (the network does, once)."""
        out = F.relu(self.entry(x) if entry is None else entry)
        out = F.relu(self.bn3(self.conv2(out)))
        out = self.bn4(self.conv3(out))
        return out + _shortcut(x, self.stride, out.shape[1])


def block_widths(n: int, alpha: float, base: int = 16) -> list[int]:
    """Widths (before expansion) of the 3n blocks: ``base`` + k * alpha / (3n), rounded (Eq. 3).

    The width is accumulated by repeated addition and rounded with Python's ``round``, as the
    authors' code does, so parameter counts match theirs.
    """
    width, widths = float(base), []
    for _ in range(3 * n):
        width += alpha / (3 * n)
        widths.append(int(round(width)))
    return widths


class PyramidGroup(nn.Sequential):
    """The blocks of one stage; ``entry`` (if given) is handed to the first block."""

    def forward(self, x: torch.Tensor, entry: torch.Tensor | None = None) -> torch.Tensor:
        out = self[0](x, entry)
        for block in self[1:]:
            out = block(out)
        return out


class PyramidNet(FeatureModel):
    """PyramidNet-depth with widening factor alpha, for 32x32 inputs (pooling is global).

    Features: stages = the three positions of the module docstring; embedding = pooled
    ReLU(bn_final(g3)); extra["block"] = the stage outputs g1, g2, g3 (the residual stream).
    ``official_bn_updates``: see the module docstring.
    """

    def __init__(self, depth: int, alpha: float, num_classes: int, bottleneck: bool, in_channels: int = 3,
                 official_bn_updates: bool = False):
        super().__init__()
        self.official_bn_updates = official_bn_updates
        block = PyramidBottleneck if bottleneck else PyramidBasic
        n = (depth - 2) // (9 if bottleneck else 6)
        widths = block_widths(n, alpha)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes, stages = 16, []
        for s, stride in enumerate((1, 2, 2)):
            blocks = []
            for i, planes in enumerate(widths[s * n : (s + 1) * n]):
                blocks.append(block(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes * block.expansion
            stages.append(PyramidGroup(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn_final = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)
        self.stage_channels = [bn.num_features for bn in self.stage_bns()]
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits; every BN updates its running statistics once (the official ``forward``)."""
        return self._features(x).logits

    def forward_features(self, x: torch.Tensor) -> Features:
        feats = self._features(x)
        if self.official_bn_updates:
            g1, g2, g3 = feats.extra["block"]
            b2, b3 = self.layer2[0], self.layer3[0]
            # block.entry is the official expression: bn2(conv1(bn1(g))) or bn1(g)
            update_bn_again([(b2.entry_bn, lambda: b2.entry(g1)), (b3.entry_bn, lambda: b3.entry(g2)),
                             (self.bn_final, lambda: self.bn_final(g3))])
        return feats

    def _features(self, x: torch.Tensor) -> Features:
        g1 = self.layer1(self.bn1(self.conv1(x)))
        p1 = self.layer2[0].entry(g1)
        g2 = self.layer2(g1, p1)
        p2 = self.layer3[0].entry(g2)
        g3 = self.layer3(g2, p2)
        p3 = self.bn_final(g3)
        embedding = F.relu(p3).mean(dim=(2, 3))
        return Features(
            logits=self.fc(embedding), stages=[p1, p2, p3], embedding=embedding, extra={"block": [g1, g2, g3]}
        )

    def stage_bns(self) -> list[nn.Module | None]:
        """Exact: each stage feature is the output of this BN."""
        return [self.layer2[0].entry_bn, self.layer3[0].entry_bn, self.bn_final]


@MODELS.register("pyramidnet")
def pyramidnet(
    num_classes: int, depth: int = 110, alpha: float = 84, bottleneck: bool = False, in_channels: int = 3,
    official_bn_updates: bool = False,
) -> PyramidNet:
    """PyramidNet-depth (9n+2 with bottleneck blocks, 6n+2 with basic ones), widening ``alpha``;
    ``official_bn_updates``: the official OFD code's second BN update per step (module docstring)."""
    for name, v, low in (("depth", depth, 8), ("in_channels", in_channels, 1), ("num_classes", num_classes, 1)):
        check_number(v, f"pyramidnet.{name}", integer=True, ge=low)
    for name, flag in (("bottleneck", bottleneck), ("official_bn_updates", official_bn_updates)):
        if not isinstance(flag, bool):
            raise ConfigError(f"pyramidnet.{name}: expected true or false, got {flag!r}")
    alpha = check_number(alpha, "pyramidnet.alpha", ge=0)
    step = 9 if bottleneck else 6
    if (depth - 2) % step:
        kind = "bottleneck" if bottleneck else "basic"
        raise ConfigError(
            f"pyramidnet: option depth={depth} is invalid for {kind} blocks; expected {step}n+2 "
            f"(e.g. {'164, 200, 272' if bottleneck else '110, 164, 200'})."
        )
    return PyramidNet(depth, alpha, num_classes, bottleneck, in_channels, official_bn_updates)


@MODELS.register("pyramidnet-110-84")
def pyramidnet_110_84(num_classes: int, in_channels: int = 3, official_bn_updates: bool = False) -> PyramidNet:
    """PyramidNet-110, alpha 84, basic blocks (OFD setting (f) student)."""
    return pyramidnet(num_classes, depth=110, alpha=84, bottleneck=False, in_channels=in_channels,
                      official_bn_updates=official_bn_updates)


@MODELS.register("pyramidnet-200-240")
def pyramidnet_200_240(num_classes: int, in_channels: int = 3, official_bn_updates: bool = False) -> PyramidNet:
    """PyramidNet-200, alpha 240, bottleneck blocks (OFD settings (e), (f) teacher)."""
    return pyramidnet(num_classes, depth=200, alpha=240, bottleneck=True, in_channels=in_channels,
                      official_bn_updates=official_bn_updates)
