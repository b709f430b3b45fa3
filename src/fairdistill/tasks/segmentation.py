"""Semantic segmentation: per-pixel cross-entropy (255 = void), mIoU and group gaps per class."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..data.dense import VOID
from ..data.dense_augment import parse_augment
from ..data.dense_loader import DenseBatchLoader
from ..distributed import DistContext, all_reduce_sum
from ..metrics import segmentation_counts, segmentation_metrics_from_counts
from .base import TASKS, Evaluator, Task


def dense_loader(dataset, batch_size, *, train, cfg, device, seed, rank, world_size, augment):
    """A :class:`DenseBatchLoader` of ``dataset`` with ``augment`` (train or evaluation settings)."""
    d = cfg.data
    augment = dataclasses.replace(augment, train=train)
    if train:
        return DenseBatchLoader(dataset, batch_size, sampler=d.sampler, drop_last=d.drop_last, device=device,
                                seed=seed, rank=rank, world_size=world_size, augment=augment)
    return DenseBatchLoader(dataset, batch_size, sampler="sequential", device=device, rank=rank,
                            world_size=world_size, augment=augment)


class SegmentationEvaluator(Evaluator):
    """Mean per-pixel CE (void pixels left out) and one confusion matrix per group."""

    def __init__(self, num_classes: int, num_groups: int, device, include_background: bool):
        self.num_classes, self.num_groups, self.include_background = num_classes, num_groups, include_background
        self.counts = torch.zeros(num_groups, num_classes, num_classes, dtype=torch.long, device=device)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)

    def update(self, outputs, target, g) -> None:
        logits = outputs.float()
        self.loss_sum += F.cross_entropy(logits, target, ignore_index=VOID, reduction="sum").double()
        self.counts += segmentation_counts(logits.argmax(1), target, g, self.num_classes, self.num_groups)

    def result(self, dist: DistContext) -> dict:
        counts = all_reduce_sum(self.counts, dist)
        out = segmentation_metrics_from_counts(counts, include_background=self.include_background)
        out["loss"] = all_reduce_sum(self.loss_sum, dist).item() / max(int(counts.sum()), 1)
        return out


@TASKS.register("segmentation")
class Segmentation(Task):
    """One class per pixel (255 = void, ignored by loss and metrics).

    Loss: the mean cross-entropy over the non-void pixels of the batch. Evaluation: mIoU, pixel
    accuracy, mIoU per group, and the DEO family on per-(group, class) pixel recall and IoU
    (``metrics/segmentation.py``). Batches come from ``data.augment`` (the joint scale, crop and
    flip of ``data/dense_augment.py``).

    Options (``task:`` in a config):
      ce_batch_average: also divide the loss by the batch size, as the official DeepLab/OFD code
        (``SegmentationLosses(batch_average=True)``: the objective is 1/B of the usual scale).
      gaps_include_background: whether class 0 enters the DEO and IoU gaps (mIoU always keeps it).
    """

    headline = "miou"
    final_keys = ("miou", "pixel_accuracy", "miou_by_group", "miou_gap", "deo_a", "deo_m", "iou_gap_a", "iou_gap_m", "loss")
    details = ("iou", "iou_by_group", "recall_by_group", "cell_count", "excluded_cells")

    def __init__(self, ce_batch_average: bool = False, gaps_include_background: bool = True):
        self.ce_batch_average, self.gaps_include_background = ce_batch_average, gaps_include_background

    def loader(self, dataset, batch_size, *, train, cfg, device, seed, rank, world_size):
        augment = parse_augment(cfg.data.augment, "segmentation", "data.augment")
        return dense_loader(dataset, batch_size, train=train, cfg=cfg, device=device, seed=seed, rank=rank,
                            world_size=world_size, augment=augment)

    def loss(self, outputs, target, model):
        ce = F.cross_entropy(outputs, target, ignore_index=VOID)
        return {"ce": ce / target.shape[0] if self.ce_batch_average else ce}

    def train_counts(self, outputs, target):
        valid = target != VOID
        return {"correct": ((outputs.argmax(1) == target) & valid).sum(), "total": valid.sum()}

    def evaluator(self, model, num_classes, num_groups, device):
        return SegmentationEvaluator(num_classes, num_groups, device, self.gaps_include_background)
