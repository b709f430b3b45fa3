"""MFD: maximum-mean-discrepancy feature distillation (Jung et al., CVPR 2021).

The student's feature distribution of every (class, group) cell is pulled towards the teacher's
feature distribution of that class, all groups pooled, by a biased MMD^2 with one kernel
bandwidth per batch (reference ``mfd.md`` §1.2-1.3):

    L_MFD = lambda / 2 * sum_{c, g present} MMD^2(T_c, S_{c,g})
    MMD^2(T, S) = mean K(T, T) + mean K(S, S) - 2 mean K(T, S)

All kernel matrices are computed once for the whole batch; the per-cell means are read off
with one-hot cell-membership matrices (sum over a cell pair = M_a^T K M_b), so the cost does
not grow with the number of cells in Python.
"""
from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..registry import Range
from .base import TERMS, SetupContext, Term, TermInput

KERNELS = ("rbf", "poly")
DIST_EPS = 1e-12
"""Lower clamp of squared distances, as the official code's ``pdist``."""


def _squared_distances(a: torch.Tensor, b: torch.Tensor, a_sq: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """||a_i||^2 + ||b_j||^2 - 2 a_i.b_j (squared norms given), clamped at ``DIST_EPS``."""
    return torch.addmm(a_sq[:, None] + b_sq[None, :], a, b.t(), alpha=-2).clamp_min(DIST_EPS)


def kernel_matrices(
    student_feat: torch.Tensor, teacher_feat: torch.Tensor, sigma: float = 1.0, kernel: str = "rbf"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(K_tt, K_ss, K_ts)`` over the whole batch, features flattened per sample.

    rbf:  k(a, b) = exp(-||a - b||^2 / (2 sigma sbar)), sbar = mean squared teacher-student
          distance over all B x B pairs (same-sample pairs included), taken without gradient.
    poly: k(a, b) = (a.b)^2 on L2-normalised features.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    if student_feat.shape[0] != teacher_feat.shape[0]:
        raise ValueError(f"student batch {student_feat.shape[0]} != teacher batch {teacher_feat.shape[0]}")
    s = student_feat.reshape(student_feat.shape[0], -1)
    t = teacher_feat.reshape(teacher_feat.shape[0], -1)
    if s.shape[1] != t.shape[1]:
        raise ValueError(f"student features have {s.shape[1]} dims per sample, teacher features {t.shape[1]}")
    if s.dtype in (torch.float16, torch.bfloat16):
        s, t = s.float(), t.float()
    t = t.to(s.dtype)
    if kernel == "poly":
        s, t = F.normalize(s, dim=1), F.normalize(t, dim=1)
        return (t @ t.t()).pow(2), (s @ s.t()).pow(2), (t @ s.t()).pow(2)
    s_sq, t_sq = s.pow(2).sum(1), t.pow(2).sum(1)
    d_ts = _squared_distances(t, s, t_sq, s_sq)
    scale = -1.0 / (2 * sigma * d_ts.detach().mean())
    return (
        torch.exp(_squared_distances(t, t, t_sq, t_sq) * scale),
        torch.exp(_squared_distances(s, s, s_sq, s_sq) * scale),
        torch.exp(d_ts * scale),
    )


def mmd_loss(
    student_feat: torch.Tensor,
    teacher_feat: torch.Tensor,
    labels: torch.Tensor,
    groups: torch.Tensor,
    sigma: float = 1.0,
    kernel: str = "rbf",
    num_classes: int | None = None,
    num_groups: int | None = None,
) -> torch.Tensor:
    """Sum over the (class, group) cells present in the batch of the biased MMD^2 between the
    teacher's class-c features (all groups) and the student's class-c, group-g features.

    ``num_classes`` / ``num_groups`` default to ``max + 1`` of ``labels`` / ``groups``.
    Unweighted: the MFD objective is ``lambda / 2`` times this (reference ``mfd.md`` §1.3).
    Half-precision features are computed in float32; under autocast, call it with autocast off
    (the MFD term declares ``autocast = False``, so the objective does).
    """
    k_tt, k_ss, k_ts = kernel_matrices(student_feat, teacher_feat, sigma, kernel)
    labels, groups = labels.reshape(-1).long(), groups.reshape(-1).long()
    if labels.numel() != k_ss.shape[0] or groups.numel() != k_ss.shape[0]:
        raise ValueError(
            f"{k_ss.shape[0]} feature rows but {labels.numel()} labels and {groups.numel()} groups"
        )
    n_cls = int(num_classes) if num_classes is not None else int(labels.max()) + 1
    n_grp = int(num_groups) if num_groups is not None else int(groups.max()) + 1
    member_s = F.one_hot(labels * n_grp + groups, n_cls * n_grp).to(k_ss.dtype)  # B x CG
    member_t = F.one_hot(labels, n_cls).to(k_ss.dtype)  # B x C
    member_t_cell = member_t.repeat_interleave(n_grp, dim=1)  # column c*G+g = class c
    n_s = member_s.sum(0)
    n_t = member_t_cell.sum(0)
    sum_ss = ((k_ss @ member_s) * member_s).sum(0)
    sum_tt = ((k_tt @ member_t) * member_t).sum(0).repeat_interleave(n_grp)
    sum_ts = ((k_ts @ member_s) * member_t_cell).sum(0)
    present = n_s > 0
    n_s, n_t = n_s.clamp_min(1), n_t.clamp_min(1)
    per_cell = sum_tt / n_t**2 + sum_ss / n_s**2 - 2 * sum_ts / (n_t * n_s)
    return torch.where(present, per_cell, torch.zeros_like(per_cell)).sum()


def joint_mmd_loss(
    student_feat: torch.Tensor, teacher_feat: torch.Tensor, sigma: float = 1.0, kernel: str = "rbf"
) -> torch.Tensor:
    """One biased MMD^2 between all teacher and all student features of the batch, without
    conditioning on class or group (the official ``--jointfeature`` ablation)."""
    k_tt, k_ss, k_ts = kernel_matrices(student_feat, teacher_feat, sigma, kernel)
    return k_tt.mean() + k_ss.mean() - 2 * k_ts.mean()


def embedding_connector(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> nn.Module:
    """A linear map from student to teacher embeddings (per-sample shapes): ``nn.Linear`` for
    vectors, a 1x1 ``nn.Conv2d`` (the same linear map at every position) for feature maps of one
    spatial size, else ``nn.Linear`` on the flattened embeddings; PyTorch's initialisation."""
    if len(student_shape) == 1 and len(teacher_shape) == 1:
        return nn.Linear(student_shape[0], teacher_shape[0])
    if len(student_shape) == 3 and len(teacher_shape) == 3 and student_shape[1:] == teacher_shape[1:]:
        return nn.Conv2d(student_shape[0], teacher_shape[0], kernel_size=1)
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(student_shape), math.prod(teacher_shape)))


@TERMS.register("mfd")
class MFD(Term):
    """MFD term: ``(1/2) * mmd_loss`` on the student's and the frozen teacher's ``embedding``.

    The configured weight is the paper's lambda (3 / 3 / 7 for CIFAR-10S / UTKFace / CelebA).
    The official features are the un-pooled last feature map for ResNet-18 and ShuffleNetV2
    (zoo option ``embedding="map"``) and ReLU(fc1) for the CIFAR-10S CNN (``mfd.md`` §1.1).
    The method's preset should also run the balanced (group, label) sampler and keep the
    teacher's BatchNorm in eval mode (``teacher.bn_mode=eval``), as the official code does.

    Options:
        sigma:  bandwidth multiplier (> 0) of the batch mean squared teacher-student distance
                (rbf kernel only). Default 1.0.
        kernel: "rbf" (default) or "poly".
        joint:  True for the unconditioned ablation: a single MMD^2 between all teacher and all
                student features. Default False.
        connector: "none" (default, the paper: the embeddings are compared as they are, so they
                must have as many values) or "linear": a linear map of the student's embedding
                to the teacher's width (:func:`embedding_connector`), trained with the student.
                A deviation from the paper, which distils between equal architectures: it lets
                a ResNet-18 student (512-d) learn from a ResNet-50 teacher (2048-d).
    """

    tasks = ("classification",)
    needs_teacher = True
    needs_features = True
    autocast = False  # kernel matrices and their exponentials in float32

    def __init__(self, sigma: Annotated[float, Range(gt=0)] = 1.0, kernel: Literal["rbf", "poly"] = "rbf",
                 joint: bool = False, connector: Literal["none", "linear"] = "none"):
        super().__init__()
        self.sigma, self.kernel, self.joint, self.connector_kind = sigma, kernel, joint, connector
        self.connector: nn.Module | None = None
        self.num_classes: int | None = None
        self.num_groups: int | None = None

    def setup(self, ctx: SetupContext) -> None:
        s = ctx.student_features.embedding
        t = ctx.teacher_features.embedding if ctx.teacher_features is not None else None
        if t is None:
            raise ConfigError("mfd: needs a teacher (set teacher in the config)")
        ds, dt = s[0].numel(), t[0].numel()
        if self.connector_kind == "linear":
            self.connector = embedding_connector(tuple(s.shape[1:]), tuple(t.shape[1:])).to(ctx.device)
        elif ds != dt:
            raise ConfigError(
                f"mfd: the student's embedding has {ds} values per sample and the teacher's {dt}; "
                f"MFD compares them directly: use a teacher with the student's architecture, or set "
                f"terms.mfd.connector=linear (a linear map to the teacher's width, trained with the student)"
            )
        self.num_classes, self.num_groups = ctx.num_classes, ctx.num_groups

    def teacher_fields(self) -> tuple[str, ...]:
        return ("embedding",)

    def forward(self, inp: TermInput) -> torch.Tensor:
        s, t = inp.student.embedding, inp.teacher.embedding.detach()
        if self.connector is not None:
            s = self.connector(s)
        if self.joint:
            return 0.5 * joint_mmd_loss(s, t, self.sigma, self.kernel)
        return 0.5 * mmd_loss(
            s, t, inp.y, inp.g, self.sigma, self.kernel, num_classes=self.num_classes, num_groups=self.num_groups
        )
