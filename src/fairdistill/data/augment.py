"""Batch augmentation on the training device: reflect-pad + random crop, random horizontal flip.

The random parameters are drawn on the CPU from a given ``torch.Generator`` (so they are the
same on every device and reproducible); the transform itself is one gather on the batch's
device. This is OFD's CIFAR recipe (``Pad(4, reflect)``, ``RandomCrop(32)``,
``RandomHorizontalFlip``; reference ``ofd.md``), with the crop taken before the flip (the same
distribution, since crop offsets are symmetric).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def draw_params(n: int, padding: int, flip: bool, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU parameters for ``n`` images: crop offsets (n, 2) as (top, left) in ``0..2*padding``,
    and flips (n,) bool, each True with probability 1/2 when ``flip`` (else all False).

    Both are always drawn (offsets all 0 when ``padding == 0``) so that the generator advances
    the same way whatever the options.
    """
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    return offsets, flips & flip


def crop_flip(x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, padding: int) -> torch.Tensor:
    """Reflect-pad ``x`` (B, C, H, W) by ``padding``, crop each image back to H x W at its
    ``offsets`` (top, left) and mirror it left-right where ``flips`` is True."""
    b, _, h, w = x.shape
    device = x.device
    offsets, flips = offsets.to(device), flips.to(device)
    if padding > 0:
        x = F.pad(x, (padding, padding, padding, padding), mode="reflect")
    rows = offsets[:, :1] + torch.arange(h, device=device)  # (B, H)
    cols = torch.arange(w, device=device).expand(b, w)
    cols = torch.where(flips[:, None], cols.flip(1), cols) + offsets[:, 1:]  # (B, W)
    batch = torch.arange(b, device=device)[:, None, None]
    # advanced indices (B,1,1), (B,H,1), (B,1,W) around the channel slice give (B, H, W, C)
    return x[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()
