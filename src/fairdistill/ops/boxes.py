"""Axis-aligned boxes: areas, IoU, (cx, cy, w, h) <-> (x1, y1, x2, y2), greedy NMS.

Boxes are (x1, y1, x2, y2) in continuous coordinates (x2 > x1, y2 > y1) unless a name says
``cxcywh``. Areas are ``(x2 - x1) * (y2 - y1)`` with no ``+1``: the convention of ssd.pytorch's VOC
evaluation after its ``-1`` shift of the 1-based inclusive XML coordinates (reference dense.md §4).

NMS is the greedy rule of SSD / Fast R-CNN: visit boxes by decreasing score, keep a box unless a
kept box overlaps it with IoU > threshold. It is computed exactly, without a Python loop over the
boxes, as the fixed point of ``keep_j = not any_{i<j}(keep_i and IoU_ij > t)`` on the IoU matrix
(the "Cluster-NMS" iteration of Zheng et al. 2020, which equals greedy NMS): starting from all
boxes kept, after iteration k the first k+1 boxes are final, and a test of no change stops it.
Groups too large for an IoU matrix fall back to the loop over kept boxes.
"""
from __future__ import annotations

import torch

__all__ = ["batched_nms", "box_area", "box_iou", "cxcywh_to_xyxy", "nms", "xyxy_to_cxcywh"]

MATRIX_ENTRIES = 1 << 22
"""Largest IoU matrix (entries, 16 MB in float32) NMS builds at once; groups are chunked to it."""


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Area of each box of ``boxes`` (..., 4); degenerate boxes have area 0."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Intersection over union of every pair: (..., N, 4) x (..., M, 4) -> (..., N, M).

    IoU = |a ∩ b| / (|a| + |b| - |a ∩ b|); a pair whose union is empty gets 0. Leading
    dimensions broadcast (a batch of images: (B, N, 4) x (B, M, 4) -> (B, N, M)).
    """
    lt = torch.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = box_area(a)[..., :, None] + box_area(b)[..., None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(inter.dtype).tiny), torch.zeros_like(inter))


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) centre-size boxes (cx, cy, w, h) -> corners (cx - w/2, cy - h/2, cx + w/2, cy + h/2)."""
    c, half = boxes[..., :2], boxes[..., 2:] / 2
    return torch.cat([c - half, c + half], -1)


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) corners -> centre-size boxes ((x1 + x2)/2, (y1 + y2)/2, x2 - x1, y2 - y1)."""
    lo, hi = boxes[..., :2], boxes[..., 2:]
    return torch.cat([(lo + hi) / 2, hi - lo], -1)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression of (N, 4) boxes with (N,) scores.

    Returns the int64 indices of the kept boxes, by decreasing score (ties: lower index first).
    A box is suppressed when IoU > ``iou_threshold`` with a kept box of higher score.
    """
    return batched_nms(boxes, scores, torch.zeros(scores.shape, dtype=torch.long, device=scores.device), iou_threshold)


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS run independently within each group of equal ``idxs`` (e.g. class, or
    image * C + class); boxes of different groups never suppress each other.

    Returns the int64 indices of the kept boxes, by decreasing score (ties: lower index first).
    Groups are padded to one (G, M, M) IoU tensor, chunked to ``MATRIX_ENTRIES`` entries.
    """
    if boxes.dim() != 2 or boxes.shape[-1] != 4 or scores.shape != boxes.shape[:1] or idxs.shape != scores.shape:
        raise ValueError(
            f"batched_nms: expected boxes (N, 4), scores (N,) and idxs (N,); got {tuple(boxes.shape)}, "
            f"{tuple(scores.shape)} and {tuple(idxs.shape)}."
        )
    n = boxes.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    by_score = torch.sort(scores, descending=True, stable=True).indices
    group_sorted, perm = torch.sort(idxs[by_score], stable=True)
    order = by_score[perm]  # by group, then by decreasing score within the group
    sorted_boxes = boxes[order]
    _, counts = torch.unique_consecutive(group_sorted, return_counts=True)
    starts = counts.cumsum(0) - counts
    group = torch.repeat_interleave(torch.arange(counts.numel(), device=boxes.device), counts)
    pos = torch.arange(n, device=boxes.device) - starts[group]
    keep = torch.zeros(n, dtype=torch.bool, device=boxes.device)

    side = int(MATRIX_ENTRIES ** 0.5)
    small = counts <= side
    if bool(small.all()):
        keep = _matrix_groups(sorted_boxes, group, pos, counts, iou_threshold)
    else:
        sel = small[group]
        if bool(sel.any()):
            rank = small.long().cumsum(0) - 1
            keep[sel] = _matrix_groups(sorted_boxes[sel], rank[group[sel]], pos[sel], counts[small], iou_threshold)
        for g in torch.nonzero(~small).flatten().tolist():
            s, c = int(starts[g]), int(counts[g])
            keep[s:s + c] = _greedy_loop(sorted_boxes[s:s + c], iou_threshold)

    kept = order[keep]
    score_rank = torch.empty_like(by_score)
    score_rank[by_score] = torch.arange(n, device=boxes.device)
    return kept[torch.argsort(score_rank[kept])]


def _matrix_groups(sorted_boxes: torch.Tensor, group: torch.Tensor, pos: torch.Tensor, counts: torch.Tensor,
                   iou_threshold: float) -> torch.Tensor:
    """Keep flags of boxes sorted by (group, decreasing score), group k holding ``counts[k]``."""
    g, m = counts.numel(), int(counts.max())
    padded = sorted_boxes.new_zeros(g, m, 4)
    padded[group, pos] = sorted_boxes
    valid = torch.zeros(g, m, dtype=torch.bool, device=sorted_boxes.device)
    valid[group, pos] = True
    chunk = max(1, MATRIX_ENTRIES // (m * m))
    keep = torch.cat([
        _fixed_point(padded[k:k + chunk], valid[k:k + chunk], iou_threshold) for k in range(0, g, chunk)
    ])
    return keep[group, pos]


def _fixed_point(boxes: torch.Tensor, valid: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS keep flags (G, M) for score-sorted padded boxes (G, M, 4) (see module docstring).

    ``over[g, i, j]`` = 1 where box i precedes j and IoU > threshold; one iteration is a batched
    vector-matrix product (a box is suppressed when a kept box precedes and overlaps it).
    """
    m = boxes.shape[1]
    over = _overlaps(boxes, iou_threshold)
    over.triu_(1).mul_(valid[:, :, None])
    keep = valid.clone()
    for _ in range(m):
        new = valid & (torch.bmm(keep[:, None, :].to(over.dtype), over)[:, 0] == 0)
        if torch.equal(new, keep):
            break
        keep = new
    return keep


def _overlaps(boxes: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """(G, M, M) float 0/1: IoU > threshold for every pair, with ``box_iou``'s arithmetic
    (a pair with an empty union gives 0/0, which is not above any threshold, as box_iou's 0)."""
    x1, y1, x2, y2 = boxes.float().unbind(-1)
    area = (x2 - x1).clamp_(min=0) * (y2 - y1).clamp_(min=0)
    inter = (torch.minimum(x2[:, :, None], x2[:, None, :]) - torch.maximum(x1[:, :, None], x1[:, None, :])).clamp_(min=0)
    inter *= (torch.minimum(y2[:, :, None], y2[:, None, :]) - torch.maximum(y1[:, :, None], y1[:, None, :])).clamp_(min=0)
    union = area[:, :, None] + area[:, None, :] - inter
    return (inter.div_(union) > iou_threshold).float()


def _greedy_loop(sorted_boxes: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS keep flags for score-sorted (M, 4) boxes, one iteration per kept box."""
    keep = torch.zeros(sorted_boxes.shape[0], dtype=torch.bool, device=sorted_boxes.device)
    alive = torch.arange(sorted_boxes.shape[0], device=sorted_boxes.device)
    while alive.numel():
        i, rest = alive[0], alive[1:]
        keep[i] = True
        alive = rest[box_iou(sorted_boxes[i][None], sorted_boxes[rest])[0] <= iou_threshold]
    return keep
