"""SSD's MultiBox training targets, loss and decoding (Liu et al. 2016, §2.2 "Matching strategy",
"Training objective", "Hard negative mining"; the conventions of amdegroot/ssd.pytorch
``layers/box_utils.py``, ``multibox_loss.py`` and ``functions/detection.py``, and the
post-processing numbers of torchvision's SSD, reference dense.md §2-3).

Conventions:
* priors: (P, 4) normalised (cx, cy, w, h) (``models.priors.prior_boxes``).
* targets: one mapping per image with ``"boxes"`` (K, 4) normalised (x1, y1, x2, y2) in [0, 1]
  and ``"labels"`` (K,) int64 in 1..C; 0 is background in the C + 1 scores. K may be 0.
  Boxes with zero width or height are ignored (they overlap nothing and cannot be encoded).
* loc: (B, P, 4) encoded offsets; conf: (B, P, C + 1) raw scores (a model's ``forward``).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from ..errors import DataError
from .boxes import batched_nms, box_iou, cxcywh_to_xyxy

__all__ = ["VARIANCES", "decode", "detect", "encode", "hard_negatives", "match", "match_targets",
           "multibox_loss", "multibox_loss_from_targets"]

VARIANCES = (0.1, 0.2)
"""ssd.pytorch's box-coding variances (centre, size); torchvision's BoxCoder weights (10, 10, 5, 5)."""

BOX_TOLERANCE = 0.01
"""How far outside [0, 1] a target coordinate may lie before it is rejected as not normalised."""


def encode(matched: torch.Tensor, priors: torch.Tensor, variances=VARIANCES) -> torch.Tensor:
    """Offsets of xyxy boxes (..., P, 4) from their priors (P, 4):
    ((c - c_p) / (v0 * wh_p), log(wh / wh_p) / v1), c and wh the box's centre and size."""
    centre = (matched[..., :2] + matched[..., 2:]) / 2
    size = matched[..., 2:] - matched[..., :2]
    return torch.cat([
        (centre - priors[:, :2]) / (variances[0] * priors[:, 2:]),
        torch.log(size / priors[:, 2:]) / variances[1],
    ], -1)


def decode(loc: torch.Tensor, priors: torch.Tensor, variances=VARIANCES) -> torch.Tensor:
    """Inverse of ``encode``: offsets (..., P, 4) -> xyxy boxes (..., P, 4), normalised."""
    centre = priors[:, :2] + loc[..., :2] * variances[0] * priors[:, 2:]
    size = priors[:, 2:] * torch.exp(loc[..., 2:] * variances[1])
    return cxcywh_to_xyxy(torch.cat([centre, size], -1))


def _assign(iou: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Truth index and positive flag per prior from IoUs (B, K, P) (padding truths hold -1).

    Each truth's best prior is positive whatever its IoU; when several truths share one best
    prior the last of them gets it (ssd.pytorch's loop order). Every other prior takes its
    best truth and is positive when that IoU >= ``threshold``.
    """
    b, k, p = iou.shape
    best_overlap, truth = iou.max(1)  # (B, P); the first truth on ties
    best_prior = iou.argmax(2)  # (B, K)
    real = iou.amax(2) >= 0  # padding rows are all -1
    order = torch.arange(k, device=iou.device).expand(b, k)
    forced = torch.full((b, p), -1, dtype=torch.long, device=iou.device)
    forced.scatter_reduce_(1, best_prior, torch.where(real, order, -1), reduce="amax")
    is_forced = forced >= 0
    truth = torch.where(is_forced, forced, truth)
    positive = is_forced | (best_overlap >= threshold)
    return truth, positive


def _padded(targets: Sequence[Mapping[str, torch.Tensor]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack per-image targets to boxes (B, K, 4), labels (B, K) and a real-box mask (B, K)."""
    boxes, labels = [], []
    for i, t in enumerate(targets):
        if not isinstance(t, Mapping) or "boxes" not in t or "labels" not in t:
            raise DataError(f"detection target {i}: expected a mapping with 'boxes' and 'labels'.")
        b, lab = torch.as_tensor(t["boxes"]), torch.as_tensor(t["labels"])
        if b.dim() != 2 or b.shape[-1] != 4 or lab.shape != b.shape[:1]:
            raise DataError(
                f"detection target {i}: expected boxes (K, 4) and labels (K,); got {tuple(b.shape)} and {tuple(lab.shape)}."
            )
        boxes.append(b.to(device, torch.float32))
        labels.append(lab.to(device, torch.long))
    if not boxes:
        raise DataError("detection targets: the batch is empty.")
    box = pad_sequence(boxes, batch_first=True)
    label = pad_sequence(labels, batch_first=True)
    real = pad_sequence([torch.ones(len(x), dtype=torch.bool, device=device) for x in labels], batch_first=True)
    real &= (box[..., 2] > box[..., 0]) & (box[..., 3] > box[..., 1])
    return box, label, real


def _check(box: torch.Tensor, label: torch.Tensor, real: torch.Tensor, num_classes: int) -> None:
    if not bool(real.any()):
        return
    lo, hi, bmin, bmax = torch.stack([
        label[real].min().double(), label[real].max().double(), box[real].min().double(), box[real].max().double(),
    ]).tolist()
    if lo < 1 or hi > num_classes:
        raise DataError(
            f"detection targets: labels must lie in 1..{num_classes} (0 is background); got {int(lo)}..{int(hi)}."
        )
    if bmin < -BOX_TOLERANCE or bmax > 1 + BOX_TOLERANCE:
        raise DataError(
            f"detection targets: boxes must be normalised xyxy in [0, 1]; got coordinates {bmin:.3g}..{bmax:.3g}. "
            "Divide by the image width/height and clip to the image."
        )


def match_targets(targets: Sequence[Mapping[str, torch.Tensor]], priors: torch.Tensor, num_classes: int,
                  threshold: float = 0.5, variances=VARIANCES) -> tuple[torch.Tensor, torch.Tensor]:
    """Training targets of a batch: encoded offsets loc_t (B, P, 4) and classes conf_t (B, P).

    conf_t is the matched truth's label for a positive prior (see ``match``) and 0 otherwise;
    loc_t is ``encode`` of the matched truth for positives and 0 elsewhere. One batched IoU over
    the padded truths. Labels outside 1..``num_classes`` or boxes outside [0, 1] raise DataError.
    """
    box, label, real = _padded(targets, priors.device)
    _check(box, label, real, num_classes)
    b, p = box.shape[0], priors.shape[0]
    if box.shape[1] == 0:
        return priors.new_zeros(b, p, 4), torch.zeros(b, p, dtype=torch.long, device=priors.device)
    iou = box_iou(box, cxcywh_to_xyxy(priors).expand(b, p, 4))
    iou = torch.where(real[:, :, None], iou, torch.full_like(iou, -1.0))
    truth, positive = _assign(iou, threshold)
    conf_t = torch.where(positive, label.gather(1, truth), 0)
    matched = box.gather(1, truth[..., None].expand(b, p, 4))
    loc_t = torch.where(positive[..., None], encode(matched, priors, variances), 0.0)
    return loc_t, conf_t


def match(truths: torch.Tensor, labels: torch.Tensor, priors: torch.Tensor,
          threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's matching: (truth index per prior, -1 for background; class per prior).

    SSD's matching strategy: each truth's best-IoU prior is positive (even below ``threshold``),
    then every prior whose best IoU is >= ``threshold`` is positive for that truth.
    """
    box, label, real = _padded([{"boxes": truths, "labels": labels}], priors.device)
    if box.shape[1] == 0:
        p = priors.shape[0]
        return torch.full((p,), -1, dtype=torch.long, device=priors.device), torch.zeros(p, dtype=torch.long, device=priors.device)
    iou = box_iou(box[0], cxcywh_to_xyxy(priors))
    iou = torch.where(real[0][:, None], iou, torch.full_like(iou, -1.0))
    truth, positive = _assign(iou[None], threshold)
    return torch.where(positive[0], truth[0], -1), torch.where(positive[0], label[0][truth[0]], 0)


def hard_negatives(background_loss: torch.Tensor, positive: torch.Tensor, neg_pos_ratio: float = 3) -> torch.Tensor:
    """Hard-negative mask (B, P): per image the ``min(ratio * num_pos, P - 1)`` non-positive priors
    with the largest background loss (SSD's 3:1 rule). An image with no positive gets none."""
    p = positive.shape[1]
    num_neg = (neg_pos_ratio * positive.sum(1, keepdim=True)).clamp(max=p - 1)
    loss = background_loss.masked_fill(positive, float("-inf"))
    rank = loss.argsort(1, descending=True).argsort(1)
    return (rank < num_neg) & ~positive


def multibox_loss_from_targets(loc: torch.Tensor, conf: torch.Tensor, loc_t: torch.Tensor, conf_t: torch.Tensor,
                               neg_pos_ratio: float = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(localisation loss, confidence loss) for matched targets (``match_targets``).

    L_loc = sum over positives of smooth-L1(loc - loc_t) (beta 1, summed over the 4 offsets) / N;
    L_conf = sum over positives and hard negatives of cross-entropy / N, N = max(1, positives in
    the batch). Both are sums over the batch, not per-image means, as in ssd.pytorch.
    """
    conf = conf.float()
    positive = conf_t > 0
    n = positive.sum().clamp(min=1).float()
    ce = F.cross_entropy(conf.flatten(0, 1), conf_t.flatten(), reduction="none").view(conf_t.shape)
    with torch.no_grad():
        background = torch.logsumexp(conf, -1) - conf[..., 0]
        chosen = positive | hard_negatives(background, positive, neg_pos_ratio)
    loss_conf = torch.where(chosen, ce, 0.0).sum() / n
    smooth = F.smooth_l1_loss(loc.float(), loc_t, reduction="none").sum(-1)
    loss_loc = torch.where(positive, smooth, 0.0).sum() / n
    return loss_loc, loss_conf


def multibox_loss(loc: torch.Tensor, conf: torch.Tensor, priors: torch.Tensor,
                  targets: Sequence[Mapping[str, torch.Tensor]], threshold: float = 0.5,
                  neg_pos_ratio: float = 3, variances=VARIANCES) -> tuple[torch.Tensor, torch.Tensor]:
    """SSD's MultiBox loss (localisation, confidence) of a batch; the training loss is their sum.

    Matching as ``match_targets`` (IoU ``threshold``), then ``multibox_loss_from_targets``. An
    image without boxes has only negatives and, by the 3:1 rule, no hard negative: it adds 0 to
    both sums (ssd.pytorch's behaviour); a batch without any box gives two zeros that still
    depend on the outputs (zero gradients).
    """
    loc_t, conf_t = match_targets(targets, priors, conf.shape[-1] - 1, threshold, variances)
    return multibox_loss_from_targets(loc, conf, loc_t, conf_t, neg_pos_ratio)


@torch.no_grad()
def detect(loc: torch.Tensor, conf: torch.Tensor, priors: torch.Tensor, score_threshold: float = 0.01,
           nms_threshold: float = 0.45, top_k: int = 200, pre_nms_top_k: int | None = 400,
           variances=VARIANCES) -> list[dict[str, torch.Tensor]]:
    """Detections per image: ``{"boxes": (N, 4) xyxy normalised, "scores": (N,), "labels": (N,)}``.

    Scores are softmax probabilities of classes 1..C. Per image and class: the ``pre_nms_top_k``
    highest-scoring priors (None: all), those with score > ``score_threshold``, greedy NMS at
    IoU > ``nms_threshold``; then the ``top_k`` best of the image over all classes, by decreasing
    score. Boxes are decoded and clipped to [0, 1]. The defaults are torchvision's SSD post-
    processing (score 0.01, NMS 0.45, 400 candidates per class, 200 per image). One NMS call
    serves the whole batch (groups image * C + class).
    """
    b, p, c1 = conf.shape
    c = c1 - 1
    boxes = decode(loc.float(), priors.float(), variances).clamp(0, 1)
    scores = conf.float().softmax(-1)[..., 1:]
    k = p if pre_nms_top_k is None else min(int(pre_nms_top_k), p)
    top, idx = scores.topk(k, dim=1)  # (B, k, C)
    img, row, cls = torch.nonzero(top > score_threshold, as_tuple=True)
    cand_boxes = boxes[img, idx[img, row, cls]]
    cand_scores = top[img, row, cls]
    kept = batched_nms(cand_boxes, cand_scores, img * c + cls, nms_threshold)
    img_of, perm = torch.sort(img[kept], stable=True)  # by image, still by decreasing score
    kept = kept[perm]
    counts = torch.bincount(img_of, minlength=b)
    first = counts.cumsum(0) - counts
    within = torch.arange(kept.numel(), device=kept.device) - first[img_of]
    kept = kept[within < top_k]
    per_image = torch.bincount(img[kept], minlength=b).tolist()
    out = []
    for part in torch.split(kept, per_image):
        out.append({"boxes": cand_boxes[part], "scores": cand_scores[part], "labels": cls[part] + 1})
    return out
