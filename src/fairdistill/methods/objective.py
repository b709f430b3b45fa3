"""The training objective: the task loss plus weighted method terms (DESIGN.md data flow)."""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from ..errors import ConfigError, TrainingError
from ..models.base import FeatureNotComputed
from .base import TERMS, Term, TermInput
from .fields import DeclaredFeatures

RESERVED = ("type", "weight", "weight_end")
"""Keys of a term's config that are not options of the term class."""
UNDECLARED = "but the term does not declare it: add it to the term's teacher_fields()"


def build_terms(specs: dict[str, dict]) -> tuple[nn.ModuleDict, dict[str, tuple[float, float | None]]]:
    """Instantiate the configured terms; returns the modules and each term's (weight, weight_end).

    The specs are those of a validated config (:func:`fairdistill.config.validate`), which has
    checked every option by the term class's annotations.
    """
    terms, weights = nn.ModuleDict(), {}
    for name, spec in specs.items():
        cls = TERMS.get(spec.get("type", name), key=f"terms.{name}.type")
        try:
            terms[name] = cls(**{k: v for k, v in spec.items() if k not in RESERVED})
        except TypeError as e:
            raise ConfigError(f"terms.{name}: {e}") from None
        w, w_end = spec.get("weight", 1.0), spec.get("weight_end")
        weights[name] = (float(w), None if w_end is None else float(w_end))
    return terms, weights


def annealed(weight: float, weight_end: float | None, epoch: int, epochs: int) -> float:
    """Linear annealing from ``weight`` at epoch 0 to ``weight_end`` at the stage's last epoch.

    MFD supplement 1.2 / the official code: lambda_h decreases by (w0 - w1)/(epochs - 1) per epoch.
    """
    if weight_end is None or epochs <= 1:
        return weight
    return weight + (weight_end - weight) * min(epoch, epochs - 1) / (epochs - 1)


class Objective(nn.Module):
    """ce_weight * the task loss (its parts summed) + the active terms times their weights.

    ``task`` is a :class:`fairdistill.tasks.Task` (its ``loss(outputs, target, model)``); None
    gives classification's cross-entropy.
    """

    def __init__(self, specs: dict[str, dict], task=None):
        super().__init__()
        self.terms, self.weights = build_terms(specs)
        if task is None:
            from ..tasks.classification import Classification

            task = Classification()
        self.task = task

    def term(self, name: str) -> Term:
        return self.terms[name]

    def current_weights(self, active: list[str], epoch: int, epochs: int) -> dict[str, float]:
        return {n: annealed(*self.weights[n], epoch, epochs) for n in active}

    def run_term(self, name: str, inp: TermInput) -> torch.Tensor:
        """The unweighted value of term ``name``; a term with ``autocast = False`` runs with
        mixed precision off. A term that declares its teacher fields (``Term.teacher_fields``)
        sees only those (:class:`~.fields.DeclaredFeatures`)."""
        term = self.terms[name]
        try:
            if inp.teacher is not None:
                fields = term.teacher_fields()
                if fields is not None:
                    inp = replace(inp, teacher=DeclaredFeatures(inp.teacher, fields, UNDECLARED))
            if term.autocast or not torch.is_autocast_enabled(inp.g.device.type):
                return term(inp)
            with torch.autocast(inp.g.device.type, enabled=False):
                return term(inp)
        except FeatureNotComputed as e:
            raise TrainingError(f"terms.{name} ({type(term).__name__}): {e}") from None

    def forward(self, inp: TermInput, model: nn.Module, active: list[str], ce_weight: float, weights: dict[str, float]):
        """Returns (total loss, {part name: unweighted detached value}); ``model`` is the student
        (a detection loss needs its priors)."""
        parts: dict[str, torch.Tensor] = {}
        total = None
        if ce_weight:
            for name, value in self.task.loss(inp.student.logits, inp.y, model).items():
                parts[name] = value.detach()
                total = ce_weight * value if total is None else total + ce_weight * value
        for name in active:
            value = self.run_term(name, inp)
            parts[name] = value.detach()
            if weights[name]:
                total = weights[name] * value if total is None else total + weights[name] * value
        if total is None:
            total = inp.g.new_zeros((), dtype=torch.float32)
        return total, parts
