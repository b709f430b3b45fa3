"""PASCAL VOC average precision of a detector, pooled and per group, and recall-based DEO.

Inputs (one entry per image, in the same order):

- ``detections[i]``: a dict with ``boxes`` (N, 4) xyxy in continuous pixels, ``scores`` (N,) and
  ``labels`` (N,) in 1..C (tensors, arrays or lists);
- ``ground_truths[i]``: a dict with ``boxes`` (M, 4), ``labels`` (M,) in 1..C and ``difficult``
  (M,) bool (optional: all False when absent).

VOC rules (py-faster-rcnn ``voc_eval``, ssd.pytorch ``eval.py``; reference/dense.md §4):
the detections of a class are ranked by score over all images (ties keep image order, then the
order within the image); each takes the ground truth of its image and class with the largest IoU
(``fairdistill.ops.boxes.box_iou``, no ``+1``); it is a true positive when that IoU exceeds
``iou_threshold`` (strictly) and the box is not yet matched, a false positive when the IoU is at
most the threshold or the box was matched by a higher-ranked detection, and counts neither way
when the box is difficult. npos counts the non-difficult boxes. With ``use_07_metric`` AP is the
VOC2007 11-point mean over t = 0, 0.1, ..., 1 (exactly k/10) of the largest precision at
recall >= t; otherwise the VOC2010+ area under the interpolated (monotone) precision curve.
A class with no non-difficult box has AP NaN and is left out of ``map`` (the mean over classes).

Per group (``detection_fairness``): AP[g, c] is computed on the images of group g only; AP is not
additive, and the mAP of the pooled images can lie below every group's mAP (dense.md §5), so
``map_by_group`` is never averaged into ``map``. Under DDP the per-image lists (moved to the CPU)
must be gathered to one process (e.g. ``torch.distributed.all_gather_object``) before these
functions run; there are no additive counts for AP.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import DataError
from ..ops.boxes import box_iou
from .common import NAN, as_index, class_gaps, excluded_cells, mean_max, ratio

__all__ = ["voc_ap", "detection_fairness", "average_precision"]

FP, TP, IGNORED = 0, 1, -1


def _field(d, key: str, i: int, kind: str, default=None):
    if not isinstance(d, dict):
        raise DataError(f"{kind}[{i}] must be a dict with boxes/labels{'/scores' if kind == 'detections' else ''}, "
                        f"got {type(d).__name__}")
    if key not in d:
        if default is not None:
            return default
        raise DataError(f"{kind}[{i}] has no {key!r}; expected keys: "
                        f"{'boxes, scores, labels' if kind == 'detections' else 'boxes, labels, difficult'}")
    return d[key]


def _boxes(x, i: int, kind: str) -> torch.Tensor:
    b = torch.as_tensor(x, dtype=torch.float64).detach().cpu()
    if b.numel() == 0:
        return b.reshape(0, 4)
    if b.dim() != 2 or b.shape[1] != 4:
        raise DataError(f"{kind}[{i}]['boxes'] must have shape (N, 4) (x1, y1, x2, y2), got {tuple(b.shape)}")
    return b


def parse_inputs(detections, ground_truths, num_classes: int | None):
    """Per-image float64/int64 CPU tensors, and num_classes (given or the largest label)."""
    if len(detections) != len(ground_truths):
        raise DataError(f"detections and ground_truths must have one entry per image; got {len(detections)} "
                        f"and {len(ground_truths)}")
    if not detections:
        raise DataError("detections and ground_truths are empty: there is no image to evaluate")
    dets, gts = [], []
    for i, (d, t) in enumerate(zip(detections, ground_truths)):
        db = _boxes(_field(d, "boxes", i, "detections"), i, "detections")
        ds = torch.as_tensor(_field(d, "scores", i, "detections"), dtype=torch.float64).detach().cpu().reshape(-1)
        dl = as_index(_field(d, "labels", i, "detections"), f"detections[{i}]['labels']").cpu()
        gb = _boxes(_field(t, "boxes", i, "ground_truths"), i, "ground_truths")
        gl = as_index(_field(t, "labels", i, "ground_truths"), f"ground_truths[{i}]['labels']").cpu()
        no_difficult = torch.zeros(len(gl), dtype=torch.bool)
        gd = torch.as_tensor(_field(t, "difficult", i, "ground_truths", no_difficult)).cpu().reshape(-1).bool()
        if not len(db) == len(ds) == len(dl):
            raise DataError(f"detections[{i}]: boxes, scores and labels differ in length "
                            f"({len(db)}, {len(ds)}, {len(dl)})")
        if not len(gb) == len(gl) == len(gd):
            raise DataError(f"ground_truths[{i}]: boxes, labels and difficult differ in length "
                            f"({len(gb)}, {len(gl)}, {len(gd)})")
        dets.append((db, ds, dl))
        gts.append((gb, gl, gd))
    labels = torch.cat([d[2] for d in dets] + [t[1] for t in gts])
    if num_classes is None:
        if labels.numel() == 0:
            raise DataError("num_classes cannot be inferred: no detection or ground truth has a label; pass num_classes")
        num_classes = int(labels.max())
    if labels.numel() and (int(labels.min()) < 1 or int(labels.max()) > num_classes):
        raise DataError(f"detection and ground-truth labels must lie in 1..{num_classes} (num_classes = {num_classes}, "
                        f"0 is the background); found labels in [{int(labels.min())}, {int(labels.max())}]")
    return dets, gts, num_classes


class Matches:
    """Every detection's VOC status and every ground truth, over all images.

    ``image``, ``label``, ``score``, ``status`` (TP 1, FP 0, ignored -1): one entry per detection,
    ranked by score (stable). ``gt_image``, ``gt_label``, ``gt_difficult``: one per ground truth.
    """

    def __init__(self, dets, gts, iou_threshold: float):
        images, labels, scores, state, hit = [], [], [], [], []
        offset = 0
        for i, ((db, ds, dl), (gb, gl, gd)) in enumerate(zip(dets, gts)):
            n = len(db)
            images.append(torch.full((n,), i, dtype=torch.long))
            labels.append(dl)
            scores.append(ds)
            if n and len(gb):
                iou = box_iou(db, gb).masked_fill(dl[:, None] != gl[None, :], -1.0)
                best = iou.argmax(dim=1)  # the first of equal maxima, as np.argmax
                best_iou = iou.gather(1, best[:, None])[:, 0]
                above = best_iou > iou_threshold
                state.append(torch.where(above, torch.where(gd[best], IGNORED, TP), FP))
                hit.append(torch.where(above, best + offset, -1))
            else:
                state.append(torch.full((n,), FP, dtype=torch.long))
                hit.append(torch.full((n,), -1, dtype=torch.long))
            offset += len(gb)
        score = torch.cat(scores).numpy()
        order = np.argsort(-score, kind="stable")
        self.image, self.label = torch.cat(images).numpy()[order], torch.cat(labels).numpy()[order]
        self.score = score[order]
        status, hit = torch.cat(state).numpy()[order], torch.cat(hit).numpy()[order]
        # A candidate TP is a TP only if it is the highest-ranked hit of its ground truth.
        cand = np.flatnonzero(status == TP)
        _, first = np.unique(hit[cand], return_index=True)  # first occurrence in rank order
        status[cand] = FP
        status[cand[first]] = TP
        self.status = status
        self.gt_image = np.concatenate([np.full(len(t[1]), i, dtype=np.int64) for i, t in enumerate(gts)])
        self.gt_label = torch.cat([t[1] for t in gts]).numpy()
        self.gt_difficult = torch.cat([t[2] for t in gts]).numpy()

    def npos(self, num_classes: int, images: np.ndarray | None = None) -> np.ndarray:
        """Non-difficult ground truths per class 1..C (index c-1), on ``images`` (a bool mask) or all."""
        keep = ~self.gt_difficult
        if images is not None:
            keep &= images[self.gt_image]
        return np.bincount(self.gt_label[keep] - 1, minlength=num_classes)[:num_classes]


def average_precision(recall, precision, use_07_metric: bool = True) -> float:
    """AP of one ranked list's recall/precision points (VOC2007 11-point or VOC2010+ area).

    11-point: mean over t = k/10, k = 0..10, of max precision at recall >= t (0 when none);
    t is exactly k/10, where py-faster-rcnn's ``np.arange(0, 1.1, 0.1)`` puts 0.3, 0.6 and 0.7
    one ulp higher (it differs only at a recall of exactly those values).
    Area: precision made non-increasing from the right, integrated over the recall steps, with the
    end points (recall 0, precision 0) and (recall 1, precision 0) added.
    """
    recall, precision = np.asarray(recall, dtype=np.float64), np.asarray(precision, dtype=np.float64)
    if use_07_metric:
        total = 0.0
        for k in range(11):
            reached = recall >= k / 10
            total += float(precision[reached].max()) if reached.any() else 0.0
        return total / 11
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.maximum.accumulate(np.concatenate(([0.0], precision, [0.0]))[::-1])[::-1]
    step = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(((mrec[step + 1] - mrec[step]) * mpre[step + 1]).sum())


def _ap_per_class(m: Matches, num_classes: int, use_07_metric: bool, images: np.ndarray | None = None) -> np.ndarray:
    npos = m.npos(num_classes, images)
    counted = m.status != IGNORED
    if images is not None:
        counted &= images[m.image]
    label, is_tp = m.label[counted], m.status[counted] == TP
    by_class = np.argsort(label, kind="stable")  # rank order kept within each class
    bounds = np.searchsorted(label[by_class], np.arange(1, num_classes + 2))
    ap = np.full(num_classes, NAN)
    for c in range(num_classes):
        if npos[c] == 0:
            continue
        tp_cum = np.cumsum(is_tp[by_class[bounds[c]:bounds[c + 1]]])
        ap[c] = average_precision(tp_cum / npos[c], tp_cum / np.arange(1, len(tp_cum) + 1), use_07_metric)
    return ap


def _nanmean(x: np.ndarray) -> float:
    kept = x[~np.isnan(x)]
    return float(kept.mean()) if kept.size else NAN


def voc_ap(detections, ground_truths, iou_threshold: float = 0.5, use_07_metric: bool = True,
           num_classes: int | None = None) -> dict:
    """{"map": float, "ap": [AP of class 1, ..., class C]} under the VOC rules of the module docstring.

    ``num_classes``: C; None takes the largest label among ground truths and detections, so pass
    it when the last classes may be absent (``ap`` then still has C entries, NaN where no gt).
    """
    dets, gts, num_classes = parse_inputs(detections, ground_truths, num_classes)
    ap = _ap_per_class(Matches(dets, gts, iou_threshold), num_classes, use_07_metric)
    return {"map": _nanmean(ap), "ap": ap.tolist()}


def detection_fairness(detections, ground_truths, groups, num_classes: int | None, num_groups: int | None = None,
                       iou_threshold: float = 0.5, use_07_metric: bool = True, score_threshold: float = 0.5) -> dict:
    """Pooled and per-group VOC AP, their gaps, and DEO on per-(group, class) recall.

    ``groups``: one group id per image, in 0..num_groups-1 (None: the largest id + 1).
    ``num_classes``: as in ``voc_ap``. Keys:

    - ``map``, ``ap``: pooled over all images (``voc_ap``).
    - ``map_by_group[g]``, ``ap_by_group[g][c]``: VOC AP on the images of group g only;
      ``map_gap`` = max_g - min_g of ``map_by_group``.
    - ``ap_gap[c]`` = max_g - min_g of AP[g, c]; ``ap_gap_a``/``ap_gap_m``: mean/max over classes.
    - ``recall_by_group[g][c]``: the fraction of the non-difficult boxes of class c on group g's
      images matched (VOC rules at ``iou_threshold``) by a detection of score >= ``score_threshold``;
      the point of the VOC recall curve at that score. ``deo_gap[c]``, ``deo_a``, ``deo_m``: its
      between-group gap, mean and max over classes (the equal-opportunity reading, dense.md §6).
    - ``cell_count[g][c]``: non-difficult boxes; ``excluded_cells``: the [group, class] cells
      with none, which are left out of ``ap_gap`` and ``deo_gap`` (a class with fewer than two
      such groups has no gap: NaN, left out of the means and maxima).
    Class index c in every list is label c + 1.
    """
    dets, gts, num_classes = parse_inputs(detections, ground_truths, num_classes)
    groups = as_index(groups, "groups").cpu()
    if groups.numel() != len(dets):
        raise DataError(f"groups must have one entry per image: {len(dets)} images, {groups.numel()} groups")
    if num_groups is None:
        num_groups = int(groups.max()) + 1 if groups.numel() else 1
    if groups.numel() and (int(groups.min()) < 0 or int(groups.max()) >= num_groups):
        raise DataError(f"groups must lie in [0, {num_groups - 1}] (num_groups = {num_groups}); found "
                        f"[{int(groups.min())}, {int(groups.max())}]")
    m = Matches(dets, gts, iou_threshold)
    groups = groups.numpy()
    ap = _ap_per_class(m, num_classes, use_07_metric)
    ap_g = torch.from_numpy(np.stack([_ap_per_class(m, num_classes, use_07_metric, groups == g)
                                      for g in range(num_groups)]))
    npos_g = torch.from_numpy(np.stack([m.npos(num_classes, groups == g) for g in range(num_groups)]))
    hits = (m.status == TP) & (m.score >= score_threshold)
    cell = groups[m.image[hits]] * num_classes + m.label[hits] - 1
    hits_g = torch.from_numpy(np.bincount(cell, minlength=num_groups * num_classes).reshape(num_groups, num_classes))
    recall_g = ratio(hits_g, npos_g)
    present = npos_g > 0
    ap_gap, deo_gap = class_gaps(ap_g, present), class_gaps(recall_g, present)
    map_g = torch.tensor([_nanmean(row) for row in ap_g.numpy()], dtype=torch.float64)
    out = {
        "map": _nanmean(ap),
        "ap": ap.tolist(),
        "map_by_group": map_g.tolist(),
        "map_gap": class_gaps(map_g[:, None], ~torch.isnan(map_g[:, None]))[0].item(),
        "ap_by_group": ap_g.tolist(),
        "ap_gap": ap_gap.tolist(),
        "recall_by_group": recall_g.tolist(),
        "deo_gap": deo_gap.tolist(),
        "cell_count": npos_g.tolist(),
        "excluded_cells": excluded_cells(npos_g),
    }
    out["ap_gap_a"], out["ap_gap_m"] = mean_max(ap_gap)
    out["deo_a"], out["deo_m"] = mean_max(deo_gap)
    return out
