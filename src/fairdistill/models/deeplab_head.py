"""The DeepLabV3+ head (Chen et al. 2018): atrous spatial pyramid pooling and the decoder.

Structure and parameter names are those of the official code (OFD's Segmentation/, from
pytorch-deeplab-xception; reference/dense.md §1.1), so its state dicts load into these modules:

- ``ASPP``: branches ``aspp1`` (1x1) and ``aspp2..4`` (3x3, dilation = rate), each conv (no bias)
  - BN - ReLU (``atrous_conv``, ``bn``); image pooling ``global_avg_pool`` = [global average pool,
  1x1 conv, BN, ReLU], broadcast back to the map (bilinear upsampling of a 1x1 map with
  align_corners=True is a broadcast); concat -> ``conv1`` 1x1 -> ``bn1`` -> ReLU -> Dropout(0.5).
- ``Decoder``: low-level feature -> ``conv1`` 1x1 to 48 -> ``bn1`` -> ReLU; concat of the ASPP
  output upsampled bilinearly (align_corners=True) to the low-level size with it -> ``last_conv`` =
  [0 conv3x3, 1 BN, 2 ReLU, 3 Dropout(0.5), 4 conv3x3, 5 BN, 6 ReLU, 7 Dropout(0.1), 8 conv1x1 to
  the classes (with bias)].

Init as the official code: conv weights ``kaiming_normal_`` (fan_in, ReLU gain), BN 1/0; the
classifier's bias keeps PyTorch's default. ReLUs are out of place, so the pre-ReLU BN outputs
(OFD positions 5 and 6: ``aspp.bn1`` and ``decoder.last_conv[5]``) are never overwritten.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ASPP_RATES = {16: (1, 6, 12, 18), 8: (1, 12, 24, 36)}
"""output stride -> ASPP rates of the official code (the first is the 1x1 branch)."""


def head_init(module: nn.Module) -> None:
    """The official ASPP/decoder init: convs kaiming normal (fan_in), BN weight 1 and bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def upsample(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Bilinear resize with align_corners=True, DeepLab's interpolation everywhere."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


class ASPPBranch(nn.Module):
    """conv (1x1 at rate 1, else 3x3 with dilation = padding = rate) - BN - ReLU."""

    def __init__(self, inp: int, out: int, rate: int):
        super().__init__()
        kernel, pad = (1, 0) if rate == 1 else (3, rate)
        self.atrous_conv = nn.Conv2d(inp, out, kernel, padding=pad, dilation=rate, bias=False)
        self.bn = nn.BatchNorm2d(out)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.atrous_conv(x)))


class ASPP(nn.Module):
    """Four rate branches + image pooling, ``channels`` each; 1x1 projection, BN, ReLU, dropout.

    ``rates``: 4 rates, the first 1 (the 1x1 branch). ``dropout``: the rate after the projection
    (0.5 officially; 0 makes it an identity).
    """

    def __init__(self, inp: int, channels: int = 256, rates: tuple[int, ...] = ASPP_RATES[16],
                 dropout: float = 0.5):
        super().__init__()
        if len(rates) != 4 or rates[0] != 1:
            raise ValueError(f"ASPP needs 4 rates starting with 1, got {rates}")
        self.rates = tuple(rates)
        for k, rate in enumerate(rates, start=1):
            setattr(self, f"aspp{k}", ASPPBranch(inp, channels, rate))
        self.global_avg_pool = nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), nn.Conv2d(inp, channels, 1, bias=False),
                                             nn.BatchNorm2d(channels), nn.ReLU())
        self.conv1 = nn.Conv2d(5 * channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        head_init(self)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(``bn1`` output = OFD position 5, its ReLU), without the dropout."""
        h, w = x.shape[-2:]
        branches = [self.aspp1(x), self.aspp2(x), self.aspp3(x), self.aspp4(x),
                    self.global_avg_pool(x).expand(-1, -1, h, w)]
        pre = self.bn1(self.conv1(torch.cat(branches, dim=1)))
        return pre, self.relu(pre)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.project(x)[1])


class Decoder(nn.Module):
    """DeepLabV3+ decoder; ``forward`` returns (``last_conv[5]`` output = OFD position 6, its ReLU
    = the embedding, logits at the low-level resolution)."""

    def __init__(self, low_channels: int, num_classes: int, channels: int = 256, low_proj: int = 48,
                 dropouts: tuple[float, float] = (0.5, 0.1)):
        super().__init__()
        self.conv1 = nn.Conv2d(low_channels, low_proj, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(low_proj)
        self.relu = nn.ReLU()
        self.last_conv = nn.Sequential(
            nn.Conv2d(channels + low_proj, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Dropout(dropouts[0]),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Dropout(dropouts[1]),
            nn.Conv2d(channels, num_classes, 1),
        )
        head_init(self)

    def forward(self, x: torch.Tensor, low: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        low = self.relu(self.bn1(self.conv1(low)))
        h = torch.cat([upsample(x, low.shape[-2:]), low], dim=1)
        for k in range(6):
            h = self.last_conv[k](h)
        pre = h
        emb = self.last_conv[6](pre)
        return pre, emb, self.last_conv[8](self.last_conv[7](emb))
