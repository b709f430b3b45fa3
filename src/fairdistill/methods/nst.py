"""Neuron Selectivity Transfer (Huang & Wang, "Like What You Like", arXiv 1707.01219).

Each channel's spatial response, L2-normalised, is one sample of the layer's distribution;
NST matches student and teacher distributions with the biased squared MMD (NST Eq. 4) under
the polynomial kernel k(a, b) = (a^T b)^2 (d = 2, c = 0):
  MMD^2 = mean_{i,i'} k(s_i, s_i') + mean_{j,j'} k(t_j, t_j') - 2 mean_{i,j} k(s_i, t_j),
averaged over the batch. The teacher-teacher term is kept (constant for the student, so the
gradient is that of the official code, which drops it). Config weight 50.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import TERMS, SetupContext, Term, TermInput
from .connectors import POSITIONS, check_choice, check_positions, match_spatial, paired_stages, resolve_positions

__all__ = ["NST", "nst_loss", "poly_kernel"]


def poly_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """k(a_i, b_j) = (a_i^T b_j)^2 for (B, n, D) and (B, m, D) -> (B, n, m)."""
    return torch.bmm(a, b.transpose(1, 2)).pow(2)


def nst_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """Biased MMD^2 of the channel vectors (NST Eq. 4, polynomial kernel), mean over batch.

    Features are (B, C, ...) with equal spatial sizes; channel counts may differ. Each of the
    C vectors of length H*W is L2-normalised. 2-D (B, D) features give H*W = 1 (degenerate,
    as the MFD code on a vector embedding).
    """
    if student_feat.shape[0] != teacher_feat.shape[0] or student_feat.shape[2:] != teacher_feat.shape[2:]:
        raise ValueError(
            f"nst_loss: student {tuple(student_feat.shape)} and teacher {tuple(teacher_feat.shape)} "
            "must agree in batch and spatial size"
        )
    s = F.normalize(student_feat.flatten(2) if student_feat.dim() > 2 else student_feat[..., None], dim=2)
    t = F.normalize(teacher_feat.flatten(2) if teacher_feat.dim() > 2 else teacher_feat[..., None], dim=2)
    mmd = poly_kernel(s, s).mean((1, 2)) + poly_kernel(t, t).mean((1, 2)) - 2 * poly_kernel(s, t).mean((1, 2))
    return mmd.mean()


@TERMS.register("nst")
class NST(Term):
    """Sum of :func:`nst_loss` over the chosen positions (unweighted; config weight 50).

    Options:
      feature: "stage" (default) or "embedding" (the penultimate features, as the MFD code).
      position: "block" (default, stage outputs as RepDistiller and MFD) or "prerelu" (the
        official NST: the last feature map after BN, before the ReLU).
      positions: "last" (default, the official single layer), "all" (RepDistiller) or a list.
    Where spatial sizes differ, the larger map is adaptive-average-pooled to the smaller.
    """

    def __init__(self, feature: str = "stage", position: str = "block", positions="last"):
        super().__init__()
        self.feature = check_choice(feature, ("stage", "embedding"), "nst.feature")
        self.position = check_choice(position, POSITIONS, "nst.position")
        self.positions = check_positions(positions, "nst.positions")
        self.indices: list[int] = []

    def _pairs(self, student, teacher) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self.feature == "embedding":
            return [(student.embedding, teacher.embedding)]
        s_feats, t_feats = paired_stages(student, teacher, self.position, "nst")
        return [(s_feats[i], t_feats[i]) for i in self.indices]

    def setup(self, ctx: SetupContext) -> None:
        if self.feature == "stage":
            s, _ = paired_stages(ctx.student_features, ctx.teacher_features, self.position, "nst")
            self.indices = resolve_positions(self.positions, len(s), "nst.positions")

    def forward(self, inp: TermInput) -> torch.Tensor:
        total = 0.0
        for s, t in self._pairs(inp.student, inp.teacher):
            total = total + nst_loss(*match_spatial(s, t.detach()))
        return total
