"""AD: adversarial debiasing as the MFD paper's baseline (reference ``mfd.md`` §5.7).

One adversary per class c sees the classifier's raw logits of the batch samples whose true
label is c and predicts their group. The logits pass a gradient-reversal layer (Ganin &
Lempitsky, ICML 2015): identity forward, gradient times ``-grl_lambda`` backward, so a single
backward pass trains the adversaries to predict the group and the classifier to hide it.
Conditioning on the label by one adversary per class targets equal opportunity / equalised
odds rather than demographic parity.
"""
from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..registry import Range
from .base import TERMS, SetupContext, Term, TermInput


class GradientReversal(torch.autograd.Function):
    """Identity in the forward pass; multiplies the incoming gradient by ``-scale`` backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.neg() * ctx.scale, None


def reverse_gradient(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``x`` unchanged, with its gradient multiplied by ``-scale`` on the way back."""
    return GradientReversal.apply(x, scale)


class ClasswiseAdversaries(nn.Module):
    """``num_adversaries`` two-layer MLPs Linear(in, hidden) -> ReLU -> Linear(hidden, out), the
    official ``networks/mlp.py`` (0fb86d7) structure, each with its own parameter tensors
    (``mlps[k]``, initialised by nn.Linear, in the official creation order), so that one
    per-parameter optimizer keeps per-adversary state exactly as the official K Adam instances.

    ``forward(x, index, classes)`` scores sample i by adversary ``index[i]`` in one batched pass
    over the weights of the adversaries in ``classes`` stacked for this call; the adversaries not
    in ``classes`` take no part in the autograd graph, so their gradients stay None and Adam
    neither moves them nor advances their step count.
    """

    def __init__(self, num_adversaries: int, in_features: int, hidden: int, out_features: int):
        super().__init__()
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_features))
            for _ in range(num_adversaries)
        )

    def forward(self, x: torch.Tensor, index: torch.Tensor, classes: list[int] | None = None) -> torch.Tensor:
        """Scores (B, out) of each row of ``x`` (B, in) by adversary ``index`` (B,); ``classes``
        (default: the distinct values of ``index``, one host sync) are the adversaries in the
        graph and must include every value of ``index``."""
        if classes is None:
            classes = torch.unique(index).tolist()
        slot = torch.full((len(self.mlps),), -1, dtype=torch.long, device=index.device)
        slot[classes] = torch.arange(len(classes), device=index.device)
        local = slot[index]
        first = [self.mlps[k][0] for k in classes]
        second = [self.mlps[k][2] for k in classes]
        w1, b1 = torch.stack([m.weight for m in first])[local], torch.stack([m.bias for m in first])[local]
        w2, b2 = torch.stack([m.weight for m in second])[local], torch.stack([m.bias for m in second])[local]
        h = torch.relu(torch.einsum("bi,bhi->bh", x, w1) + b1)
        return torch.einsum("bh,boh->bo", h, w2) + b2


def adversary_loss(group_logits: torch.Tensor, groups: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Sum over the classes present in the batch of the mean group cross-entropy of that class's
    samples: sum_c mean_{i: y_i = c} CE(a_c(z_i), g_i), as the official trainer sums its
    per-adversary ``CrossEntropyLoss()`` means. Equal to sum_i CE_i / n_{y_i}. Computed in the
    scores' dtype (float32 under autocast, where cross-entropy runs in float32)."""
    ce = F.cross_entropy(group_logits, groups, reduction="none")
    counts = torch.bincount(labels, minlength=num_classes).to(ce.dtype)
    return (ce / counts[labels]).sum()


@TERMS.register("adversary")
class Adversary(Term):
    """Adversarial-debiasing term: the per-class adversaries' loss, behind a gradient reversal.

    Returns ``adversary_loss`` (per-class CE means summed over classes, as the official code).
    Both the adversaries and, reversed and scaled by ``grl_lambda``, the student receive the
    gradient of ``weight * loss``. In the official code the loss enters with weight 1 and
    ``--adv-lambda`` (the GRL scale) is the only strength; since Adam is invariant to the scale
    of the adversaries' own gradient, ``weight=1, grl_lambda=lambda`` reproduces that run.
    Reads only the student's logits. The adversaries have their own Adam optimizer, one state per
    parameter tensor of each adversary, so it equals the official one Adam per class; the official
    code additionally stepped a ReduceLROnPlateau per adversary on its test loss (not done here:
    a trainer matter; docs/fidelity.md).

    A class absent from a batch contributes no loss, and the official per-class Adams then
    behave as PyTorch's ``zero_grad`` leaves the gradients (``absent_class``):
    ``skip`` (default): the absent class's adversary is not stepped at all (parameters, moments
    and step count unchanged): the official code under PyTorch >= 2.0, whose ``zero_grad`` sets
    gradients to None. ``step``: once its class has appeared in some batch, an absent class's
    adversary takes an Adam step on a zero gradient (moments decay, the parameters still move,
    the count advances); before its first appearance it is not stepped: the official code under
    PyTorch 1.6 (the MFD README's version), whose ``zero_grad`` zeroes gradients in place. Which
    classes have appeared is the buffer ``seen`` (checkpointed). Both are exact for one process;
    under DDP a class counts as present when it is in any process's batch (for ``skip``: DDP
    fills the gradient of a parameter used by another process), and ``seen`` is per process.

    Options:
        grl_lambda: gradient-reversal scale (> 0); official ``--adv-lambda``, default 2.0.
        hidden:     hidden width of each adversary MLP (>= 1), default 32.
        lr:         learning rate of the adversaries' Adam (> 0, no weight decay, other Adam
                    settings as the stage's). Default 0.003, the value the MFD supplement
                    states; the official code's default ``--eta`` was 3e-4.
        absent_class: "skip" or "step", the update of an adversary whose class is absent
                    from the batch (above).
    """

    tasks = ("classification",)
    needs_teacher = False
    needs_features = False

    def __init__(self, grl_lambda: Annotated[float, Range(gt=0)] = 2.0, hidden: Annotated[int, Range(ge=1)] = 32,
                 lr: Annotated[float, Range(gt=0)] = 0.003, absent_class: Literal["skip", "step"] = "skip"):
        super().__init__()
        self.grl_lambda, self.hidden, self.absent_class = grl_lambda, hidden, absent_class
        self.optimizer = {"name": "adam", "lr": lr, "weight_decay": 0.0}
        self.num_classes = 0
        self.adversaries: ClasswiseAdversaries | None = None

    def setup(self, ctx: SetupContext) -> None:
        if ctx.num_groups < 2:
            raise ConfigError(
                f"adversary: the data set has {ctx.num_groups} group(s); adversarial debiasing needs "
                f"a sensitive attribute with at least 2 groups"
            )
        self.num_classes = ctx.num_classes
        in_features = ctx.student_features.logits.shape[1]
        self.adversaries = ClasswiseAdversaries(ctx.num_classes, in_features, self.hidden, ctx.num_groups).to(
            ctx.device
        )
        self.register_buffer("seen", torch.zeros(ctx.num_classes, dtype=torch.bool, device=ctx.device))

    def forward(self, inp: TermInput) -> torch.Tensor:
        present = torch.bincount(inp.y, minlength=self.num_classes) > 0
        if self.absent_class == "step":
            if self.training and torch.is_grad_enabled():
                self.seen |= present
            present = present | self.seen
        classes = present.nonzero()[:, 0].tolist()
        if not classes:  # an empty batch (a process's share of a short last batch)
            return inp.student.logits.sum() * 0.0
        z = reverse_gradient(inp.student.logits, self.grl_lambda)
        return adversary_loss(self.adversaries(z, inp.y, classes), inp.g, inp.y, self.num_classes)
