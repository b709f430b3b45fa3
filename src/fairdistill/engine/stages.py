"""Stages of a run as the trainer runs them: active terms, what is trained, optimizers, schedule.

A stage's settings come from the validated config (:func:`fairdistill.config.stage_list`,
``stage_optim``, ``stage_schedule``); what the trainer must provide (features, a teacher,
gradients through the teacher or the input) comes from the active terms' class flags.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import OptimConfig, RunConfig, ScheduleConfig, StageConfig, stage_list, stage_optim, stage_schedule
from ..methods.objective import Objective


@dataclass
class Stage:
    """A resolved stage: which terms run, with which optimizers and schedule."""

    cfg: StageConfig
    index: int
    active: list[str]
    optim: OptimConfig
    schedule: ScheduleConfig
    train_student: bool
    trained_terms: list[str]
    needs_features: bool
    needs_teacher: bool
    teacher_grad: bool
    input_grad: bool

    @property
    def epochs(self) -> int:
        return self.cfg.epochs


def resolve_stages(cfg: RunConfig, objective: Objective) -> list[Stage]:
    """The run's stages (one main stage when ``stages`` is empty), epochs resolved."""
    out = []
    for index, sc in enumerate(stage_list(cfg)):
        active = list(sc.terms) if sc.terms is not None else list(cfg.terms)
        trained = list(sc.train) if sc.train is not None else ["student", *active]
        terms = [objective.term(n) for n in active]
        out.append(Stage(
            cfg=sc, index=index, active=active, optim=stage_optim(cfg, index, sc), schedule=stage_schedule(cfg, index, sc),
            train_student="student" in trained, trained_terms=[n for n in trained if n != "student"],
            needs_features=any(t.needs_features for t in terms), needs_teacher=any(t.needs_teacher for t in terms),
            teacher_grad=any(t.teacher_grad for t in terms), input_grad=any(t.input_grad for t in terms),
        ))
    return out


def make_optimizer(params, spec: OptimConfig) -> torch.optim.Optimizer:
    if spec.name == "adam":
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)
    return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, nesterov=spec.nesterov, weight_decay=spec.weight_decay)


def scheduled_lr(spec: ScheduleConfig, base_lr: float, epoch: int, epochs: int) -> float:
    """Learning rate of ``epoch`` (0-based, within the stage) for the stateless schedules."""
    if spec.name == "multistep":
        return base_lr * spec.gamma ** sum(epoch >= m for m in spec.milestones)
    if spec.name == "cosine":
        return spec.min_lr + (base_lr - spec.min_lr) * 0.5 * (1 + math.cos(math.pi * epoch / max(epochs, 1)))
    return base_lr
