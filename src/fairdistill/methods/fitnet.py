"""FitNets: hints for thin deep nets (Romero et al., ICLR 2015).

The guided student layer, through a regressor r, is pulled to the teacher's hint layer:
L_HT = 1/2 ||F_t - r(F_s)||^2 (FitNets Eq. 3). The norm is taken as a mean over all elements
(so 1/2 * MSE), which is also the MFD code's FitNet on embeddings (reference/mfd.md §5.3).
RepDistiller's ``HintLoss`` is MSE without the 1/2, so its beta = 100 is weight 200 here.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..errors import ConfigError
from .base import TERMS, SetupContext, Term, TermInput
from .features import Position, paired_stages
from .fields import stage_field

__all__ = ["FitNetHint", "hint_loss", "hint_regressor"]


def hint_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """1/2 * mean((F_s - F_t)^2) over all elements (FitNets Eq. 3, mean reduction)."""
    if student_feat.shape != teacher_feat.shape:
        raise ValueError(
            f"hint_loss: student {tuple(student_feat.shape)} and teacher {tuple(teacher_feat.shape)} differ in shape"
        )
    return 0.5 * (student_feat - teacher_feat).pow(2).mean()


def hint_regressor(s_shape: torch.Size, t_shape: torch.Size, relu: bool, key: str) -> nn.Module:
    """A regressor from student shape (B, C_s, H_s, W_s) to the teacher's (B, C_t, H_t, W_t).

    As RepDistiller's ``ConvReg``: a 3x3 stride-2 conv when the student map is twice the
    teacher's, a 4x4 stride-2 transposed conv when it is half, else a conv of kernel
    (1 + H_s - H_t, 1 + W_s - W_t); then BN, and a ReLU when ``relu`` (the hint layer is
    post-activation, FitNets §2.2). 2-D (B, D) features get a linear map.
    """
    if len(s_shape) == 2 and len(t_shape) == 2:
        return nn.Linear(s_shape[1], t_shape[1])
    if len(s_shape) != 4 or len(t_shape) != 4:
        raise ConfigError(f"{key}: cannot regress a {tuple(s_shape)} feature onto a {tuple(t_shape)} one.")
    (cs, hs, ws), (ct, ht, wt) = s_shape[1:], t_shape[1:]
    if (hs, ws) == (2 * ht, 2 * wt):
        conv: nn.Module = nn.Conv2d(cs, ct, kernel_size=3, stride=2, padding=1)
    elif (2 * hs, 2 * ws) == (ht, wt):
        conv = nn.ConvTranspose2d(cs, ct, kernel_size=4, stride=2, padding=1)
    elif hs >= ht and ws >= wt:
        conv = nn.Conv2d(cs, ct, kernel_size=(1 + hs - ht, 1 + ws - wt))
    else:
        raise ConfigError(
            f"{key}: the student map {hs}x{ws} is smaller than the teacher's {ht}x{wt} (and not half "
            "of it); choose a deeper teacher stage or a shallower student stage (position_index)."
        )
    layers = [conv, nn.BatchNorm2d(ct)] + ([nn.ReLU()] if relu else [])
    return nn.Sequential(*layers)


@TERMS.register("fitnet-hint")
class FitNetHint(Term):
    """FitNets hint term :func:`hint_loss`(r(F_s), F_t) (unweighted).

    Options:
      feature: "stage" (default; stage ``position_index`` through a regressor) or "embedding"
        (the penultimate features; no regressor when the shapes match, as MFD's FitNet, whose
        mean over the flattened vector is the same number; a regressor otherwise).
      position: "block" (default; regressor ends in ReLU) or "prerelu" (regressor without ReLU).
      position_index: the stage index (default the middle stage, (N-1)//2: RepDistiller's
        hint layer 2 on 3-stage CIFAR nets). Used with feature "stage".
    FitNets' stage 1 is this term alone (CE weight 0); the regressor trains with the student.
    """

    def __init__(self, feature: Literal["stage", "embedding"] = "stage", position: Position = "block",
                 position_index: int | None = None):
        super().__init__()
        self.feature, self.position, self.position_index = feature, position, position_index
        self.index = 0
        self.regressor: nn.Module = nn.Identity()

    def _pair(self, student, teacher) -> tuple[torch.Tensor, torch.Tensor]:
        if self.feature == "embedding":
            return student.embedding, teacher.embedding
        s_feats, t_feats = paired_stages(student, teacher, self.position, "fitnet-hint")
        return s_feats[self.index], t_feats[self.index]

    def setup(self, ctx: SetupContext) -> None:
        if self.feature == "stage":
            n = len(paired_stages(ctx.student_features, ctx.teacher_features, self.position, "fitnet-hint")[0])
            index = (n - 1) // 2 if self.position_index is None else self.position_index
            if not -n <= index < n:
                raise ConfigError(
                    f"fitnet-hint.position_index: {index} is out of range for {n} stages (0..{n - 1})."
                )
            self.index = index % n
        s, t = self._pair(ctx.student_features, ctx.teacher_features)
        if s.shape[1:] == t.shape[1:] and self.feature == "embedding":
            self.regressor = nn.Identity()
        else:
            relu = self.feature == "stage" and self.position == "block"
            self.regressor = hint_regressor(s.shape, t.shape, relu, "fitnet-hint").to(ctx.device)

    def teacher_fields(self) -> tuple[str, ...]:
        return ("embedding",) if self.feature == "embedding" else (stage_field(self.position, self.index),)

    def forward(self, inp: TermInput) -> torch.Tensor:
        s, t = self._pair(inp.student, inp.teacher)
        return hint_loss(self.regressor(s), t.detach())
