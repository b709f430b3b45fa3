"""Tasks: what a kind of prediction owns (loader, loss, training counts, evaluator, result keys).

``task_of(data_name)`` is the task of a data set (a builder's ``task`` attribute, default
classification), known before any data is read.
"""
from __future__ import annotations

from ..data import DATASETS
from . import classification, detection, segmentation  # noqa: F401  (register the tasks)
from .base import TASKS, Evaluator, Task, batch_size_of

__all__ = ["TASKS", "Evaluator", "Task", "batch_size_of", "task_of"]


def task_of(data_name: str) -> str:
    """The task of data set ``data_name``: its builder's ``task`` attribute, else classification."""
    return getattr(DATASETS.get(data_name, key="data.name"), "task", "classification")
