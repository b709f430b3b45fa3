"""Semantic segmentation metrics and their group fairness, from one confusion matrix per group.

Streaming form: ``segmentation_counts`` turns a batch into ``M[g, t, p]``, an int64 tensor of
shape (groups, classes, classes) counting the pixels of images of group g with true class t
predicted as p, with one ``bincount``. Pixels whose target lies outside [0, num_classes) (255 =
void included) are dropped, as the official OFD metric does (reference/dense.md §1.5,
``utils/metrics.py``). Counts add up over batches and processes;
``segmentation_metrics_from_counts`` computes the dict below from the sum.

Metrics (fractions in [0, 1]; TP, FP, FN per class of a confusion matrix):

- ``iou[c]`` = TP / (TP + FP + FN) on the pooled matrix, NaN for a class with an empty union;
  ``miou`` = nanmean over classes, background included (the official mIoU);
  ``pixel_accuracy`` = correct pixels / counted pixels.
- Per group: ``iou_by_group[g][c]``, ``miou_by_group[g]`` (nanmean of the group's IoUs),
  ``miou_gap`` = max_g - min_g of ``miou_by_group``, ``pixel_accuracy_by_group[g]``,
  ``recall_by_group[g][c]`` = TP / (TP + FN) (the pixel accuracy of class c in group g),
  ``cell_count[g][c]`` = ground-truth pixels of class c in group g.
- DEO on pixel recall, the exact analogue of the classification DEO (reference/dense.md §6):
  ``deo_gap[c]`` = max_g - min_g of ``recall_by_group[g][c]``; ``deo_a``/``deo_m`` = mean/max
  over classes. The same on IoU: ``iou_gap[c]``, ``iou_gap_a``/``iou_gap_m``.

Both gaps of class c are taken over the groups whose ground truth has pixels of class c (the same
cells for recall and IoU); the empty [group, class] cells are listed in ``excluded_cells``, and a
class present in fewer than two groups has no gap (NaN) and is left out of the means and maxima.
``include_background`` (default True: every class, as the classification DEO) decides whether
class 0 enters the gaps; False gives the prototype's reading of dense.md §6, where the background
gap is left out (its gap entries are NaN). mIoU always includes it. The dict records the choice as
``gaps_include_background``.
"""
from __future__ import annotations

import torch

from ..errors import DataError
from .common import NAN, check_range, class_gaps, excluded_cells, mean_max, ratio

__all__ = ["segmentation_counts", "segmentation_metrics_from_counts", "segmentation_metrics"]


def _integer(t, what: str) -> torch.Tensor:
    t = torch.as_tensor(t)
    if t.is_floating_point() or t.is_complex():
        raise DataError(f"{what} must hold integer class indices, got dtype {t.dtype} (take argmax of the logits)")
    return t.long()


def segmentation_counts(pred, target, groups, num_classes: int, num_groups: int) -> torch.Tensor:
    """M[g, t, p]: int64 (num_groups, num_classes, num_classes) on the inputs' device.

    ``pred`` and ``target``: integer class maps of the same shape (B, H, W) (any shape whose first
    axis is the image); ``groups``: one group per image, (B,). Pixels with a target outside
    [0, num_classes) are not counted; every prediction must lie in [0, num_classes).
    """
    uint8 = torch.as_tensor(target).dtype == torch.uint8  # then no target is negative
    pred, target, groups = _integer(pred, "pred"), _integer(target, "target"), _integer(groups, "groups").reshape(-1)
    if pred.shape != target.shape or pred.dim() < 1:
        raise DataError(f"pred and target must be class maps of one shape (B, H, W); got {tuple(pred.shape)} "
                        f"and {tuple(target.shape)}")
    if groups.numel() != target.shape[0]:
        raise DataError(f"groups must have one entry per image: {target.shape[0]} images, {groups.numel()} groups")
    check_range(groups, num_groups, "groups", "num_groups")
    if pred.numel():
        lo, hi = torch.aminmax(pred)
        if int(lo) < 0 or int(hi) >= num_classes:
            raise DataError(f"predictions must lie in [0, {num_classes - 1}] (num_classes = {num_classes}) but "
                            f"range over [{int(lo)}, {int(hi)}]; check num_classes against the model's output channels")
    n = num_groups * num_classes * num_classes
    image_base = (groups * (num_classes * num_classes)).view(-1, *([1] * (target.dim() - 1)))
    idx = target * num_classes
    idx += pred
    idx += image_base
    dropped = target >= num_classes
    if not uint8:
        dropped |= target < 0
    idx.masked_fill_(dropped, n)  # one extra bin for the dropped pixels, cut off below
    return torch.bincount(idx.reshape(-1), minlength=n + 1)[:n].view(num_groups, num_classes, num_classes)


def _iou(counts: torch.Tensor) -> torch.Tensor:
    """IoU per class of (..., C, C) confusion matrices (rows true, columns predicted)."""
    tp = torch.diagonal(counts, dim1=-2, dim2=-1)
    return ratio(tp, counts.sum(-1) + counts.sum(-2) - tp)


def _nanmean_rows(x: torch.Tensor) -> torch.Tensor:
    defined = ~torch.isnan(x)
    return ratio(torch.where(defined, x, torch.zeros_like(x)).sum(-1), defined.sum(-1))


def segmentation_metrics_from_counts(counts: torch.Tensor, include_background: bool = True) -> dict:
    """Every metric of the module docstring from M[g, t, p] (``segmentation_counts``, summed).

    ``include_background``: whether class 0 enters ``deo_*`` and ``iou_gap_*`` (module docstring).
    """
    counts = counts.detach().cpu().long()
    pooled = counts.sum(0)
    iou = _iou(pooled)
    iou_g = _iou(counts)
    tp_g = torch.diagonal(counts, dim1=1, dim2=2)
    gt_g = counts.sum(2)
    recall_g = ratio(tp_g, gt_g)
    miou_g = _nanmean_rows(iou_g)
    present = gt_g > 0
    in_gaps = present.clone()
    if not include_background:
        in_gaps[:, 0] = False
    deo_gap, iou_gap = class_gaps(recall_g, in_gaps), class_gaps(iou_g, in_gaps)
    miou_gap = class_gaps(miou_g[:, None], ~torch.isnan(miou_g[:, None]))[0].item()
    total = int(pooled.sum())
    out = {
        "miou": _nanmean_rows(iou).item(),
        "pixel_accuracy": int(pooled.trace()) / total if total else NAN,
        "iou": iou.tolist(),
        "miou_by_group": miou_g.tolist(),
        "miou_gap": miou_gap,
        "pixel_accuracy_by_group": ratio(tp_g.sum(1), gt_g.sum(1)).tolist(),
        "iou_by_group": iou_g.tolist(),
        "recall_by_group": recall_g.tolist(),
        "cell_count": gt_g.tolist(),
        "deo_gap": deo_gap.tolist(),
        "iou_gap": iou_gap.tolist(),
        "excluded_cells": excluded_cells(gt_g),
        "gaps_include_background": bool(include_background),
    }
    out["deo_a"], out["deo_m"] = mean_max(deo_gap)
    out["iou_gap_a"], out["iou_gap_m"] = mean_max(iou_gap)
    return out


def segmentation_metrics(pred, target, groups, num_classes: int, num_groups: int,
                         include_background: bool = True) -> dict:
    """All segmentation metrics of one set of class maps (module docstring)."""
    counts = segmentation_counts(pred, target, groups, num_classes, num_groups)
    return segmentation_metrics_from_counts(counts, include_background)
