"""OFD: "A Comprehensive Overhaul of Feature Distillation" (Heo et al., ICCV 2019).

Teacher transform: margin ReLU max(F_t, m) with a per-channel margin m (supplement Eq. 1-4);
student transform: :class:`~.connector.Connector`; distance: partial L2 (§3.4); positions: the
pre-ReLU end of every stage, layer i divided by 2^(N-1-i), summed and divided by the batch size
(supplement B, official ``Distiller.forward``). The config weight is alpha (1e-3 CIFAR, 1e-4
ImageNet). The official recipe runs the teacher's BN in train mode: its preset wants
``teacher.bn_mode = train``. In training, each stage runs as :func:`connector_partial_l2`, the
connector and the distance in one pass with the same value and gradients as the composition.
"""
from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import Range
from .base import TERMS, SetupContext, Term, TermInput
from .connector import Connector
from .features import Positions, check_same_spatial, paired_stages, resolve_positions
from .fields import stage_field
from .kernels import ConnectorPartialL2, PartialL2, update_running_stats

__all__ = ["OFD", "NegativeMean", "bn_margin", "connector_partial_l2", "partial_l2"]

PHI_MIN = 1e-3
"""Below this negative mass Phi(-beta/|gamma|) the official code uses the fallback -3|gamma|."""


def bn_margin(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Per-channel margin m = E[x | x < 0] for x ~ N(beta, gamma^2) (supplement Eq. 4).

    With s = |gamma|: m = beta - s * phi(beta/s) / Phi(-beta/s) where Phi(-beta/s) > 0.001,
    else -3 * s (the official ``get_margin_from_BN`` fallback). A channel with gamma = 0 is the
    point mass at beta, so m = min(beta, 0): beta where beta < 0 (the conditional mean, also
    the limit of Eq. 4 as s -> 0) and 0 otherwise (the limit of the fallback -3s). Computed in
    float64; the result has the dtype and device of ``weight``.
    """
    gamma = weight.detach().to("cpu", torch.float64)
    beta = bias.detach().to("cpu", torch.float64)
    s = gamma.abs()
    flat = s == 0
    safe_s = torch.where(flat, torch.ones_like(s), s)
    z = beta / safe_s
    mass = torch.special.ndtr(-z)
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    truncated = beta - safe_s * pdf / torch.where(mass > PHI_MIN, mass, torch.ones_like(mass))
    m = torch.where(mass > PHI_MIN, truncated, -3.0 * s)
    m = torch.where(flat, beta.clamp(max=0.0), m)
    return m.to(weight.device, weight.dtype)


def partial_l2(source: torch.Tensor, target: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """Partial L2 distance between S = r(F_s) and the margin-ReLU teacher (§3.4, Eq. 5-6).

    With T = max(F_t, m) per channel, sums (S - T)^2 over every element except where
    S <= T <= 0 (the student is already below a non-positive target): the kept elements are
    those with S > T or F_t > 0. ``source``/``target``: (N, C, ...) of one shape; ``margin``:
    C values (one per channel, negative). No mean is taken; the sum is in float32 at least.
    Gradients reach ``source`` only: the teacher side (``target``, ``margin``) is a constant.
    """
    if source.shape != target.shape:
        raise ValueError(f"partial_l2: source {tuple(source.shape)} and target {tuple(target.shape)} differ in shape")
    if source.dim() < 2 or margin.numel() != source.shape[1]:
        raise ValueError(
            f"partial_l2: expected (N, C, ...) features and C={source.shape[1] if source.dim() > 1 else '?'} "
            f"margins, got features {tuple(source.shape)} and {margin.numel()} margins"
        )
    if source.numel() == 0:
        return source.sum(dtype=torch.promote_types(source.dtype, torch.float32))
    return PartialL2.apply(source, target.detach(), margin.detach())


def connector_partial_l2(connector: Connector, source: torch.Tensor, target: torch.Tensor,
                         margin: torch.Tensor) -> torch.Tensor:
    """``partial_l2(connector(source), target, margin)``, fused when the connector's BN is in
    training mode: no tensor for the connector output or its gradient (the value, gradients and
    BN running statistics are those of the composition). When an input needs a gradient, the
    gradients are computed during this call and only scaled by the backward."""
    conv, bn = connector
    fusable = (
        connector.folds and source.dim() == 4 and source.numel() > 0 and margin.numel() == conv.out_channels
        and tuple(target.shape) == (source.shape[0], conv.out_channels, *source.shape[2:])
    )
    if not fusable:
        return partial_l2(connector(source), target, margin)
    loss, mean, var = ConnectorPartialL2.apply(
        source, conv.weight, bn.weight, bn.bias, target.detach(), margin.detach(), bn.eps)
    update_running_stats(bn, mean, var, source.numel() // source.shape[1])
    return loss


class NegativeMean:
    """Running per-channel E[F | F < 0] over feature batches (supplement Eq. 1, by averaging).

    Used where no BatchNorm precedes the ReLU. A channel with no negative value seen gets
    -3 * (its standard deviation), the same fallback as :func:`bn_margin` with std for gamma.
    """

    def __init__(self):
        self.neg_sum = self.neg_count = self.total = self.total_sq = None
        self.count = 0

    def update(self, feature: torch.Tensor) -> None:
        f = feature.detach().transpose(0, 1).reshape(feature.shape[1], -1).double()
        stats = (f.clamp(max=0).sum(1), (f < 0).sum(1).double(), f.sum(1), f.pow(2).sum(1))
        if self.neg_sum is None:
            self.neg_sum, self.neg_count, self.total, self.total_sq = stats
        else:
            self.neg_sum += stats[0]
            self.neg_count += stats[1]
            self.total += stats[2]
            self.total_sq += stats[3]
        self.count += f.shape[1]

    def value(self) -> torch.Tensor:
        if self.neg_sum is None:
            raise ValueError("NegativeMean: no feature was seen")
        mean = self.total / self.count
        std = (self.total_sq / self.count - mean * mean).clamp(min=0).sqrt()
        return torch.where(
            self.neg_count > 0, self.neg_sum / self.neg_count.clamp(min=1), -3.0 * std
        ).float()


@TERMS.register("ofd")
class OFD(Term):
    """OFD distillation loss (unweighted; the config weight is alpha).

    L = (1/B) * sum_i partial_l2(r_i(F_s,i), F_t,i, m_i) / d_i over the chosen stage
    indices i of N pre-ReLU stages, with d_i = 2^(N-1-i) (official CIFAR/ImageNet
    ``Distiller.forward``) or the configured dividers (the official segmentation code's
    ``loss_divider = [8, 4, 2, 1, 1, 16]``).

    Options:
      positions: "all" (multi-layer, default), "last" (single-layer variant, supplement
        Table 2) or a list of stage indices (weights keep their 2^-(N-1-i)).
      dividers: None (2^(N-1-i)) or one positive number per stage of the models (N values;
        those of the chosen positions are used).
      margin: "bn" (default): Eq. 4 from the teacher BN (``stage_bns()``) before each ReLU,
        estimated from training batches where that BN is None; "estimate": estimated
        everywhere (E[F_t | F_t < 0] per channel, teacher in eval mode, supplement A).
      estimate_batches: how many training batches the estimate reads (default: one pass).
    Student and teacher must have the same number of stages and equal spatial sizes at the
    chosen positions (ConfigError otherwise).
    """

    def __init__(self, positions: Positions = "all", margin: Literal["bn", "estimate"] = "bn",
                 estimate_batches: Annotated[int, Range(ge=1)] | None = None,
                 dividers: list[Annotated[float, Range(gt=0)]] | None = None):
        super().__init__()
        self.positions, self.margin, self.estimate_batches = positions, margin, estimate_batches
        self.dividers = dividers
        self.connectors = nn.ModuleList()
        self.indices: list[int] = []
        self.num_stages = 0

    def setup(self, ctx: SetupContext) -> None:
        s_feats, t_feats = paired_stages(ctx.student_features, ctx.teacher_features, "prerelu", "ofd")
        self.num_stages = len(t_feats)
        self.indices = resolve_positions(self.positions, self.num_stages, "ofd.positions")
        if self.dividers is not None and len(self.dividers) != self.num_stages:
            raise ConfigError(f"ofd.dividers: {len(self.dividers)} values for models with {self.num_stages} stages; "
                              "give one divider per stage")
        self.connectors = nn.ModuleList()
        for i in self.indices:
            check_same_spatial(s_feats[i], t_feats[i], i, "ofd")
            self.connectors.append(Connector(s_feats[i].shape[1], t_feats[i].shape[1]).to(ctx.device))
        for j, m in enumerate(self._margins(ctx, [t_feats[i].shape[1] for i in self.indices])):
            self.register_buffer(f"margin_{j}", m.to(ctx.device, torch.float32))

    def _margins(self, ctx: SetupContext, channels: list[int]) -> list[torch.Tensor]:
        bns = list(ctx.teacher.stage_bns()) if self.margin == "bn" else []
        if bns and len(bns) != self.num_stages:
            raise ConfigError(
                f"ofd.margin: the teacher's stage_bns() gives {len(bns)} entries for {self.num_stages} stages."
            )
        margins: list[torch.Tensor | None] = []
        for i, c in zip(self.indices, channels):
            bn = bns[i] if bns else None
            if bn is None:
                margins.append(None)
                continue
            if bn.num_features != c:
                raise ConfigError(
                    f"ofd.margin: the teacher's BN for stage {i} has {bn.num_features} channels but the "
                    f"stage feature has {c}; fix the model's stage_bns() or use margin: estimate."
                )
            weight = bn.weight if bn.weight is not None else torch.ones(c)
            bias = bn.bias if bn.bias is not None else torch.zeros(c)
            margins.append(bn_margin(weight, bias))
        missing = [j for j, m in enumerate(margins) if m is None]
        if missing:
            estimates = self._estimate(ctx, [self.indices[j] for j in missing])
            for j, m in zip(missing, estimates):
                margins[j] = m
        return margins

    def _estimate(self, ctx: SetupContext, indices: list[int]) -> list[torch.Tensor]:
        if ctx.train_batches is None:
            raise ConfigError(
                "ofd.margin: estimating margins (no teacher BN before the ReLU, or margin: estimate) "
                "needs training batches, and none were given."
            )
        meters = [NegativeMean() for _ in indices]
        teacher = ctx.teacher
        was_training = teacher.training
        teacher.eval()
        try:
            with torch.no_grad():
                for k, batch in enumerate(ctx.train_batches):
                    if self.estimate_batches is not None and k >= self.estimate_batches:
                        break
                    stages = teacher.forward_features(batch[0].to(ctx.device)).stages
                    for meter, i in zip(meters, indices):
                        meter.update(stages[i])
        finally:
            teacher.train(was_training)
        if meters[0].neg_sum is None:
            raise ConfigError("ofd.margin: the training batches were empty; cannot estimate margins.")
        return [m.value() for m in meters]

    def teacher_fields(self) -> tuple[str, ...]:
        return tuple(stage_field("prerelu", i) for i in self.indices)

    def forward(self, inp: TermInput) -> torch.Tensor:
        s_feats, t_feats = inp.student.stages, inp.teacher.stages
        total = 0.0
        for j, i in enumerate(self.indices):
            loss = connector_partial_l2(self.connectors[j], s_feats[i], t_feats[i], getattr(self, f"margin_{j}"))
            total = total + loss / (2 ** (self.num_stages - 1 - i) if self.dividers is None else self.dividers[i])
        return total / s_feats[0].shape[0]
