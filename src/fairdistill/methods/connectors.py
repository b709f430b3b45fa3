"""Pairing student and teacher features: which positions, matching sizes, and the connector.

Shared by the feature-distillation terms (OFD, AB, AT, NST, FitNets, FT):

* ``position`` chooses the kind of stage feature: ``"prerelu"`` = ``Features.stages`` (the
  pre-ReLU stage ends, OFD §3.2) or ``"block"`` = ``Features.extra["block"]`` (the ordinary stage
  outputs, where the earlier methods distil; OFD supplement Table 1 compares both).
* ``positions`` chooses which stages: ``"all"``, ``"last"`` or a list of stage indices
  (negative indices count from the end).
* :class:`Connector` is OFD's student transform (§3.3): 1x1 conv without bias, then BN; in
  training mode it runs as one folded convolution (:func:`conv1x1_batch_norm`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models.base import Features
from ..registry import suggest

POSITIONS = ("block", "prerelu")


def check_choice(value, choices: tuple[str, ...], key: str) -> str:
    """``value`` if it is one of ``choices``, else a ConfigError naming ``key``."""
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(
            f"{key}: expected one of {', '.join(repr(c) for c in choices)}, got {value!r}."
            f"{suggest(value, choices)}"
        )
    return value


def check_positions(spec, key: str) -> str | list[int]:
    """Validate a ``positions`` option (``"all"``, ``"last"`` or a non-empty list of ints)."""
    if isinstance(spec, str):
        return check_choice(spec, ("all", "last"), key)
    if isinstance(spec, int) and not isinstance(spec, bool):
        return [spec]
    if (
        isinstance(spec, (list, tuple))
        and spec
        and all(isinstance(i, int) and not isinstance(i, bool) for i in spec)
    ):
        return list(spec)
    raise ConfigError(f"{key}: expected 'all', 'last' or a non-empty list of stage indices, got {spec!r}.")


def resolve_positions(spec: str | list[int], num_stages: int, key: str) -> list[int]:
    """Stage indices (ascending, non-negative) that ``spec`` names among ``num_stages`` stages."""
    if spec == "all":
        return list(range(num_stages))
    if spec == "last":
        return [num_stages - 1]
    out = []
    for i in spec:
        if not -num_stages <= i < num_stages:
            raise ConfigError(
                f"{key}: stage index {i} is out of range; the models have {num_stages} stages "
                f"(valid indices 0..{num_stages - 1}, or negative from the end)."
            )
        out.append(i % num_stages)
    if len(set(out)) != len(out):
        raise ConfigError(f"{key}: stage indices {spec} name the same stage twice.")
    return sorted(out)


def stage_features(features: Features, position: str, key: str) -> list[torch.Tensor]:
    """The stage features of kind ``position`` ("prerelu" or "block") from ``features``."""
    if position == "prerelu":
        return list(features.stages)
    block = features.extra.get("block")
    if block is None:
        raise ConfigError(
            f"{key}: position 'block' needs the model to expose its stage outputs as "
            "Features.extra['block'], and this model does not; use position: prerelu."
        )
    return list(block)


def paired_stages(student: Features, teacher: Features, position: str, key: str):
    """Student and teacher stage lists of kind ``position``; fails when their counts differ."""
    s = stage_features(student, position, key)
    t = stage_features(teacher, position, key)
    if len(s) != len(t):
        raise ConfigError(
            f"{key}: the student has {len(s)} stages and the teacher {len(t)}; stage-wise "
            "distillation pairs stage i with stage i, so pick models with as many stages."
        )
    return s, t


def check_same_spatial(s: torch.Tensor, t: torch.Tensor, index: int, key: str) -> None:
    """Fail with a ConfigError when stage ``index`` differs in spatial size between the models."""
    if s.shape[2:] != t.shape[2:]:
        raise ConfigError(
            f"{key}: at stage {index} the student feature is {tuple(s.shape[2:])} and the "
            f"teacher's {tuple(t.shape[2:])}; this method compares them element by element, so "
            "the spatial sizes must match (choose other positions or models)."
        )


def match_spatial(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive-average-pool whichever map is larger down to the smaller size (RepDistiller)."""
    if s.dim() < 3 or s.shape[2:] == t.shape[2:]:
        return s, t
    size = tuple(min(a, b) for a, b in zip(s.shape[2:], t.shape[2:]))
    if s.shape[2:] != size:
        s = F.adaptive_avg_pool2d(s, size)
    if t.shape[2:] != size:
        t = F.adaptive_avg_pool2d(t, size)
    return s, t


# ---- Connector: Conv1x1 + BatchNorm (batch statistics) folded into one matrix product --------
#
# With X the centred input (C_in x n over the n = N*H*W positions), Cov = X X^T / n and the conv
# weight W, the conv output Z = W X has batch mean W mu and biased batch variance
# v = diag(W Cov W^T), so training-mode BN (Ioffe & Szegedy 2015, Alg. 1) gives
# S = A X + beta with A = diag(a) W, a = gamma / s, s = sqrt(v + eps): no pass over Z. A ones row
# under X makes beta part of the product: S = [A | beta] [X; 1]. BN's batch-statistics gradient,
# rewritten with G = dL/dS and P = G X^T (C_out x C_in), becomes
#   dbeta = G 1,  dgamma = (W * P) 1 / s,  dW = diag(a) P - diag(a dgamma / s) W Cov,
#   dX = A^T G + Q X + c 1^T  with  Q = -W^T diag(a dgamma / (s n)) W,  c = -A^T dbeta / n.
# Feature maps are used as matrices with channels as rows: one (C, H*W) matrix per sample for
# NCHW tensors, one (C, N*H*W) matrix for channels-last tensors (see channel_rows).


def channel_rows(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """(B, C, L) view of a 4-D map (or a channel slice of one): B = N, L = H*W for NCHW;
    B = 1, L = N*H*W for channels-last."""
    n, c, h, w = t.shape
    if channels_last:
        return t.permute(1, 0, 2, 3).reshape(1, c, n * h * w)
    return t.reshape(n, c, h * w)


def product_into(out: torch.Tensor, m: torch.Tensor, rows: torch.Tensor, channels_last: bool,
                 accumulate: bool = False) -> torch.Tensor:
    """``out = m @ rows`` (``out += m @ rows`` with accumulate) per channel-rows matrix, in place;
    ``out`` is a 4-D map whose channels are the rows of m, in the layout of ``rows``."""
    o = channel_rows(out, channels_last)
    if channels_last:
        if accumulate:
            o[0].T.addmm_(rows[0].T, m.T)
        else:
            torch.mm(rows[0].T, m.T, out=o[0].T)
    elif accumulate:
        o.baddbmm_(m.expand(o.shape[0], -1, -1), rows)
    else:
        torch.bmm(m.expand(o.shape[0], -1, -1), rows, out=o)
    return out


def empty_map(n: int, c: int, like: torch.Tensor, channels_last: bool, dtype=None) -> torch.Tensor:
    """An uninitialised (n, c, H, W) map on ``like``'s device, NCHW or channels-last."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(n, c, *like.shape[2:], dtype=dtype or like.dtype, device=like.device, memory_format=fmt)


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether a 4-D tensor is stored channels-last (and not also plainly contiguous)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def centre_into(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write [x - mu; 1] (per-channel batch mean mu, a ones channel last) into ``out``
    (N, C_in + 1, H, W); returns mu."""
    cin = x.shape[1]
    mean = x.mean((0, 2, 3), dtype=out.dtype)
    torch.sub(x, mean.view(1, -1, 1, 1), out=out[:, :cin])
    out[:, cin].fill_(1)
    return mean


def fold_batch_norm(w: torch.Tensor, x_rows: torch.Tensor, gamma, beta, eps: float):
    """From the centred rows X (B, C_in, L) and the conv weight w (C_out x C_in): the folded
    [A | beta] and what the backward needs: (folded, w_cov, inv_std, a, var)."""
    cov = torch.matmul(x_rows, x_rows.transpose(1, 2)).sum(0)
    cov /= x_rows.shape[0] * x_rows.shape[2]
    w_cov = w @ cov
    var = (w_cov * w).sum(1).clamp_(min=0)
    inv_std = torch.rsqrt(var + eps)
    a = gamma * inv_std
    folded = torch.cat([w * a[:, None], beta[:, None]], 1)
    return folded, w_cov, inv_std, a, var


def fold_batch_norm_grads(w, w_cov, inv_std, a, folded, p_aug: torch.Tensor, n: int):
    """Parameter gradients from P_aug = G [X; 1]^T, and [Q | c] (the input gradient is
    A^T G + [Q | c] [X; 1]): returns (dw, dgamma, dbeta, qc)."""
    cin = w.shape[1]
    p, dbeta = p_aug[:, :cin], p_aug[:, cin]
    dgamma = (w * p).sum(1) * inv_std
    shrink = a * dgamma * inv_std
    dw = a[:, None] * p - shrink[:, None] * w_cov
    q = (w.T * (shrink / -n)) @ w
    c = folded[:, :cin].T @ dbeta / -n
    return dw, dgamma, dbeta, torch.cat([q, c[:, None]], 1)


class _ConvBatchNorm(torch.autograd.Function):
    """BN(conv1x1(x)) with batch statistics as one product (see the notes above). Runs in the
    weight's dtype with autocast off; first-order gradients only. Returns (S, batch mean,
    biased batch variance of Z)."""

    @staticmethod
    def forward(ctx, x, weight, gamma, beta, eps):
        ctx.x_dtype = x.dtype
        ctx.cl = cl = is_channels_last(x)
        with torch.autocast(x.device.type, enabled=False):
            cout, cin = weight.shape[:2]
            w = weight.reshape(cout, cin)
            x_aug = empty_map(x.shape[0], cin + 1, x, cl, w.dtype)
            mean = centre_into(x, x_aug)
            x_rows = channel_rows(x_aug, cl)
            folded, w_cov, inv_std, a, var = fold_batch_norm(w, x_rows[:, :cin], gamma, beta, eps)
            out = product_into(empty_map(x.shape[0], cout, x, cl, w.dtype), folded, x_rows, cl)
        ctx.save_for_backward(x_aug, w, w_cov, inv_std, a, folded)
        mean_z = w @ mean
        ctx.mark_non_differentiable(mean_z, var)
        return out, mean_z, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, _grad_mean, _grad_var):
        x_aug, w, w_cov, inv_std, a, folded = ctx.saved_tensors
        cl = ctx.cl
        cout, cin = w.shape
        with torch.autocast(grad.device.type, enabled=False):
            grad = grad.to(w.dtype).contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
            g_rows, x_rows = channel_rows(grad, cl), channel_rows(x_aug, cl)
            p_aug = torch.matmul(x_rows, g_rows.transpose(1, 2)).sum(0).T  # this order is faster
            dw, dgamma, dbeta, qc = fold_batch_norm_grads(
                w, w_cov, inv_std, a, folded, p_aug, x_rows.shape[0] * x_rows.shape[2])
            dx = None
            if ctx.needs_input_grad[0]:
                dx = product_into(empty_map(x_aug.shape[0], cin, x_aug, cl), folded[:, :cin].T, g_rows, cl)
                dx = product_into(dx, qc, x_rows, cl, accumulate=True).to(ctx.x_dtype)
        return dx, dw.view(cout, cin, 1, 1), dgamma, dbeta, None


def update_running_stats(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
    """``bn``'s running-statistics update (nn.BatchNorm2d's rule: momentum, or a cumulative
    average when momentum is None; running_var gets the unbiased variance of n values)."""
    if not bn.track_running_stats:
        return
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / bn.num_batches_tracked.item() if bn.momentum is None else bn.momentum
        bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), factor)
        bn.running_var.lerp_((var * (n / max(n - 1, 1))).to(bn.running_var.dtype), factor)


def conv1x1_batch_norm(x: torch.Tensor, weight: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """``bn(conv2d(x, weight))`` for a 1x1 ``weight`` (no bias) and an affine BN in training
    mode (batch statistics), as one folded product; updates ``bn``'s running statistics."""
    out, mean, var = _ConvBatchNorm.apply(x, weight, bn.weight, bn.bias, bn.eps)
    update_running_stats(bn, mean, var, x.numel() // x.shape[1])
    return out


class Connector(nn.Sequential):
    """OFD's student transform r (§3.3): Conv1x1(C_s -> C_t, no bias) + BatchNorm, no ReLU.

    Initialisation as the official code: conv weights ~ N(0, sqrt(2 / (k*k*C_t))), BN weight 1
    and bias 0. In training mode the pair runs as one folded product
    (:func:`conv1x1_batch_norm`: the same output, gradients and running statistics as the two
    modules); in eval mode it is the plain conv then BN with running statistics.
    """

    def __init__(self, s_channels: int, t_channels: int):
        conv = nn.Conv2d(s_channels, t_channels, kernel_size=1, bias=False)
        bn = nn.BatchNorm2d(t_channels)
        k = conv.kernel_size[0] * conv.kernel_size[1]
        nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (k * t_channels)))
        nn.init.ones_(bn.weight)
        nn.init.zeros_(bn.bias)
        super().__init__(conv, bn)

    @property
    def folds(self) -> bool:
        """Whether forward takes the folded training path (BN in training mode, plain BatchNorm2d)."""
        bn = self[1]
        return bn.training and type(bn) is nn.BatchNorm2d and bn.affine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.folds and x.dim() == 4:
            return conv1x1_batch_norm(x, self[0].weight, self[1])
        return super().forward(x)
