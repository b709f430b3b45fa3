"""Classification: cross-entropy on labels; accuracy and group fairness of the predictions."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data import BatchLoader
from ..distributed import DistContext, all_reduce_sum
from ..metrics import classification_counts, classification_metrics_from_counts
from .base import TASKS, Evaluator, Task


class ClassificationEvaluator(Evaluator):
    """Mean CE and the per-group confusion (G, C, C) -> accuracy, DEO, DP, equalized odds."""

    def __init__(self, num_classes: int, num_groups: int, device):
        self.num_classes, self.num_groups = num_classes, num_groups
        self.counts = torch.zeros(num_groups, num_classes, num_classes, dtype=torch.long, device=device)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)

    def update(self, outputs, target, g) -> None:
        logits = outputs.float()
        self.loss_sum += F.cross_entropy(logits, target, reduction="sum").double()
        self.counts += classification_counts(logits.argmax(1), target, g, self.num_classes, self.num_groups)

    def result(self, dist: DistContext) -> dict:
        counts = all_reduce_sum(self.counts, dist)
        out = classification_metrics_from_counts(counts)
        out["loss"] = all_reduce_sum(self.loss_sum, dist).item() / max(int(counts.sum()), 1)
        return out


@TASKS.register("classification")
class Classification(Task):
    """One label per image. Loss: cross-entropy; training accuracy; evaluation: accuracy,
    DEO_A/DEO_M (MFD), demographic parity and equalized-odds gaps, worst-group accuracy."""

    headline = "accuracy"
    final_keys = ("accuracy", "deo_a", "deo_m", "loss", "dp_a", "dp_m", "eodds_a", "eodds_m", "worst_group_accuracy")
    details = ("cell_accuracy", "cell_count", "group_accuracy", "excluded_cells")

    def loader(self, dataset, batch_size, *, train, cfg, device, seed, rank, world_size):
        d = cfg.data
        if train:
            return BatchLoader(dataset, batch_size, sampler=d.sampler, drop_last=d.drop_last, padding=d.padding,
                               flip=d.flip, crop=d.crop, crop_key="data.crop", seed=seed, device=device, rank=rank,
                               world_size=world_size)
        return BatchLoader(dataset, batch_size, sampler="sequential", crop=d.eval_crop, crop_key="data.eval_crop",
                           device=device, rank=rank, world_size=world_size)

    def loss(self, outputs, target, model):
        return {"ce": F.cross_entropy(outputs, target)}

    def train_counts(self, outputs, target):
        return {"correct": (outputs.argmax(1) == target).sum(), "total": torch.tensor(target.numel(), device=target.device)}

    def evaluator(self, model, num_classes, num_groups, device):
        return ClassificationEvaluator(num_classes, num_groups, device)
