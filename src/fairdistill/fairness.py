"""Group fairness of a classifier: per-(group, class) accuracy, DEO_A and DEO_M.

Following the MFD paper (Jung et al., CVPR 2021, Sec. 5; reference/mfd.md Sec. 4):
acc[g, c] is the accuracy on test items of group g and class c (the true-positive rate of
"c vs rest" within group g); gap_c = max_g acc[g, c] - min_g acc[g, c];
DEO_A = mean_c gap_c and DEO_M = max_c gap_c. Values are fractions in [0, 1].
Groups with no item of class c are left out of gap_c; a class seen in fewer than two groups
has no gap and is left out of DEO_A and DEO_M (both are NaN when no class has a gap).
"""
from __future__ import annotations

import torch


def cell_counts(pred: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, num_classes: int, num_groups: int):
    """(correct, total): int64 tensors of shape (num_groups, num_classes), on the inputs' device.

    Counts add up over batches and processes, so evaluation can stream and all-reduce them.
    """
    cell = groups.long() * num_classes + labels.long()
    n = num_groups * num_classes
    total = torch.bincount(cell, minlength=n)
    correct = torch.bincount(cell, weights=(pred == labels).to(torch.float64), minlength=n).round().long()
    return correct.view(num_groups, num_classes), total.view(num_groups, num_classes)


def metrics_from_counts(correct: torch.Tensor, total: torch.Tensor) -> dict:
    """Accuracy, DEO_A, DEO_M and the cell accuracies from per-(group, class) counts."""
    correct, total = correct.double().cpu(), total.double().cpu()
    present = total > 0
    cell_acc = torch.where(present, correct / total.clamp(min=1), torch.full_like(total, float("nan")))
    hi = torch.where(present, cell_acc, torch.full_like(cell_acc, -1.0)).max(dim=0).values
    lo = torch.where(present, cell_acc, torch.full_like(cell_acc, 2.0)).min(dim=0).values
    has_gap = present.sum(dim=0) >= 2
    gaps = (hi - lo)[has_gap]
    nan = float("nan")
    return {
        "accuracy": (correct.sum() / total.sum()).item() if total.sum() > 0 else nan,
        "deo_a": gaps.mean().item() if gaps.numel() else nan,
        "deo_m": gaps.max().item() if gaps.numel() else nan,
        "cell_accuracy": cell_acc.tolist(),
    }


def group_metrics(pred, labels, groups, num_classes: int, num_groups: int) -> dict:
    """Accuracy, DEO_A, DEO_M (fractions) and ``cell_accuracy`` (groups x classes lists)."""
    pred, labels, groups = (torch.as_tensor(t).reshape(-1) for t in (pred, labels, groups))
    return metrics_from_counts(*cell_counts(pred, labels, groups, num_classes, num_groups))
