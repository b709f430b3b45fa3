"""Fused kernels of the OFD connector and distance (hand-written forward and backward).

Conv1x1 + BatchNorm with batch statistics folded into one matrix product. With X the centred
input (C_in x n over the n = N*H*W positions), Cov = X X^T / n and the conv weight W, the conv
output Z = W X has batch mean W mu and biased batch variance v = diag(W Cov W^T), so
training-mode BN (Ioffe & Szegedy 2015, Alg. 1) gives S = A X + beta with A = diag(a) W,
a = gamma / s, s = sqrt(v + eps): no pass over Z. A ones row under X makes beta part of the
product: S = [A | beta] [X; 1]. BN's batch-statistics gradient, rewritten with G = dL/dS and
P = G X^T (C_out x C_in), becomes
  dbeta = G 1,  dgamma = (W * P) 1 / s,  dW = diag(a) P - diag(a dgamma / s) W Cov,
  dX = A^T G + Q X + c 1^T  with  Q = -W^T diag(a dgamma / (s n)) W,  c = -A^T dbeta / n.
Feature maps are used as matrices with channels as rows: one (C, H*W) matrix per sample for
NCHW tensors, one (C, N*H*W) matrix for channels-last tensors (see :func:`channel_rows`).

On top of it: the partial L2 distance of OFD (§3.4) with a one-tensor backward, and the
connector and the distance fused chunk by chunk (:class:`ConnectorPartialL2`), so no tensor of
the connector's output or its gradient exists.
"""
from __future__ import annotations

import torch
from torch import nn


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


class ConvBatchNorm(torch.autograd.Function):
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
    out, mean, var = ConvBatchNorm.apply(x, weight, bn.weight, bn.bias, bn.eps)
    update_running_stats(bn, mean, var, x.numel() // x.shape[1])
    return out


def _memory_order(t: torch.Tensor) -> torch.Tensor:
    """The elements of ``t`` as one vector in storage order (a view when ``t`` is dense)."""
    order = sorted(range(t.dim()), key=lambda i: -t.stride(i))
    return t.permute(order).reshape(-1)


class PartialL2(torch.autograd.Function):
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


CHUNK_ELEMENTS = 1 << 18
"""Teacher-feature elements per chunk of samples and per thread in :class:`ConnectorPartialL2`
on the CPU (1 MB in float32, about a core's L2 cache): the passes over one chunk run in cache."""


class ConnectorPartialL2(torch.autograd.Function):
    """partial_l2(Connector(x), target, margin) with the connector BN in training mode, without
    a tensor for the connector output (see the module docstring for the folded BN).

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
            loss = torch.zeros((), dtype=w.dtype, device=x.device)
            p_acc = torch.zeros(cin + 1, cout, dtype=w.dtype, device=x.device) if need_params or need_x else None
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
                # per-sample sums of squares over each sample's contiguous memory (a strided
                # channels-last row norm is several times slower)
                loss += torch.linalg.vector_norm(_memory_order(d).view(hi - lo, -1), dim=1).square().sum()
                if p_acc is not None:  # P^T += sum over the chunk's samples of [X; 1] d^T
                    if cl:
                        p_acc.addmm_(xc[0], d_rows[0].T)
                    else:
                        p_acc.addbmm_(xc, d_rows.transpose(1, 2))
                if need_x:
                    product_into(dx[lo:hi], twice_at, d_rows, cl)
            del d_buf, keep_buf
            grads = [None] * 4
            if p_acc is not None:
                p_aug = p_acc.T.mul_(2)
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
