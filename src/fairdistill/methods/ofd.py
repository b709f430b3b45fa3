"""OFD: "A Comprehensive Overhaul of Feature Distillation" (Heo et al., ICCV 2019).

Teacher transform: margin ReLU max(F_t, m) with a per-channel margin m (supplement Eq. 1-4);
student transform: :class:`~.connectors.Connector`; distance: partial L2 (§3.4); positions: the
pre-ReLU end of every stage, layer i divided by 2^(N-1-i), summed and divided by the batch size
(supplement B, official ``Distiller.forward``). The config weight is alpha (1e-3 CIFAR, 1e-4
ImageNet). The official recipe runs the teacher's BN in train mode: its preset wants
``teacher.bn_mode = train``. In training, each stage runs as :func:`connector_partial_l2`, the
connector and the distance in one pass with the same value and gradients as the composition.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError
from .base import TERMS, SetupContext, Term, TermInput
from .connectors import (
    Connector,
    centre_into,
    channel_rows,
    check_choice,
    check_positions,
    check_same_spatial,
    empty_map,
    fold_batch_norm,
    fold_batch_norm_grads,
    is_channels_last,
    paired_stages,
    product_into,
    resolve_positions,
    update_running_stats,
)

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


def _memory_order(t: torch.Tensor) -> torch.Tensor:
    """The elements of ``t`` as one vector in storage order (a view when ``t`` is dense)."""
    order = sorted(range(t.dim()), key=lambda i: -t.stride(i))
    return t.permute(order).reshape(-1)


class _PartialL2(torch.autograd.Function):
    """partial_l2 with a one-tensor backward: the kept difference d (zero elsewhere) is saved
    and dL/dS = 2 d. The teacher side is a constant (no gradient to target or margin)."""

    @staticmethod
    def forward(ctx, source, target, margin):
        ctx.source_dtype = source.dtype
        with torch.autocast(source.device.type, enabled=False):
            dtype = torch.promote_types(source.dtype, torch.float32)
            s, f = source.to(dtype), target.to(dtype)
            t = torch.empty_like(s)
            torch.maximum(f, margin.reshape(1, -1, *([1] * (s.dim() - 2))).to(dtype), out=t)
            d = s - t
            # Kept: S > T or F_t > 0, i.e. max(S - T, F_t) > 0; reuse t's memory for the mask.
            keep = torch.maximum(d, f, out=t).gt_(0)
            d.mul_(keep)
            del t, keep
            flat = _memory_order(d)
            # Per-sample sums of squares keep float32 rounding small on long vectors.
            loss = torch.linalg.vector_norm(flat.view(source.shape[0], -1), dim=1).square().sum()
        ctx.save_for_backward(d)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (d,) = ctx.saved_tensors
        return (d * (2 * grad)).to(ctx.source_dtype), None, None


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
    return _PartialL2.apply(source, target.detach(), margin.detach())


CHUNK_ELEMENTS = 1 << 18
"""Teacher-feature elements per chunk of samples and per thread in :class:`_ConnectorPartialL2`
on the CPU (1 MB in float32, about a core's L2 cache): the passes over one chunk run in cache."""


class _ConnectorPartialL2(torch.autograd.Function):
    """partial_l2(Connector(x), target, margin) with the connector BN in training mode, without
    a tensor for the connector output (see the notes in connectors.py for the folded BN).

    For each chunk of samples, T = max(F_t, m) is written into a buffer that the folded product
    turns into S - T in place; the elements with S <= T and F_t <= 0 are zeroed, which leaves d
    with loss sum(d^2) and dL/dS = 2 d. The loss is a scalar, so its gradients are those for
    dL = 1 times the incoming scalar: they are accumulated here, chunk by chunk while d is in
    cache, and only they are kept for backward, which scales them in place (so one backward per
    forward; first-order gradients). Returns (loss, batch mean and biased batch variance of the
    conv output).
    """

    @staticmethod
    def forward(ctx, x, weight, gamma, beta, target, margin, eps):
        with torch.autocast(x.device.type, enabled=False):
            cl = is_channels_last(x)
            cout, cin = weight.shape[:2]
            w = weight.reshape(cout, cin)
            n = x.shape[0]
            x_aug = empty_map(n, cin + 1, x, cl, w.dtype)
            mean = centre_into(x, x_aug)
            x_rows = channel_rows(x_aug, cl)
            folded, w_cov, inv_std, a, var = fold_batch_norm(w, x_rows[:, :cin], gamma, beta, eps)
            need_params, need_x = any(ctx.needs_input_grad[1:4]), ctx.needs_input_grad[0]
            per_chunk = n
            if x.device.type == "cpu":
                per_chunk = max(1, min(n, CHUNK_ELEMENTS * torch.get_num_threads() // target[0].numel()))
            d_buf, keep_buf = empty_map(per_chunk, cout, x, cl, w.dtype), empty_map(per_chunk, cout, x, cl, w.dtype)
            m = margin.reshape(1, -1, 1, 1)
            sq_norms, p_parts = [], []
            dx = empty_map(n, cin, x, cl, w.dtype) if need_x else None
            twice_at = folded[:, :cin].T * 2
            for lo in range(0, n, per_chunk):
                hi = min(n, lo + per_chunk)
                d, f, xc = d_buf[: hi - lo], target[lo:hi], channel_rows(x_aug[lo:hi], cl)
                torch.maximum(f, m, out=d)
                d_rows = channel_rows(d, cl)
                d_rows.baddbmm_(folded.expand(d_rows.shape[0], -1, -1), xc, beta=-1)
                # Kept where S - T > 0 or F_t > 0, i.e. max(S - T, F_t) > 0 (float masks are the fast ones).
                d.mul_(torch.maximum(d, f, out=keep_buf[: hi - lo]).gt_(0))
                sq_norms.append(torch.linalg.vector_norm(d_rows, dim=2).square().sum())
                if need_params or need_x:
                    p_parts.append(torch.matmul(xc, d_rows.transpose(1, 2)).sum(0))  # this order is faster
                if need_x:
                    product_into(dx[lo:hi], twice_at, d_rows, cl)
            del d_buf, keep_buf
            loss = torch.stack(sq_norms).sum()
            grads = [None] * 4
            if need_params or need_x:
                p_aug = torch.stack(p_parts).sum(0).T.mul_(2)
                dw, dgamma, dbeta, qc = fold_batch_norm_grads(
                    w, w_cov, inv_std, a, folded, p_aug, x_rows.shape[0] * x_rows.shape[2])
                grads[1:] = dw.view(cout, cin, 1, 1), dgamma, dbeta
                if need_x:
                    grads[0] = product_into(dx, qc, x_rows, cl, accumulate=True)
        ctx.x_dtype, ctx.spent = x.dtype, False
        ctx.save_for_backward(*grads)
        mean_z = w @ mean
        ctx.mark_non_differentiable(mean_z, var)
        return loss, mean_z, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, _grad_mean, _grad_var):
        if ctx.spent:
            raise RuntimeError("connector_partial_l2: its gradients were already used by an earlier backward "
                               "(they are scaled in place); recompute the loss instead of retaining the graph.")
        ctx.spent = True
        grads = [None if g is None else g.mul_(grad.to(g.dtype)) for g in ctx.saved_tensors]
        if grads[0] is not None:
            grads[0] = grads[0].to(ctx.x_dtype)
        return (*grads, None, None, None)


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
    loss, mean, var = _ConnectorPartialL2.apply(
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

    L = (1/B) * sum_i partial_l2(r_i(F_s,i), F_t,i, m_i) / 2^(N-1-i) over the chosen stage
    indices i of N pre-ReLU stages (official ``Distiller.forward``).

    Options:
      positions: "all" (multi-layer, default), "last" (single-layer variant, supplement
        Table 2) or a list of stage indices (weights keep their 2^-(N-1-i)).
      margin: "bn" (default): Eq. 4 from the teacher BN (``stage_bns()``) before each ReLU,
        estimated from training batches where that BN is None; "estimate": estimated
        everywhere (E[F_t | F_t < 0] per channel, teacher in eval mode, supplement A).
      estimate_batches: how many training batches the estimate reads (default: one pass).
    Student and teacher must have the same number of stages and equal spatial sizes at the
    chosen positions (ConfigError otherwise).
    """

    def __init__(self, positions="all", margin: str = "bn", estimate_batches: int | None = None):
        super().__init__()
        self.positions = check_positions(positions, "ofd.positions")
        self.margin = check_choice(margin, ("bn", "estimate"), "ofd.margin")
        if estimate_batches is not None and (
            isinstance(estimate_batches, bool) or not isinstance(estimate_batches, int) or estimate_batches < 1
        ):
            raise ConfigError(f"ofd.estimate_batches: expected a positive integer or null, got {estimate_batches!r}.")
        self.estimate_batches = estimate_batches
        self.connectors = nn.ModuleList()
        self.indices: list[int] = []
        self.num_stages = 0

    def setup(self, ctx: SetupContext) -> None:
        s_feats, t_feats = paired_stages(ctx.student_features, ctx.teacher_features, "prerelu", "ofd")
        self.num_stages = len(t_feats)
        self.indices = resolve_positions(self.positions, self.num_stages, "ofd.positions")
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

    def forward(self, inp: TermInput) -> torch.Tensor:
        s_feats, t_feats = inp.student.stages, inp.teacher.stages
        total = 0.0
        for j, i in enumerate(self.indices):
            loss = connector_partial_l2(self.connectors[j], s_feats[i], t_feats[i], getattr(self, f"margin_{j}"))
            total = total + loss / 2 ** (self.num_stages - 1 - i)
        return total / s_feats[0].shape[0]
