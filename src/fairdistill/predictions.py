"""Per-item test predictions of a classifier, as a CSV file any fairness metric can be computed from.

``fairdistill eval RUN_DIR --predictions FILE.csv`` and ``save_predictions: true`` (the final
epoch's evaluation, ``RUN_DIR/predictions.csv``) write one row per test item:

    index, label, group, prediction, prob_<class 0>, ..., prob_<class C-1>

``index`` is the item's position in the run's test set (the data set's own order), ``label``
and ``group`` its class and group indices (names in ``result.json``: ``class_names``,
``group_names``), ``prediction`` the arg-max of the logits (what every metric of
``result.json`` is computed from) and ``prob_*`` the softmax probabilities (float32, 8
significant digits). ``fairdistill.fairness.group_metrics(prediction, label, group, C, G)`` on
the columns gives ``result.json``'s values exactly.

Segmentation and detection runs have no per-item class prediction: :func:`check_task` refuses
them with a ConfigError (their per-group metrics are in ``result.json``).
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError, DataError
from .rundir import write_text


def check_task(task_name: str, what: str) -> None:
    """ConfigError unless ``task_name`` is classification (``what``: the option asking for it)."""
    if task_name != "classification":
        raise ConfigError(f"{what}: per-item predictions are written for classification runs only; this run's task "
                          f"is {task_name} (its per-group metrics are in result.json)")


@dataclass
class Predictions:
    """One entry per test item, in test-set order: ``index``, ``label``, ``group``,
    ``prediction`` (int64, (N,)) and ``probs`` (float32, (N, C))."""

    index: np.ndarray
    label: np.ndarray
    group: np.ndarray
    prediction: np.ndarray
    probs: np.ndarray


class PredictionRecorder:
    """Collects each evaluation batch's logits (``update(outputs, target, g)``, the evaluator's
    signature) and returns them as :class:`Predictions` in test-set order (``result``).

    The loader must be sequential (as every evaluation loader): item k of the test set is row k
    of the pass; under torchrun each process holds rows ``rank::world_size`` of every global
    batch (``data/loader.py``), which :func:`merge_ranks` interleaves back.
    """

    def __init__(self):
        self.batches: list[tuple[torch.Tensor, ...]] = []

    def update(self, outputs, target, g) -> None:
        if not isinstance(outputs, torch.Tensor) or outputs.dim() != 2:
            raise ConfigError("predictions: expected (batch, classes) logits; per-item predictions are written for "
                              "classification runs only")
        logits = outputs.detach().float()
        self.batches.append((logits.argmax(1).cpu(), logits.softmax(1).cpu(), target.detach().cpu().long(),
                             g.detach().cpu().long()))

    def result(self, dist=None) -> Predictions | None:
        """The whole pass's predictions; under torchrun rank 0 gathers every process's rows and
        gets them, the other processes get None."""
        per_rank = [self.batches]
        if dist is not None and dist.enabled:
            import torch.distributed as tdist

            per_rank = [None] * dist.world_size
            tdist.all_gather_object(per_rank, self.batches)
            if not dist.is_main:
                return None
        return merge_ranks(per_rank)


def merge_ranks(per_rank: list[list[tuple[torch.Tensor, ...]]]) -> Predictions:
    """Predictions from each process's per-batch ``(pred, probs, label, group)``: row j of global
    batch b is row j // W of process j % W's batch b (W processes); rows in pass order."""
    world = len(per_rank)
    steps = {len(batches) for batches in per_rank}
    if len(steps) != 1:
        raise DataError(f"predictions: the processes recorded different numbers of batches ({sorted(steps)})")
    columns = [[], [], [], []]
    for b in range(steps.pop()):
        parts = [batches[b] for batches in per_rank]
        for k in range(4):
            pieces = [p[k] for p in parts]
            n = sum(len(x) for x in pieces)
            out = torch.empty((n, *pieces[0].shape[1:]), dtype=pieces[0].dtype)
            for r, x in enumerate(pieces):
                out[r::world] = x
            columns[k].append(out)
    if not columns[0]:
        empty = torch.zeros(0, dtype=torch.long)
        return Predictions(empty.numpy(), empty.numpy(), empty.numpy(), empty.numpy(), np.zeros((0, 0), np.float32))
    pred, probs, label, group = (torch.cat(c) for c in columns)
    return Predictions(np.arange(len(pred)), label.numpy(), group.numpy(), pred.numpy(), probs.numpy())


def predictions_text(p: Predictions, class_names: list) -> str:
    """The CSV text of ``p`` (module docstring); probability columns ``prob_<class name>``."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["index", "label", "group", "prediction", *(f"prob_{c}" for c in class_names)])
    for i in range(len(p.index)):
        writer.writerow([int(p.index[i]), int(p.label[i]), int(p.group[i]), int(p.prediction[i]),
                         *(f"{v:.8g}" for v in p.probs[i].tolist())])
    return buf.getvalue()


def write_predictions(path: str | Path, p: Predictions, class_names: list) -> Path:
    """Write ``p`` to ``path`` atomically; returns the path."""
    if p.probs.ndim != 2 or p.probs.shape[1] != len(class_names):
        raise DataError(f"predictions: {p.probs.shape[-1]} probability columns for {len(class_names)} class names")
    path = Path(path)
    write_text(path, predictions_text(p, class_names))
    return path


def read_predictions(path: str | Path) -> tuple[Predictions, list[str]]:
    """A predictions CSV back as :class:`Predictions` and its class names (from the header)."""
    path = Path(path)
    try:
        rows = list(csv.reader(io.StringIO(path.read_text())))
    except OSError as e:
        raise DataError(f"{path}: cannot read predictions ({e.strerror or e})") from None
    fixed = ["index", "label", "group", "prediction"]
    if not rows or rows[0][:4] != fixed or not all(h.startswith("prob_") for h in rows[0][4:]):
        raise DataError(f"{path}: expected the header {', '.join(fixed)}, prob_<class>...")
    names = [h[len("prob_"):] for h in rows[0][4:]]
    try:
        ints = np.array([[int(v) for v in r[:4]] for r in rows[1:]], dtype=np.int64).reshape(-1, 4)
        probs = np.array([[float(v) for v in r[4:]] for r in rows[1:]], dtype=np.float32).reshape(-1, len(names))
    except ValueError as e:
        raise DataError(f"{path}: a row is not index, label, group, prediction and {len(names)} probabilities ({e})") from None
    return Predictions(ints[:, 0], ints[:, 1], ints[:, 2], ints[:, 3], probs), names
