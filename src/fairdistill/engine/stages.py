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
from ..errors import ConfigError
from ..registry import suggest
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

    def fit(self, steps_per_epoch: int) -> None:
        """Resolve an iteration-measured stage to epochs: ceil(iterations / steps_per_epoch)."""
        if self.cfg.iterations is not None:
            self.cfg.epochs = -(-self.cfg.iterations // max(steps_per_epoch, 1))

    def steps(self, epoch: int, steps_per_epoch: int) -> int:
        """Steps of ``epoch`` (0-based): a full pass, or what is left of ``iterations``."""
        if self.cfg.iterations is None:
            return steps_per_epoch
        return max(0, min(steps_per_epoch, self.cfg.iterations - epoch * steps_per_epoch))

    def total_steps(self, steps_per_epoch: int) -> int:
        return self.cfg.iterations if self.cfg.iterations is not None else self.epochs * steps_per_epoch


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
    """Adam or SGD over ``params`` (a list of tensors, or of parameter groups whose ``lr_mult``
    scales ``spec.lr``)."""
    if params and isinstance(params[0], dict):
        params = [{**g, "lr": spec.lr * g.get("lr_mult", 1.0)} for g in params]
    if spec.name == "adam":
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)
    return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, nesterov=spec.nesterov, weight_decay=spec.weight_decay)


def lr_groups(named: list[tuple[str, torch.nn.Parameter]], lr_mult: dict[str, float], key: str) -> list:
    """``named`` parameters as plain tensors (no multipliers) or as groups by multiplier: each
    parameter takes the multiplier of the longest ``lr_mult`` prefix of its name (1 without)."""
    if not lr_mult:
        return [p for _, p in named]
    used, groups = set(), {}
    for name, p in named:
        match = max((k for k in lr_mult if name == k or name.startswith(k + ".")), key=len, default=None)
        used.add(match)
        groups.setdefault(1.0 if match is None else lr_mult[match], []).append(p)
    unused = [k for k in lr_mult if k not in used]
    if unused:
        names = sorted({n.rsplit(".", 2)[0] for n, _ in named})
        raise ConfigError(f"{key}: {unused[0]!r} names no trained parameter.{suggest(unused[0], names)} "
                          "Prefixes are student.MODULE_PATH or terms.TERM_NAME.")
    return [{"params": ps, "lr_mult": m} for m, ps in groups.items()]


def scheduled_lr(spec: ScheduleConfig, base_lr: float, t: int, total: int) -> float:
    """Learning rate at ``t`` of ``total`` (epochs or iterations, 0-based, as ``spec.unit`` and
    ``spec.span`` say) for the stateless schedules: multistep (x gamma at each milestone),
    cosine (to ``min_lr``), poly (base (1 - t/T)^power, DeepLab's ``LR_Scheduler('poly')``)."""
    if spec.name == "multistep":
        return base_lr * spec.gamma ** sum(t >= m for m in spec.milestones)
    if spec.name == "cosine":
        return spec.min_lr + (base_lr - spec.min_lr) * 0.5 * (1 + math.cos(math.pi * t / max(total, 1)))
    if spec.name == "poly":
        return base_lr * max(0.0, 1 - t / max(total, 1)) ** spec.power
    return base_lr


def continue_state(new: torch.optim.Optimizer | None, old: torch.optim.Optimizer | None) -> None:
    """Start ``new`` from ``old``'s per-parameter state (Adam's moments and step count, SGD's
    momentum buffer) for every parameter both optimize (``stages[i].optimizer: continue``; the
    official MFD FitNet trains both stages with one Adam). ``new`` keeps its own settings."""
    if new is None or old is None:
        return
    for group in new.param_groups:
        for p in group["params"]:
            if p in old.state:
                new.state[p] = old.state[p]


STATELESS = ("multistep", "cosine", "poly")
"""Schedules whose learning rate is a function of the position only (set, not stepped)."""
