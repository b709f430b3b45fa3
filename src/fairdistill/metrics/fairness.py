"""Group fairness of a classifier from one confusion matrix per group.

Streaming form: ``classification_counts`` turns a batch into ``N[g, t, p]``, an int64 tensor of
shape (groups, classes, classes) counting the items of group g with true class t predicted as p.
Counts add up over batches and processes (the engine all-reduces them);
``classification_metrics_from_counts`` computes every metric below from the sum.

Metrics (values are fractions in [0, 1]):

- ``accuracy``; ``cell_count[g][c]`` and ``cell_accuracy[g][c]``, the accuracy on the items of
  group g and class c (the true-positive rate of "c vs rest" in group g);
  ``group_accuracy[g]`` and ``worst_group_accuracy`` (min over non-empty groups).
- DEO (MFD paper, Jung et al., CVPR 2021, Sec. 5; reference/mfd.md Sec. 4): per class,
  ``deo_gap[c]`` = max_g - min_g of ``cell_accuracy[g][c]``; ``deo_a``/``deo_m`` = mean/max over
  classes. Equal to fairlearn's ``true_positive_rate`` difference of "pred == c" vs "y == c".
- Demographic parity: ``selection_rate[g][c]`` = P(pred = c | g); ``dp_gap[c]`` = max_g - min_g
  over non-empty groups; ``dp_a``/``dp_m`` = mean/max over classes (fairlearn's
  ``demographic_parity_difference`` with "pred == c" as the prediction).
- Equalized odds, per class c one vs rest: ``eodds_gap[c]`` = the larger of the between-group
  gaps in TPR = P(pred = c | y = c, g) and FPR = P(pred = c | y != c, g) (of the defined ones,
  see below), so ``eodds_gap[c] >= deo_gap[c]``; ``eodds_a``/``eodds_m`` =
  mean/max over classes (fairlearn's ``equalized_odds_difference``).

Empty cells: a group with no item of class c is left out of class c's TPR (and DEO) gap, and a
group with no item outside class c out of its FPR gap; ``excluded_cells`` lists those empty
[group, class] cells. A class whose rate is defined in fewer than two groups has no gap (NaN in
the ``*_gap`` list) and is left out of the means and maxima (NaN when no class has a gap).
(fairlearn instead scores an undefined rate as 0, so the two agree when every cell is non-empty.)
An empty group is left out of every gap and of ``worst_group_accuracy``.
"""
from __future__ import annotations

import torch

from ..errors import DataError
from .common import NAN, as_index, check_range, class_gaps, excluded_cells, mean_max, ratio

__all__ = ["classification_counts", "classification_metrics_from_counts", "group_metrics",
           "cell_counts", "metrics_from_counts"]


def _inputs(pred, labels, groups, num_classes: int, num_groups: int):
    pred, labels, groups = as_index(pred, "predictions"), as_index(labels, "labels"), as_index(groups, "groups")
    if not pred.numel() == labels.numel() == groups.numel():
        raise DataError(f"predictions, labels and groups must have one entry per item; got "
                        f"{pred.numel()}, {labels.numel()} and {groups.numel()}")
    check_range(labels, num_classes, "labels", "num_classes")
    check_range(pred, num_classes, "predictions", "num_classes")
    check_range(groups, num_groups, "groups", "num_groups")
    return pred, labels, groups


def classification_counts(pred, labels, groups, num_classes: int, num_groups: int) -> torch.Tensor:
    """N[g, t, p]: int64 (num_groups, num_classes, num_classes) on the inputs' device.

    ``pred``, ``labels``, ``groups``: one integer per item (any shape, flattened). Sums of these
    tensors over batches and processes are the counts of the union.
    """
    pred, labels, groups = _inputs(pred, labels, groups, num_classes, num_groups)
    idx = (groups * num_classes + labels) * num_classes + pred
    n = num_groups * num_classes * num_classes
    return torch.bincount(idx, minlength=n).view(num_groups, num_classes, num_classes)


def cell_counts(pred, labels, groups, num_classes: int, num_groups: int):
    """(correct, total): int64 tensors of shape (num_groups, num_classes), on the inputs' device.

    The per-cell form of ``classification_counts`` (its diagonal and row sums): enough for
    accuracy, DEO and worst-group accuracy, not for DP or equalized odds. Counts add up.
    """
    pred, labels, groups = _inputs(pred, labels, groups, num_classes, num_groups)
    cell = groups * num_classes + labels
    n = num_groups * num_classes
    total = torch.bincount(cell, minlength=n)
    correct = torch.bincount(cell[pred == labels], minlength=n)
    return correct.view(num_groups, num_classes), total.view(num_groups, num_classes)


def metrics_from_counts(correct: torch.Tensor, total: torch.Tensor) -> dict:
    """Metrics of per-(group, class) counts: accuracy, DEO and worst group (no DP, no eodds).

    Keys: ``accuracy``, ``deo_a``, ``deo_m``, ``deo_gap``, ``cell_accuracy``, ``cell_count``,
    ``group_accuracy``, ``worst_group_accuracy``, ``excluded_cells`` (module docstring).
    """
    correct, total = correct.detach().cpu().long(), total.detach().cpu().long()
    present = total > 0
    cell_acc = ratio(correct, total)
    deo_gap = class_gaps(cell_acc, present)
    deo_a, deo_m = mean_max(deo_gap)
    group_acc = ratio(correct.sum(1), total.sum(1))
    nonempty = group_acc[~torch.isnan(group_acc)]
    n = int(total.sum())
    return {
        "accuracy": int(correct.sum()) / n if n else NAN,
        "deo_a": deo_a,
        "deo_m": deo_m,
        "cell_accuracy": cell_acc.tolist(),
        "cell_count": total.tolist(),
        "group_accuracy": group_acc.tolist(),
        "worst_group_accuracy": nonempty.min().item() if nonempty.numel() else NAN,
        "deo_gap": deo_gap.tolist(),
        "excluded_cells": excluded_cells(total),
    }


def classification_metrics_from_counts(counts: torch.Tensor) -> dict:
    """Every metric of the module docstring from N[g, t, p] (``classification_counts``, summed).

    Keys: those of ``metrics_from_counts`` plus ``dp_a``, ``dp_m``, ``dp_gap``, ``selection_rate``,
    ``eodds_a``, ``eodds_m``, ``eodds_gap``.
    """
    counts = counts.detach().cpu().long()
    total = counts.sum(2)                                   # items per (group, true class)
    correct = torch.diagonal(counts, dim1=1, dim2=2)        # TP per (group, class)
    out = metrics_from_counts(correct, total)
    per_group = total.sum(1, keepdim=True).expand_as(total)  # items per group
    predicted = counts.sum(1)                               # items per (group, predicted class)
    selection = ratio(predicted, per_group)
    dp_gap = class_gaps(selection, per_group > 0)
    negatives = per_group - total
    fpr = ratio(predicted - correct, negatives)
    tpr_gap = torch.tensor(out["deo_gap"], dtype=torch.float64)
    eodds_gap = torch.fmax(tpr_gap, class_gaps(fpr, negatives > 0))
    out["dp_a"], out["dp_m"] = mean_max(dp_gap)
    out["dp_gap"] = dp_gap.tolist()
    out["selection_rate"] = selection.tolist()
    out["eodds_a"], out["eodds_m"] = mean_max(eodds_gap)
    out["eodds_gap"] = eodds_gap.tolist()
    return out


def group_metrics(pred, labels, groups, num_classes: int, num_groups: int) -> dict:
    """All classification fairness metrics of one set of predictions (module docstring)."""
    return classification_metrics_from_counts(classification_counts(pred, labels, groups, num_classes, num_groups))
