"""Evaluation: the task's metrics (accuracy or mIoU or mAP, with group fairness) of a model on a
loader, and of a finished run's checkpoint."""
from __future__ import annotations

import torch
from torch import nn

from ..distributed import DistContext
from ..predictions import PredictionRecorder, check_task, write_predictions
from ..tasks import Task
from .build import load_run_model
from .step import Precision


@torch.no_grad()
def evaluate(model: nn.Module, loader, task: Task, num_classes: int, num_groups: int,
             precision: Precision | None = None, dist_ctx: DistContext = DistContext(), recorder=None) -> dict:
    """The task's metrics of ``model`` on one pass of ``loader`` (the task's evaluator:
    classification gives loss, accuracy, DEO_A, DEO_M, DP and equalized-odds gaps and the cell
    tables). Under torchrun each process evaluates its share of every batch and the counts are
    summed (detections gathered). ``recorder`` (a :class:`~fairdistill.predictions.PredictionRecorder`)
    also receives every batch's outputs."""
    precision = precision or Precision()
    was_training = model.training
    model.eval()
    evaluator = task.evaluator(model, num_classes, num_groups, next(model.parameters()).device)
    for x, target, g in loader.epoch(0):
        with precision.autocast():
            outputs = model(precision.input(x))
        evaluator.update(outputs, target, g)
        if recorder is not None:
            recorder.update(outputs, target, g)
    model.train(was_training)
    return evaluator.result(dist_ctx)


def evaluate_run(path: str, device: str | None = None, predictions: str | None = None) -> dict:
    """Re-evaluate the checkpoint of the run in ``path`` on its test set; nothing is written
    except, with ``predictions`` (a file), the per-item predictions (``fairdistill.predictions``;
    classification runs only)."""
    run = load_run_model(path, device)
    test = run.test_set
    if predictions:
        check_task(run.task.name, "--predictions")
    recorder = PredictionRecorder() if predictions else None
    loader = run.test_loader()
    out = evaluate(run.model, loader, run.task, test.num_classes, test.num_groups,
                   Precision(run.device.type, run.cfg.amp), recorder=recorder)
    if recorder is not None:
        write_predictions(predictions, recorder.result(), test.class_names)
    out["task"], out["class_names"], out["group_names"] = run.task.name, test.class_names, test.group_names
    return out


def evaluations(eval_every: int, global_epoch: int, is_last: bool, monitor: str | None,
                stage_evaluates: bool = True) -> tuple[bool, bool]:
    """(test, val): whether the epoch with 0-based run index ``global_epoch`` evaluates the test
    set and the validation split (when there is one), i.e. whether a metric is used: the run's
    last epoch (``result.json``) evaluates both; ``monitor`` (the stage's plateau schedule reads
    ``test_loss`` or ``val_loss``; None without one) the set it reads, every epoch; with
    ``eval_every`` = N >= 1 every N-th epoch of the run evaluates both (curves, loggers,
    ``best``), with 0 (the default) none more. The validation split is also evaluated whenever
    the test set is. A stage with ``evaluate: false`` evaluates only when it ends the run."""
    if is_last:
        return True, True
    if not stage_evaluates:
        return False, False
    test = monitor == "test_loss" or (eval_every > 0 and (global_epoch + 1) % eval_every == 0)
    return test, test or monitor == "val_loss"
