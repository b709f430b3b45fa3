"""The method-term contract (DESIGN.md, contract 3).

A *term* is one weighted piece of the training objective. It sees the student's and the
teacher's :class:`~fairdistill.models.Features`, the labels and the groups, and returns an
unweighted scalar; the objective multiplies it by the term's (possibly annealed) weight.
A term may own trainable modules (connectors, regressors, adversaries): by default they are
optimised with the student; a term that needs its own optimizer sets ``optimizer``.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..models.base import FeatureModel, Features
from ..registry import Registry, check_options

TERMS: Registry = Registry("method term")
"""Term classes by type name; each is constructed from its config options as keywords."""


@dataclass
class TermInput:
    """Everything a term may read at one training (or evaluation) step: the input ``x``, the
    target ``y`` (labels; masks (B, H, W) for segmentation; a list of per-image box dicts for
    detection), the groups ``g``, both models' features and the epoch."""

    x: torch.Tensor
    y: torch.Tensor
    g: torch.Tensor
    student: Features
    teacher: Features | None
    epoch: int = 0


@dataclass
class SetupContext:
    """What a term may use once, before training, to size and initialise its modules.

    ``student_features`` / ``teacher_features`` come from a dry forward of one training batch
    in eval mode, so shapes are known. ``teacher`` is the teacher model (OFD reads its BNs).
    ``train_batches`` yields ``(x, y, g)`` training batches for terms that estimate statistics
    from data (e.g. OFD margins without BN).
    """

    teacher: FeatureModel | None
    student_features: Features
    teacher_features: Features | None
    num_classes: int
    num_groups: int
    device: torch.device
    train_batches: Any = None
    terms: dict[str, "Term"] = field(default_factory=dict)


class Term(nn.Module):
    """Base class of method terms.

    Class attributes say what the trainer must provide:
    ``needs_teacher`` (a teacher model must be configured), ``needs_features`` (call
    ``forward_features`` rather than ``forward``; without it, reading anything but ``logits``
    raises), ``teacher_grad`` (run the teacher with autograd, e.g. for input Jacobians),
    ``input_grad`` (the input needs ``requires_grad``), ``autocast`` (False: the objective runs
    the term with mixed precision off), ``tasks`` (the tasks whose targets and outputs the term
    understands: a feature term works on every task, a term that reads class labels only on
    classification).
    ``optimizer`` is None to train the term's parameters with the student's optimizer, or an
    optimizer spec (same keys as the config's ``optim`` section) for a separate one.
    :meth:`teacher_fields` declares which fields of the teacher's features the term reads: the
    objective lets it read only those, and a teacher cache holds exactly their union.

    A subclass's ``__init__`` options are checked by their annotations (``Literal`` choices,
    ``Annotated[float, Range(gt=0)]`` bounds, ...) before it runs, whether the term is built
    from a config or in Python: errors name ``<type>.<option>``.
    """

    needs_teacher: bool = True
    needs_features: bool = True
    teacher_grad: bool = False
    input_grad: bool = False
    autocast: bool = True
    optimizer: dict | None = None
    tasks: tuple[str, ...] = ("classification", "segmentation", "detection")

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        signature = inspect.signature(init)

        @functools.wraps(init)
        def checked_init(self, *args, **options):
            bound = signature.bind(self, *args, **options).arguments
            bound.pop(next(iter(signature.parameters)))  # self
            init(self, **check_options(init, dict(bound), getattr(type(self), "type_name", type(self).__name__)))

        cls.__init__ = checked_init

    def setup(self, ctx: SetupContext) -> None:
        """Build modules whose sizes depend on the models; called once before training."""

    def teacher_fields(self) -> tuple[str, ...] | None:
        """The fields of the teacher's :class:`~fairdistill.models.Features` that ``forward``
        reads, after :meth:`setup` (names as ``methods.fields``: ``"logits"``, ``"embedding"``,
        ``"stages.I"``, ``"extra.block.I"``); reading any other raises
        :class:`~fairdistill.models.FeatureNotComputed` (the objective turns it into an error
        naming the term). Default: none without ``needs_teacher``, ``("logits",)`` without
        ``needs_features``, and otherwise None: undeclared, the term may read every field and
        the teacher's outputs are never served from a cache while it runs
        (``engine/teacher_cache.py``). A term that reads teacher features overrides it."""
        if not self.needs_teacher:
            return ()
        if not self.needs_features:
            return ("logits",)
        return None

    def forward(self, inp: TermInput) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError
