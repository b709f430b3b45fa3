"""Evaluation: loss, accuracy and group fairness of a model on a loader, and of a finished run."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data import BatchLoader
from ..distributed import DistContext, all_reduce_sum
from ..fairness import cell_counts, metrics_from_counts
from .build import load_run_model
from .step import Precision


@torch.no_grad()
def evaluate(model: nn.Module, loader: BatchLoader, num_classes: int, num_groups: int,
             precision: Precision | None = None, dist_ctx: DistContext = DistContext()) -> dict:
    """Mean CE loss, accuracy, DEO_A, DEO_M and cell accuracies of ``model`` on ``loader``.

    Under torchrun each process evaluates its share of every batch and the counts are summed.
    """
    precision = precision or Precision()
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    correct = torch.zeros(num_groups, num_classes, dtype=torch.long, device=dev)
    total = torch.zeros_like(correct)
    for x, y, g in loader.epoch(0):
        with precision.autocast():
            logits = model(precision.input(x)).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        c, t = cell_counts(logits.argmax(1), y, g, num_classes, num_groups)
        correct += c
        total += t
    model.train(was_training)
    correct, total = all_reduce_sum(correct, dist_ctx), all_reduce_sum(total, dist_ctx)
    loss_sum = all_reduce_sum(loss_sum, dist_ctx)
    out = metrics_from_counts(correct, total)
    out["loss"] = loss_sum.item() / max(int(total.sum()), 1)
    return out


def evaluate_run(path: str, device: str | None = None) -> dict:
    """Re-evaluate the checkpoint of the run in ``path`` on its test set (nothing is written)."""
    run = load_run_model(path, device)
    test, cfg = run.test_set, run.cfg
    loader = BatchLoader(test, cfg.data.eval_batch_size, sampler="sequential", device=run.device)
    out = evaluate(run.model, loader, test.num_classes, test.num_groups, Precision(run.device.type, cfg.amp))
    out["class_names"], out["group_names"] = test.class_names, test.group_names
    return out
