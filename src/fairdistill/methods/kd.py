"""Hinton knowledge distillation (HKD): "Distilling the Knowledge in a Neural Network", 2015."""
from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F

from ..registry import Range
from .base import TERMS, Term, TermInput


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float = 4.0) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), summed over classes (dim 1) and averaged over the
    batch (and, for (B, C, H, W) maps, over the pixels).

    The T^2 factor keeps gradient magnitudes comparable across temperatures (Hinton et al.).
    """
    log_p_s = F.log_softmax(student_logits / T, dim=1)
    log_p_t = F.log_softmax(teacher_logits / T, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)
    return kl.mean() * (T * T)


@TERMS.register("kd")
class KD(Term):
    """Output distillation on logits; per pixel on segmentation logits (B, C, H, W): the KL over
    classes averaged over batch and pixels.

    Options: ``T`` temperature (> 0). The weight (and its linear annealing from ``weight`` to
    ``weight_end``, the MFD supplement's 1.2) is set in the term's config.
    """

    tasks = ("classification", "segmentation")
    needs_features = False

    def __init__(self, T: Annotated[float, Range(gt=0)] = 4.0):
        super().__init__()
        self.T = T

    def forward(self, inp: TermInput) -> torch.Tensor:
        return kd_loss(inp.student.logits, inp.teacher.logits, self.T)
