"""Activation Boundary distillation (Heo et al., "Knowledge Transfer via Distillation of
Activation Boundaries Formed by Hidden Neurons", AAAI 2019).

The student's pre-ReLU response r(S) is pushed to the teacher's side of the activation
boundary with a margin mu: the alternative L2 loss (AB Eq. 6 / official
``criterion_alternative_L2``), per element
  (s + mu)^2  where t <= 0 and s > -mu,
  (s - mu)^2  where t > 0  and s <= mu,
  0           otherwise,
summed. The term weights layer i by 2^(i-N+1) and divides by the batch size; the official
3/1000 factor is the config weight. AB runs as an initialisation stage (AB loss alone, CE
weight 0, student + connectors trained), followed by ordinary (KD or CE) training.
"""
from __future__ import annotations

from typing import Annotated

import torch
from torch import nn

from ..registry import Range
from .base import TERMS, SetupContext, Term, TermInput
from .connector import Connector
from .features import Position, Positions, check_same_spatial, paired_stages, resolve_positions
from .fields import stage_field

__all__ = ["AB", "ab_loss"]


def ab_loss(source: torch.Tensor, target: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Alternative L2 loss of AB (Eq. 6), summed over every element of ``source``/``target``."""
    if source.shape != target.shape:
        raise ValueError(f"ab_loss: source {tuple(source.shape)} and target {tuple(target.shape)} differ in shape")
    s = source.to(torch.promote_types(source.dtype, torch.float32))
    active = target > 0
    below = (s + margin).pow(2) * (~active & (s > -margin))
    above = (s - margin).pow(2) * (active & (s <= margin))
    return (below + above).sum()


@TERMS.register("ab")
class AB(Term):
    """AB loss over the chosen stages through OFD connectors (unweighted; weight 3/1000).

    L = (1/B) * sum_i ab_loss(r_i(S_i), T_i, margin) * 2^(i-N+1) (official CIFAR script).

    Options:
      position: "prerelu" (default; AB is defined on pre-ReLU responses) or "block".
      positions: "all" (default), "last" or a list of stage indices.
      margin: mu > 0 (default 1.0).
    Stage counts and spatial sizes of the chosen stages must match (ConfigError otherwise).
    """

    def __init__(self, position: Position = "prerelu", positions: Positions = "all",
                 margin: Annotated[float, Range(gt=0)] = 1.0):
        super().__init__()
        self.position, self.positions, self.margin = position, positions, margin
        self.connectors = nn.ModuleList()
        self.indices: list[int] = []
        self.num_stages = 0

    def setup(self, ctx: SetupContext) -> None:
        s_feats, t_feats = paired_stages(ctx.student_features, ctx.teacher_features, self.position, "ab")
        self.num_stages = len(t_feats)
        self.indices = resolve_positions(self.positions, self.num_stages, "ab.positions")
        self.connectors = nn.ModuleList()
        for i in self.indices:
            check_same_spatial(s_feats[i], t_feats[i], i, "ab")
            self.connectors.append(Connector(s_feats[i].shape[1], t_feats[i].shape[1]).to(ctx.device))

    def teacher_fields(self) -> tuple[str, ...]:
        return tuple(stage_field(self.position, i) for i in self.indices)

    def forward(self, inp: TermInput) -> torch.Tensor:
        s_feats, t_feats = paired_stages(inp.student, inp.teacher, self.position, "ab")
        total = 0.0
        for j, i in enumerate(self.indices):
            loss = ab_loss(self.connectors[j](s_feats[i]), t_feats[i].detach(), self.margin)
            total = total + loss / 2 ** (self.num_stages - 1 - i)
        return total / s_feats[0].shape[0]
