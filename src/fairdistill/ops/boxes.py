"""Axis-aligned boxes as (x1, y1, x2, y2) in continuous coordinates (x2 > x1, y2 > y1).

Areas are ``(x2 - x1) * (y2 - y1)`` with no ``+1``: the convention of ssd.pytorch's VOC
evaluation after its ``-1`` shift of the 1-based inclusive XML coordinates (reference dense.md §4).
"""
from __future__ import annotations

import torch


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Area of each box of ``boxes`` (..., 4); degenerate boxes have area 0."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Intersection over union of every pair: (N, 4) x (M, 4) -> (N, M).

    IoU = |a ∩ b| / (|a| + |b| - |a ∩ b|); a pair whose union is empty gets 0.
    """
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(inter.dtype).tiny), torch.zeros_like(inter))
