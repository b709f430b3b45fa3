"""The task contract: what a kind of prediction owns (DESIGN.md, "A task layer").

A task builds the batch loaders of its data sets, computes the loss of the model's outputs
against the batch's targets, the counts behind the training accuracy, an evaluator (metrics
with group fairness, counts summed over processes) and the keys ``result.json`` reports.
Batches are ``(x, target, g)``; ``target`` is a label (classification), a mask (segmentation)
or a list of boxes and labels per image (detection). The task of a run follows from its data
set (``DATASET_TASK``); ``task:`` in a config holds the task's options, checked by the
annotations of its ``__init__``.
"""
from __future__ import annotations

import torch

from ..distributed import DistContext
from ..registry import Registry

TASKS: Registry = Registry("task")
"""Task classes by name: classification, segmentation, detection."""


class Evaluator:
    """Accumulates one pass over an evaluation loader; ``result`` gives the metrics dict
    (the task's ``final_keys`` and more), with counts summed over processes."""

    def update(self, outputs, target, g: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def result(self, dist: DistContext) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError


class Task:
    """Base class of tasks. Subclasses set:

    ``name``; ``headline`` (the metric that ranks epochs for ``best`` and that logs lead with);
    ``final_keys`` (what ``result.json``'s ``final``/``best`` keep); ``details`` (keys of the
    final evaluation that ``result.json`` keeps at its top level, e.g. per-cell tables).
    """

    headline = ""
    final_keys: tuple[str, ...] = ()
    details: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """The task's registry name (classification, segmentation, detection)."""
        return type(self).type_name

    def num_outputs(self, dataset) -> int:
        """The ``num_classes`` the model builder gets for ``dataset``."""
        return dataset.num_classes

    def loader(self, dataset, batch_size: int, *, train: bool, cfg, device, seed: int, rank: int, world_size: int):
        """The batch loader of ``dataset`` (training or evaluation settings of ``cfg.data``)."""
        raise NotImplementedError  # pragma: no cover

    def loss(self, outputs, target, model) -> dict[str, torch.Tensor]:
        """The task loss as named parts; the objective adds them (times the stage's ``ce_weight``)."""
        raise NotImplementedError  # pragma: no cover

    def train_counts(self, outputs, target) -> dict[str, torch.Tensor]:
        """Counts summed over an epoch: ``correct`` and ``total`` give the training accuracy
        (empty when the task has none)."""
        return {}

    def evaluator(self, model, num_classes: int, num_groups: int, device) -> Evaluator:
        raise NotImplementedError  # pragma: no cover

    @classmethod
    def summary(cls, metrics: dict) -> str:
        """One line of the headline metric and the fairness gaps (x100)."""
        def pct(k):
            v = metrics.get(k)
            return "n/a" if v is None or v != v else f"{100 * v:.2f}"

        names = {"accuracy": "acc", "miou": "mIoU", "map": "mAP", "deo_a": "DEO_A", "deo_m": "DEO_M"}
        parts = [f"{names[k]} {pct(k)}" for k in (cls.headline, "deo_a", "deo_m")]
        return "  ".join(parts) + f"  loss {metrics['loss']:.4f}"


def batch_size_of(target) -> int:
    """Rows of a batch's target (labels, masks, or a list of per-image dicts)."""
    return len(target) if isinstance(target, list) else int(target.shape[0])
