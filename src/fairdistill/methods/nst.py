"""Neuron Selectivity Transfer (Huang & Wang, "Like What You Like", arXiv 1707.01219).

Each channel's spatial response, L2-normalised, is one sample of the layer's distribution;
NST matches the student's and the teacher's with the biased squared MMD (NST Eq. 4) under the
polynomial kernel k(a, b) = (a^T b)^2 (d = 2, c = 0). With the C_s student vectors s_i and the
C_t teacher vectors t_j (length L = H*W) as the rows of S (C_s x L) and T (C_t x L):
  MMD^2 = mean_{i,i'} k(s_i, s_i') + mean_{j,j'} k(t_j, t_j') - 2 mean_{i,j} k(s_i, t_j)
        = ||S^T S / C_s - T^T T / C_t||_F^2 =: ||D||_F^2,
since sum_{i,j} (s_i^T t_j)^2 = ||S T^T||_F^2 = <S^T S, T^T T>_F. The first (kernel) form
builds C x C matrices, the second (Gram) form L x L ones; :func:`nst_form` picks the one with
fewer multiply-adds, forward and backward: the Gram form unless L > about 5C/3 (so on every
embedding the MFD configs distil). The gradient is written out (both forms):
dMMD^2/dS = (4 / C_s) S D = (4 / C_s) (K_ss S / C_s - K_st T / C_t), then through the
normalisation v = x / max(||x||, eps): dx = (g - v <v, g>) / ||x|| (g / eps where ||x|| < eps,
as ``F.normalize``). Averaged over the batch. The teacher-teacher term is kept (constant for the
student, so the gradient is that of the official code, which drops it). Config weight 50.

Precision: computed in float32 (float64 for float64 inputs) with autocast off; lower-precision
inputs are upcast and their gradients cast back. The loss is a small difference of near-equal
terms that bf16/fp16 products lose (the former autograd form ran its products in bf16 under CPU
autocast and returned a bf16 loss).

Flat embeddings: on (B, D) features (the MFD code's NST on the CIFAR CNN's 256-d embedding)
every channel vector has length L = 1 and normalises to +-1 (0 for an inactive unit), so the
loss is mean_b (n_s / C_s - n_t / C_t)^2 with n the number of non-zero units: piecewise
constant, its gradient is zero, and the term trains nothing. Here the gradient is exactly zero;
the official autograd formula returns rounding noise instead. Measured on the MFD CNN (batch
128, three random initialisations; ``benchmarks/bench_nst.py``): max |dL/d embedding| 6e-17 to
5e-16 in float64 (2e-18 on random ReLU features), 1e-7 to 4e-6 in float32; with the configs'
weight 30, a gradient norm on the parameters of 9e-6 to 2e-4 in float32 (4e-15 to 3e-14 in
float64) against cross-entropy's 0.06 to 0.12.
The configs keep the official position.
"""
from __future__ import annotations

import contextlib
from typing import Literal

import torch
from torch.autograd.function import once_differentiable

from .base import TERMS, SetupContext, Term, TermInput
from .features import Position, Positions, match_spatial, paired_stages, resolve_positions
from .fields import stage_field

__all__ = ["NST", "nst_form", "nst_loss"]


EPS = 1e-12
"""Norm floor of the channel vectors, as ``F.normalize``."""

Form = Literal["auto", "gram", "kernel"]


def nst_form(c_s: int, c_t: int, length: int, teacher_grad: bool = False) -> str:
    """"gram" or "kernel": the form of :func:`nst_loss` with fewer multiply-adds per sample.

    Forward + student backward cost L^2 (2 C_s + C_t) in the Gram form against
    L (2 C_s^2 + C_t^2 + 2 C_s C_t) in the kernel form; a teacher gradient adds L^2 C_t and
    L C_t (C_s + C_t). Ties go to "gram".
    """
    gram = length * length * (2 * c_s + c_t + (c_t if teacher_grad else 0))
    kernel = length * (2 * c_s * c_s + c_t * c_t + 2 * c_s * c_t + (c_t * (c_s + c_t) if teacher_grad else 0))
    return "gram" if gram <= kernel else "kernel"


def _normalise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """v = x / max(||x||, eps) per channel row of (B, C, L) (bit for bit as ``F.normalize``:
    +-1 exactly when L = 1); also the divisor max(||x||, eps) and the rows whose norm reaches
    eps (where the norm's gradient passes)."""
    norm = torch.linalg.vector_norm(x, dim=2, keepdim=True)
    denom = norm.clamp_min(EPS)
    return x / denom, denom, norm >= EPS


def _normalise_backward(g: torch.Tensor, v: torch.Tensor, denom: torch.Tensor, unclamped: torch.Tensor) -> torch.Tensor:
    """dL/dx from g = dL/dv (overwritten): (g - v <v, g>) / ||x||, or g / eps on clamped rows."""
    dot = torch.einsum("bcl,bcl->bc", v, g).unsqueeze(2)
    return g.addcmul_(v, dot * unclamped, value=-1).div_(denom)


def _no_autocast(like: torch.Tensor):
    """Autocast off on ``like``'s device (a no-op context where the device has no autocast)."""
    kind = like.device.type
    return torch.autocast(kind, enabled=False) if torch.amp.is_autocast_available(kind) else contextlib.nullcontext()


def _squared_norm(m: torch.Tensor) -> torch.Tensor:
    """||m||_F^2 as one dot product (no squared copy)."""
    flat = m.reshape(-1)
    return torch.dot(flat, flat)


class _ChannelMMD(torch.autograd.Function):
    """MMD^2 of the normalised rows of (B, C_s, L) and (B, C_t, L), batch mean, in ``form``.

    Saves the normalised rows only where a gradient needs them, and the L x L matrix D
    ("gram") or the kernel matrices the gradient reads ("kernel").
    """

    @staticmethod
    def forward(ctx, xs: torch.Tensor, xt: torch.Tensor, form: str) -> torch.Tensor:
        s, den_s, keep_s = _normalise(xs)
        t, den_t, keep_t = _normalise(xt)
        n, cs, ct = s.shape[0], s.shape[1], t.shape[1]
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.form = form
        if form == "gram":
            d = torch.baddbmm(torch.bmm(t.mT, t), s.mT, s, beta=-1.0 / ct, alpha=1.0 / cs)
            ctx.save_for_backward(s if need_s else None, den_s, keep_s, t if need_t else None, den_t, keep_t, d)
            return _squared_norm(d) / n
        k_ss, k_tt, k_st = torch.bmm(s, s.mT), torch.bmm(t, t.mT), torch.bmm(s, t.mT)
        ctx.save_for_backward(s, den_s, keep_s, t, den_t, keep_t,
                              k_ss if need_s else None, k_tt if need_t else None, k_st)
        return (_squared_norm(k_ss) / cs**2 + _squared_norm(k_tt) / ct**2 - 2 * _squared_norm(k_st) / (cs * ct)) / n

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        s, den_s, keep_s, t, den_t, keep_t, *mats = ctx.saved_tensors
        n, cs, ct = den_s.shape[0], den_s.shape[1], den_t.shape[1]
        c_s, c_t = 4 * grad / (n * cs), -4 * grad / (n * ct)  # dL/dS = c_s S D, dL/dT = c_t T D
        gs = gt = None
        with _no_autocast(grad):
            if ctx.form == "gram":
                (d,) = mats
                if ctx.needs_input_grad[0]:
                    gs = torch.bmm(s, d * c_s)
                if ctx.needs_input_grad[1]:
                    gt = torch.bmm(t, d * c_t)
            else:  # S D = K_ss S / C_s - K_st T / C_t,  T D = K_ts S / C_s - K_tt T / C_t
                k_ss, k_tt, k_st = mats
                if ctx.needs_input_grad[0]:
                    gs = torch.bmm(k_ss * (c_s / cs), s).baddbmm_(k_st * (-c_s / ct), t)
                if ctx.needs_input_grad[1]:
                    gt = torch.bmm(k_st.mT * (c_t / cs), s).baddbmm_(k_tt * (-c_t / ct), t)
            if gs is not None:
                gs = _normalise_backward(gs, s, den_s, keep_s)
            if gt is not None:
                gt = _normalise_backward(gt, t, den_t, keep_t)
        return gs, gt, None


def _channel_rows(feat: torch.Tensor) -> torch.Tensor:
    return feat.flatten(2) if feat.dim() > 2 else feat[..., None]


def nst_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, form: Form = "auto") -> torch.Tensor:
    """Biased MMD^2 of the channel vectors (NST Eq. 4, polynomial kernel), mean over the batch.

    Features are (B, C, ...) with equal spatial sizes; channel counts may differ. Each of the
    C vectors of length L = H*W is L2-normalised. 2-D (B, D) features give L = 1 (see the
    module docstring: the loss is then piecewise constant). ``form``: "gram" (L x L Gram
    matrices), "kernel" (C x C kernel matrices) or "auto" (:func:`nst_form` of the shapes);
    all give the same value and gradient. Float32 at least (float64 inputs stay float64),
    autocast off; the result has that dtype. Differentiable once (no double backward).
    """
    if student_feat.shape[0] != teacher_feat.shape[0] or student_feat.shape[2:] != teacher_feat.shape[2:]:
        raise ValueError(
            f"nst_loss: student {tuple(student_feat.shape)} and teacher {tuple(teacher_feat.shape)} "
            "must agree in batch and spatial size"
        )
    if form not in ("auto", "gram", "kernel"):
        raise ValueError(f"nst_loss: form={form!r}; expected 'auto', 'gram' or 'kernel'")
    dtype = torch.promote_types(torch.promote_types(student_feat.dtype, teacher_feat.dtype), torch.float32)
    xs, xt = _channel_rows(student_feat).to(dtype), _channel_rows(teacher_feat).to(dtype)
    if form == "auto":
        form = nst_form(xs.shape[1], xt.shape[1], xs.shape[2], teacher_feat.requires_grad)
    with _no_autocast(xs):
        return _ChannelMMD.apply(xs, xt, form)


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

    def __init__(self, feature: Literal["stage", "embedding"] = "stage", position: Position = "block",
                 positions: Positions = "last"):
        super().__init__()
        self.feature, self.position, self.positions = feature, position, positions
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

    def teacher_fields(self) -> tuple[str, ...]:
        if self.feature == "embedding":
            return ("embedding",)
        return tuple(stage_field(self.position, i) for i in self.indices)

    def forward(self, inp: TermInput) -> torch.Tensor:
        total = 0.0
        for s, t in self._pairs(inp.student, inp.teacher):
            total = total + nst_loss(*match_spatial(s, t.detach()))
        return total
