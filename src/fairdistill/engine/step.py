"""One optimisation step: teacher forward, student forward and objective, backward, updates."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import TrainingError
from ..methods.base import TermInput
from ..methods.objective import Objective
from ..models import FeatureModel, OutputsOnly
from ..tasks import Task
from .stages import Stage


@dataclass
class Precision:
    """Mixed precision and memory layout of a run (config keys ``amp``, ``channels_last``)."""

    device_type: str = "cpu"
    amp: str = "off"
    channels_last: bool = False
    scaler: object = None

    def autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.amp)
        return torch.autocast(self.device_type, dtype=dtype, enabled=dtype is not None)

    def input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x


def forward(model: FeatureModel, x: torch.Tensor, features: bool):
    """``model.forward_features(x)`` when ``features``, else only the outputs (:class:`OutputsOnly`)."""
    return model.forward_features(x) if features else OutputsOnly(model(x))


class StudentStep(nn.Module):
    """The student's forward and the objective as one module, so that one DistributedDataParallel
    wrapper covers every trainable part (student, connectors, adversaries); the teacher's
    features come in as an argument."""

    def __init__(self, student: FeatureModel, objective: Objective):
        super().__init__()
        self.student, self.objective = student, objective

    def forward(self, x, y, g, teacher_feat, stage: Stage, weights: dict, epoch: int):
        student_feat = forward(self.student, x, stage.needs_features)
        inp = TermInput(x=x, y=y, g=g, student=student_feat, teacher=teacher_feat, epoch=epoch)
        loss, parts = self.objective(inp, self.student, stage.active, stage.cfg.ce_weight, weights)
        return loss, parts, student_feat.logits


@dataclass
class StageRun:
    """What a training step of one stage needs besides the batch: the (possibly DDP-wrapped)
    :class:`StudentStep`, the stage's optimizers, the teacher, the precision, the task, the
    current term weights (set per epoch) and the teacher cache serving this stage
    (``engine/teacher_cache.py``; None: the teacher runs)."""

    stage: Stage
    module: nn.Module
    optimizers: list
    teacher: FeatureModel | None
    precision: Precision
    task: Task
    weights: dict = field(default_factory=dict)
    teacher_cache: object = None


def train_step(run: StageRun, batch: tuple, epoch: int, items: tuple | None = None) -> tuple[dict, dict]:
    """One optimisation step on ``batch = (x, target, g)``: teacher forward (no autograd unless
    a term needs it), student forward and objective, backward, every optimizer steps. Returns
    the detached loss parts (with their sum as ``loss``) and the task's training counts.
    ``items``: the batch's dataset indices and flips (``teacher_cache.batch_items``), with which
    the stage's teacher cache serves the teacher's features instead (a 1-row batch runs it)."""
    stage, precision = run.stage, run.precision
    x, y, g = batch
    x = precision.input(x)
    if stage.input_grad:
        x = x.detach().requires_grad_(True)
    teacher_feat = None
    with precision.autocast():
        if stage.needs_teacher and run.teacher_cache is not None and items is not None and x.shape[0] > 1:
            teacher_feat = run.teacher_cache.features(*items, y)
        elif stage.needs_teacher:
            with torch.set_grad_enabled(stage.teacher_grad):
                teacher_feat = forward(run.teacher, x, stage.needs_features)
        loss, parts, logits = run.module(x, y, g, teacher_feat, stage, run.weights, epoch)
    if not torch.isfinite(loss):
        bad = [k for k, v in parts.items() if not torch.isfinite(v)] or ["total"]
        raise TrainingError(
            f"loss is {loss.item()} at stage {stage.cfg.name!r}, epoch {epoch + 1} (non-finite part: {', '.join(bad)}). "
            "Lower optim.lr or the term weights."
        )
    for opt in run.optimizers:
        opt.zero_grad(set_to_none=True)
    if loss.requires_grad:
        scaler = precision.scaler
        if scaler is not None:
            scaler.scale(loss).backward()
            for opt in run.optimizers:
                scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            for opt in run.optimizers:
                opt.step()
    parts["loss"] = loss.detach()
    with torch.no_grad():
        counts = run.task.train_counts(logits, y)
    return parts, counts
