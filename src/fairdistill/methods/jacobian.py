"""Jacobian matching (Srinivas & Fleuret, "Knowledge Transfer with Jacobian Matching", ICML 2018).

Matches the input gradients of the target-class logit, each L2-normalised per sample:
L = mean_b || J_s/||J_s||_2 - J_t/||J_t||_2 ||_2^2 with J = d z_y / d x (the paper's squared
error on normalised Jacobians, one class to avoid the full Jacobian). KD-Zoo's ``Sobolev``
takes the mean over elements instead, i.e. this value divided by the input size C*H*W.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import TrainingError
from .base import TERMS, Term, TermInput

__all__ = ["Jacobian", "input_gradient", "jacobian_loss"]


def input_gradient(logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """d z_{b, y_b} / d x_b for every sample b, via one backward of the summed target logits.

    Exact per sample when samples do not interact; with BatchNorm in train mode the batch
    statistics add the small cross-sample terms d z_{b'} / d x_b, as in the reference code.
    ``create_graph=True`` keeps the graph so the loss can be differentiated again (student).
    """
    if not x.requires_grad:
        raise TrainingError(
            "jacobian: the input batch does not require grad; the trainer must honour the term's input_grad flag."
        )
    if logits.grad_fn is None:
        raise TrainingError(
            "jacobian: these logits carry no graph back to the input; the trainer must run this model "
            "with autograd (the term's teacher_grad flag)."
        )
    target = logits.gather(1, y.view(-1, 1)).sum()
    (grad,) = torch.autograd.grad(target, x, create_graph=create_graph)
    return grad


def jacobian_loss(student_grad: torch.Tensor, teacher_grad: torch.Tensor) -> torch.Tensor:
    """mean over the batch of the squared L2 distance of per-sample L2-normalised gradients."""
    if student_grad.shape != teacher_grad.shape:
        raise ValueError(
            f"jacobian_loss: gradients {tuple(student_grad.shape)} and {tuple(teacher_grad.shape)} differ in shape"
        )
    s = F.normalize(student_grad.flatten(1), dim=1)
    t = F.normalize(teacher_grad.flatten(1), dim=1)
    return (s - t).pow(2).sum(1).mean()


@TERMS.register("jacobian")
class Jacobian(Term):
    """Jacobian matching term (unweighted). No options.

    The teacher's gradient is taken without a graph (it is a constant target); the student's
    with ``create_graph`` so training back-propagates through it (double backprop).
    """

    tasks = ("classification",)
    teacher_grad = True
    input_grad = True

    def teacher_fields(self) -> tuple[str, ...]:
        return ("logits",)

    def forward(self, inp: TermInput) -> torch.Tensor:
        j_t = input_gradient(inp.teacher.logits, inp.y, inp.x, create_graph=False)
        j_s = input_gradient(inp.student.logits, inp.y, inp.x, create_graph=True)
        return jacobian_loss(j_s, j_t.detach())
