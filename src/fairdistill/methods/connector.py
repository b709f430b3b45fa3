"""OFD's student transform, the connector (§3.3): Conv1x1 + BatchNorm, no ReLU."""
from __future__ import annotations

import math

import torch
from torch import nn

from .kernels import conv1x1_batch_norm

__all__ = ["Connector"]


class Connector(nn.Sequential):
    """OFD's student transform r (§3.3): Conv1x1(C_s -> C_t, no bias) + BatchNorm, no ReLU.

    Initialisation as the official code: conv weights ~ N(0, sqrt(2 / (k*k*C_t))), BN weight 1
    and bias 0. In training mode the pair runs as one folded product
    (:func:`conv1x1_batch_norm`: the same output, gradients and running statistics as the two
    modules); in eval mode it is the plain conv then BN with running statistics.
    """

    def __init__(self, s_channels: int, t_channels: int):
        conv = nn.Conv2d(s_channels, t_channels, kernel_size=1, bias=False)
        bn = nn.BatchNorm2d(t_channels)
        k = conv.kernel_size[0] * conv.kernel_size[1]
        nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (k * t_channels)))
        nn.init.ones_(bn.weight)
        nn.init.zeros_(bn.bias)
        super().__init__(conv, bn)

    @property
    def folds(self) -> bool:
        """Whether forward takes the folded training path (BN in training mode, plain BatchNorm2d)."""
        bn = self[1]
        return bn.training and type(bn) is nn.BatchNorm2d and bn.affine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.folds and x.dim() == 4:
            return conv1x1_batch_norm(x, self[0].weight, self[1])
        return super().forward(x)
