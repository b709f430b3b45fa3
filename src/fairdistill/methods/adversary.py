"""AD: adversarial debiasing as the MFD paper's baseline (reference ``mfd.md`` §5.7).

One adversary per class c sees the classifier's raw logits of the batch samples whose true
label is c and predicts their group. The logits pass a gradient-reversal layer (Ganin &
Lempitsky, ICML 2015): identity forward, gradient times ``-grl_lambda`` backward, so a single
backward pass trains the adversaries to predict the group and the classifier to hide it.
Conditioning on the label by one adversary per class targets equal opportunity / equalised
odds rather than demographic parity.
"""
from __future__ import annotations

import math

from typing import Annotated

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
    """``num_adversaries`` two-layer MLPs Linear(in, hidden) -> ReLU -> Linear(hidden, out), kept
    as stacked weights; sample i is scored by adversary ``index[i]`` in one batched pass.

    Weights are stored as nn.Linear stores them, (K, out, in), and initialised like nn.Linear:
    uniform in +-1/sqrt(fan_in) for weights and biases.
    """

    def __init__(self, num_adversaries: int, in_features: int, hidden: int, out_features: int):
        super().__init__()
        self.weight1 = nn.Parameter(torch.empty(num_adversaries, hidden, in_features))
        self.bias1 = nn.Parameter(torch.empty(num_adversaries, hidden))
        self.weight2 = nn.Parameter(torch.empty(num_adversaries, out_features, hidden))
        self.bias2 = nn.Parameter(torch.empty(num_adversaries, out_features))
        for w, b, fan_in in ((self.weight1, self.bias1, in_features), (self.weight2, self.bias2, hidden)):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    def forward(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Scores (B, out) of each row of ``x`` (B, in) by adversary ``index`` (B,)."""
        h = torch.relu(torch.einsum("bi,bhi->bh", x, self.weight1[index]) + self.bias1[index])
        return torch.einsum("bh,boh->bo", h, self.weight2[index]) + self.bias2[index]


def adversary_loss(group_logits: torch.Tensor, groups: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Sum over the classes present in the batch of the mean group cross-entropy of that class's
    samples: sum_c mean_{i: y_i = c} CE(a_c(z_i), g_i), as the official trainer sums its
    per-adversary ``CrossEntropyLoss()`` means. Equal to sum_i CE_i / n_{y_i}."""
    ce = F.cross_entropy(group_logits.float(), groups, reduction="none")
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
    Reads only the student's logits. The adversaries have their own Adam optimizer; the official
    code additionally stepped a ReduceLROnPlateau per adversary on its test loss (not done here:
    a trainer matter). With one stacked optimizer, Adam's moments still move the weights of a
    class absent from a batch, where the official per-class optimizers saw a zero gradient too.

    Options:
        grl_lambda: gradient-reversal scale (> 0); official ``--adv-lambda``, default 2.0.
        hidden:     hidden width of each adversary MLP (>= 1), default 32.
        lr:         learning rate of the adversaries' Adam (> 0, no weight decay, other Adam
                    settings as the stage's). Default 0.003, the value the MFD supplement
                    states; the official code's default ``--eta`` was 3e-4.
    """

    needs_teacher = False
    needs_features = False

    def __init__(self, grl_lambda: Annotated[float, Range(gt=0)] = 2.0, hidden: Annotated[int, Range(ge=1)] = 32,
                 lr: Annotated[float, Range(gt=0)] = 0.003):
        super().__init__()
        self.grl_lambda, self.hidden = grl_lambda, hidden
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

    def forward(self, inp: TermInput) -> torch.Tensor:
        z = reverse_gradient(inp.student.logits, self.grl_lambda)
        return adversary_loss(self.adversaries(z, inp.y), inp.g, inp.y, self.num_classes)
