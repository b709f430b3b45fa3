"""The feature contract every zoo model honours (DESIGN.md, contract 2)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import FairdistillError
from ..registry import Registry

MODELS: Registry = Registry("model")
"""Model builders: ``builder(num_classes=..., **options) -> FeatureModel``."""
NUM_CLASSES = {"num_classes": "data.name (the data set fixes the number of classes)"}
"""The builder argument a config's ``model.options`` may not set, with the key to use instead."""


@dataclass
class Features:
    """What one forward pass exposes to distillation terms.

    logits:    the model's output, identical to ``model(x)``: (B, num_classes) for
               classification, (B, num_classes, H, W) for segmentation, (loc, conf) for detection.
    stages:    the pre-ReLU feature at the end of each stage, shallow to deep (OFD positions).
    embedding: the penultimate representation, shape (B, ...); methods flatten it as needed.
    extra:     model-specific named tensors (e.g. ``"block"`` post-activation stage outputs).
    """

    logits: Any
    stages: list[torch.Tensor]
    embedding: torch.Tensor
    extra: dict[str, list[torch.Tensor] | torch.Tensor] = field(default_factory=dict)


class FeatureNotComputed(FairdistillError):
    """A term read a feature that the forward pass did not compute (see :class:`OutputsOnly`)."""


class OutputsOnly:
    """The features of a plain ``model(x)`` call: only ``logits`` exists.

    The trainer hands this to the terms of a stage in which no term sets ``needs_features``;
    reading ``stages``, ``embedding`` or ``extra`` raises :class:`FeatureNotComputed` instead of
    silently handing over the wrong tensor.
    """

    __slots__ = ("logits",)

    def __init__(self, logits):
        self.logits = logits

    def _missing(self, name: str):
        raise FeatureNotComputed(f"Features.{name} was read, but only the model's outputs were computed: "
                                 "the term must set needs_features = True")

    stages = property(lambda self: self._missing("stages"))
    embedding = property(lambda self: self._missing("embedding"))
    extra = property(lambda self: self._missing("extra"))


class FeatureModel(nn.Module):
    """A classifier that can also return its distillation points.

    Subclasses set ``stage_channels`` (channels of each ``Features.stages`` entry) and
    implement ``forward_features``; ``forward`` returns its logits. ``stage_bns`` returns, per
    stage, the BatchNorm whose output is the stage feature (so its affine parameters give the
    OFD margin), or None where no BatchNorm precedes that ReLU.
    """

    stage_channels: list[int]

    def forward_features(self, x: torch.Tensor) -> Features:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).logits

    def stage_bns(self) -> list[nn.Module | None]:
        return [None] * len(self.stage_channels)


def kaiming_init(model: nn.Module) -> None:
    """He et al.'s initialisation as torchvision's ResNets: convolutions ~ kaiming normal
    (fan_out, ReLU gain), BatchNorm weight 1 and bias 0; other layers keep PyTorch's defaults."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not) of ``model``."""
    return sum(p.numel() for p in model.parameters())
