"""Attention Transfer (Zagoruyko & Komodakis, ICLR 2017), activation-based, p = 2.

In the form of the official code (``attention-transfer/utils.py``): the attention map is the
channel mean of the squared activations, flattened and L2-normalised per sample; the loss is
the mean squared difference of the maps (the paper's beta/2 and p-norm are folded into the
config weight beta = 1000). Because the maps are unit vectors and the loss is a mean over the
H*W positions, the same beta acts more strongly at lower resolution: at 16 px a quarter of 32
px's positions make 1000 act like 4000 (``configs/digits_s_ofd/at.yaml`` uses 250).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import TERMS, SetupContext, Term, TermInput
from .features import Position, Positions, match_spatial, paired_stages, resolve_positions
from .fields import stage_field

__all__ = ["AT", "at_loss", "attention_map"]


def attention_map(feature: torch.Tensor) -> torch.Tensor:
    """Q = vec(mean_c A_c^2) / ||vec(mean_c A_c^2)||_2, shape (B, H*W) (AT Eq. 2 with p = 2)."""
    return F.normalize(feature.pow(2).mean(1).flatten(1), dim=1)


def at_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """mean over batch and positions of (Q_s - Q_t)^2 (AT Eq. 2, official code form).

    Features are (B, C, H, W); channel counts may differ, spatial sizes must match.
    """
    if student_feat.shape[0] != teacher_feat.shape[0] or student_feat.shape[2:] != teacher_feat.shape[2:]:
        raise ValueError(
            f"at_loss: student {tuple(student_feat.shape)} and teacher {tuple(teacher_feat.shape)} "
            "must agree in batch and spatial size"
        )
    return (attention_map(student_feat) - attention_map(teacher_feat)).pow(2).mean()


@TERMS.register("at")
class AT(Term):
    """Sum of :func:`at_loss` over the chosen stages (unweighted; config weight beta = 1000).

    Options:
      position: "block" (stage outputs, as AT; default) or "prerelu" (OFD supplement Table 1).
      positions: "all" (default, every stage as the official code), "last" (the single layer
        of the MFD code), or a list of stage indices.
    Where spatial sizes differ, the larger map is adaptive-average-pooled to the smaller
    (as RepDistiller).
    """

    def __init__(self, position: Position = "block", positions: Positions = "all"):
        super().__init__()
        self.position, self.positions = position, positions
        self.indices: list[int] = []

    def setup(self, ctx: SetupContext) -> None:
        s, _ = paired_stages(ctx.student_features, ctx.teacher_features, self.position, "at")
        self.indices = resolve_positions(self.positions, len(s), "at.positions")

    def teacher_fields(self) -> tuple[str, ...]:
        return tuple(stage_field(self.position, i) for i in self.indices)

    def forward(self, inp: TermInput) -> torch.Tensor:
        s_feats, t_feats = paired_stages(inp.student, inp.teacher, self.position, "at")
        total = 0.0
        for i in self.indices:
            total = total + at_loss(*match_spatial(s_feats[i], t_feats[i].detach()))
        return total
