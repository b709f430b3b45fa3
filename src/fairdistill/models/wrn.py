"""Wide residual networks WRN-d-k (Zagoruyko & Komodakis, BMVC 2016), pre-activation.

The layout is the one OFD's CIFAR-100 code uses (teacher WRN28-4; students WRN16-4, WRN28-2,
WRN16-2), with its module names, so its checkpoints load with ``load_state_dict``:
``conv1``, groups ``block1..block3`` holding units ``layer.<i>`` (``bn1, conv1, bn2, conv2`` and
``convShortcut`` where the width changes), final ``bn1`` and ``fc``.

Distillation positions (OFD, reference/ofd.md §1.4): a pre-activation network has no ReLU at the
end of a group, so the pre-ReLU feature of group i is the *next* BatchNorm applied to the group
output: ``block2.layer[0].bn1``, ``block3.layer[0].bn1`` and the final ``bn1``. These BNs are
computed once, in the normal forward pass, and their outputs are the stage features, so
``stage_bns`` is exact: in train mode each stage feature has per-channel batch mean beta and
std |gamma|.

``official_bn_updates=True`` reproduces a side effect of the official ``extract_feature``
(CIFAR-100/models/WideResNet.py; reference/ofd.md gotcha G12): it runs the normal forward and
then applies those three BNs a second time to the group outputs, so in training mode their
running statistics take two momentum updates per step with the same batch statistics
(``r <- (1 - m)^2 r + (1 - (1 - m)^2) s``, an effective momentum of 0.19 for m = 0.1).
Here ``forward_features`` then re-runs the three BNs on the same inputs without autograd (the
outputs are identical in training mode, so features, losses and gradients do not change);
``forward`` (plain training, evaluation) updates each BN once, as the official ``forward``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..registry import check_number
from .base import MODELS, FeatureModel, Features, kaiming_init


def update_bn_again(calls) -> None:
    """Run each ``(bn, fn)`` again: ``fn()`` without autograd, when ``bn`` (the last BN of the
    expression) is in training mode. The output is discarded; what remains is one more momentum
    update of the running statistics of every BN ``fn`` applies (the official OFD code's
    ``extract_feature``; see the module docstring)."""
    with torch.no_grad():
        for bn, fn in calls:
            if bn.training and bn.track_running_stats:
                fn()


class WideBasic(nn.Module):
    """Pre-activation unit: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3, plus a shortcut.

    When the width changes, the shortcut is a 1x1 conv (stride ``stride``) of the *activated*
    input ReLU(bn1(x)); otherwise it is the raw input x.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.dropout = dropout
        # Named as in the official code so that its checkpoints load.
        self.convShortcut = (
            nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False) if in_planes != out_planes else None
        )

    def entry(self, x: torch.Tensor) -> torch.Tensor:
        """The pre-ReLU value the unit starts from: bn1(x)."""
        return self.bn1(x)

    def forward(self, x: torch.Tensor, entry: torch.Tensor | None = None) -> torch.Tensor:
        """``entry`` = bn1(x) when the caller already computed it (the network does, once)."""
        a = F.relu(self.entry(x) if entry is None else entry)
        out = F.relu(self.bn2(self.conv1(a)))
        out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        return out + (x if self.convShortcut is None else self.convShortcut(a))


class WideGroup(nn.Module):
    """``n`` units at one width; the first one changes width and stride."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, dropout: float):
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WideBasic(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, dropout)
                for i in range(n)
            ]
        )

    def forward(self, x: torch.Tensor, entry: torch.Tensor | None = None) -> torch.Tensor:
        """Group output (the residual stream); ``entry`` is handed to the first unit."""
        out = self.layer[0](x, entry)
        for unit in self.layer[1:]:
            out = unit(out)
        return out


class WideResNet(FeatureModel):
    """WRN-depth-k for 32x32 inputs (any size works: pooling is global).

    Features: stages = [block2.layer[0].bn1(g1), block3.layer[0].bn1(g2), bn1(g3)], channels
    [16k, 32k, 64k]; embedding = globally pooled ReLU(bn1(g3)) (64k); extra["block"] = the group
    outputs g1, g2, g3 (the residual stream, OFD Table 1's "block" position, AT's position).
    ``official_bn_updates``: see the module docstring.
    """

    def __init__(self, depth: int, widen_factor: int, num_classes: int, dropout: float = 0.0, in_channels: int = 3,
                 official_bn_updates: bool = False):
        super().__init__()
        self.official_bn_updates = official_bn_updates
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.block1 = WideGroup(n, widths[0], widths[1], 1, dropout)
        self.block2 = WideGroup(n, widths[1], widths[2], 2, dropout)
        self.block3 = WideGroup(n, widths[2], widths[3], 2, dropout)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        self.stage_channels = widths[1:]
        kaiming_init(self)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits; every BN updates its running statistics once (the official ``forward``)."""
        return self._features(x).logits

    def forward_features(self, x: torch.Tensor) -> Features:
        feats = self._features(x)
        if self.official_bn_updates:
            g1, g2, g3 = feats.extra["block"]
            bn_a, bn_b = self.block2.layer[0].bn1, self.block3.layer[0].bn1
            update_bn_again([(bn_a, lambda: bn_a(g1)), (bn_b, lambda: bn_b(g2)), (self.bn1, lambda: self.bn1(g3))])
        return feats

    def _features(self, x: torch.Tensor) -> Features:
        g1 = self.block1(self.conv1(x))
        p1 = self.block2.layer[0].entry(g1)
        g2 = self.block2(g1, p1)
        p2 = self.block3.layer[0].entry(g2)
        g3 = self.block3(g2, p2)
        p3 = self.bn1(g3)
        embedding = F.relu(p3).mean(dim=(2, 3))
        return Features(
            logits=self.fc(embedding), stages=[p1, p2, p3], embedding=embedding, extra={"block": [g1, g2, g3]}
        )

    def stage_bns(self) -> list[nn.Module | None]:
        """Exact: each stage feature is the output of this BN."""
        return [self.block2.layer[0].bn1, self.block3.layer[0].bn1, self.bn1]


def _check(depth, widen_factor, dropout, in_channels, num_classes, official_bn_updates=False) -> None:
    check_number(depth, "wrn.depth", integer=True, ge=10)
    if (depth - 4) % 6:
        raise ConfigError(f"wrn: option depth={depth!r} is invalid; expected 6n+4 with n >= 1 (10, 16, 22, 28, 40).")
    check_number(widen_factor, "wrn.widen_factor", integer=True, ge=1)
    check_number(dropout, "wrn.dropout", ge=0, lt=1)
    if not isinstance(official_bn_updates, bool):
        raise ConfigError(f"wrn.official_bn_updates: expected true or false, got {official_bn_updates!r}")
    for name, v in (("in_channels", in_channels), ("num_classes", num_classes)):
        check_number(v, f"wrn.{name}", integer=True, ge=1)


@MODELS.register("wrn")
def wrn(
    num_classes: int, depth: int = 28, widen_factor: int = 4, dropout: float = 0.0, in_channels: int = 3,
    official_bn_updates: bool = False,
) -> WideResNet:
    """WRN-depth-widen_factor; ``dropout`` between the two convs of a unit (0 in OFD);
    ``official_bn_updates``: the official OFD code's second BN update per step (module docstring)."""
    _check(depth, widen_factor, dropout, in_channels, num_classes, official_bn_updates)
    return WideResNet(depth, widen_factor, num_classes, float(dropout), in_channels, official_bn_updates)


def _preset(depth: int, widen_factor: int):
    def build(num_classes: int, dropout: float = 0.0, in_channels: int = 3,
              official_bn_updates: bool = False) -> WideResNet:
        return wrn(num_classes, depth=depth, widen_factor=widen_factor, dropout=dropout, in_channels=in_channels,
                   official_bn_updates=official_bn_updates)

    build.__doc__ = f"WRN-{depth}-{widen_factor}."
    return build


for _depth, _k in ((16, 2), (16, 4), (28, 2), (28, 4), (40, 2)):
    MODELS.register(f"wrn-{_depth}-{_k}", _preset(_depth, _k))
