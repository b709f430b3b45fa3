"""Neuron selectivity transfer: nst_loss (both forms) against the kernel-matrix autograd form, a
naive MMD, finite differences and hand-computed values; precision under autocast; the nst term."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_methods_fakes import TinyNet, grads_of, make_ctx, make_input

from fairdistill.errors import ConfigError
from fairdistill.methods.base import TERMS
from fairdistill.methods.nst import nst_form, nst_loss

torch.set_num_threads(1)


def kernel_autograd_nst(s, t):
    """The former implementation, kept as the independent reference: three (B, C, C) matrices
    of k(a, b) = (a^T b)^2 between F.normalize'd channel vectors, differentiated by autograd."""
    s = F.normalize(s.flatten(2) if s.dim() > 2 else s[..., None], dim=2)
    t = F.normalize(t.flatten(2) if t.dim() > 2 else t[..., None], dim=2)
    k = lambda a, b: torch.bmm(a, b.transpose(1, 2)).pow(2).mean((1, 2))  # noqa: E731
    return (k(s, s) + k(t, t) - 2 * k(s, t)).mean()


def naive_nst(s, t):
    """Per sample: biased MMD^2 of L2-normalised channel vectors, kernel (a.b)^2; batch mean.

    A zero vector stays zero (as F.normalize).
    """
    out = []
    for b in range(s.shape[0]):
        xs = [v / max(np.linalg.norm(v), 1e-12) for v in s[b].reshape(s.shape[1], -1)]
        xt = [v / max(np.linalg.norm(v), 1e-12) for v in t[b].reshape(t.shape[1], -1)]
        k = lambda u, v: float(u @ v) ** 2  # noqa: E731
        mean = lambda a, c: np.mean([k(u, v) for u in a for v in c])  # noqa: E731
        out.append(mean(xs, xs) + mean(xt, xt) - 2 * mean(xs, xt))
    return float(np.mean(out))


def test_nst_loss_hand_computed():
    s = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # channels e1, e2 (HW = 2)
    t = torch.tensor([[[3.0, 0.0]]])  # one channel, e1
    # K_ss mean 0.5, K_tt 1, K_st mean 0.5 -> 0.5 + 1 - 1; Gram: diag(1/2, 1/2) - diag(1, 0)
    for form in ("auto", "gram", "kernel"):
        assert nst_loss(s[..., None], t[..., None], form=form).item() == pytest.approx(0.5)


def test_nst_loss_matches_naive_and_is_zero_for_equal_features():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 5, 4, 4, generator=gen)
    for form in ("gram", "kernel"):
        assert nst_loss(s, t, form=form).item() == pytest.approx(naive_nst(s.numpy(), t.numpy()), rel=1e-5)
        assert nst_loss(s, s, form=form).item() == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="spatial"):
        nst_loss(s, t[:, :, :2])
    with pytest.raises(ValueError, match="form"):
        nst_loss(s, t, form="dense")


def features(shape_s, shape_t, seed, channels_last=False, tiny=False):
    """float64 ReLU features (exact zeros, as a block output), both requiring grad; ``tiny``
    gives one student channel a norm below eps (F.normalize's clamped branch)."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(shape_s, generator=gen, dtype=torch.float64).relu()
    t = torch.randn(shape_t, generator=gen, dtype=torch.float64).relu()
    if tiny:
        s[0, 1] *= 1e-14
    if channels_last:
        s, t = s.to(memory_format=torch.channels_last), t.to(memory_format=torch.channels_last)
    return s.requires_grad_(), t.requires_grad_()


SHAPES = [
    ((2, 3, 4, 4), (2, 5, 4, 4), {}),  # L = 16 > C, C_s != C_t
    ((2, 20, 2, 2), (2, 9, 2, 2), {}),  # L = 4 < C
    ((2, 6, 3, 5), (2, 6, 3, 5), {"channels_last": True}),
    ((3, 7), (3, 4), {}),  # flat (B, D) embeddings: L = 1
    ((4, 9, 1, 1), (4, 5, 1, 1), {}),  # 1 x 1 maps: L = 1
    ((2, 8, 3, 3), (2, 4, 3, 3), {"tiny": True}),
    ((1, 2, 5, 5), (1, 3, 5, 5), {}),  # L = 25 >> C: the kernel form is the cheaper
]


@pytest.mark.parametrize("form", ["auto", "gram", "kernel"])
@pytest.mark.parametrize("shape_s, shape_t, options", SHAPES)
def test_nst_loss_value_and_gradients_match_kernel_autograd_form(shape_s, shape_t, options, form):
    s, t = features(shape_s, shape_t, seed=len(shape_s) + shape_s[1], **options)
    reference = kernel_autograd_nst(s, t)
    ref_grads = torch.autograd.grad(reference, (s, t))
    value = nst_loss(s, t, form=form)
    grads = torch.autograd.grad(value, (s, t))
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(reference.item(), rel=1e-12, abs=1e-15)
    scale = max(g.abs().max().item() for g in ref_grads)
    for g, r in zip(grads, ref_grads):
        assert g.shape == r.shape
        # on L = 1 the exact gradient is 0 and the reference carries ~1e-17 rounding noise
        assert torch.allclose(g, r, rtol=1e-10, atol=1e-12 * scale + 1e-15)


@pytest.mark.parametrize("form", ["gram", "kernel"])
def test_nst_loss_gradcheck(form):
    s, t = features((2, 3, 2, 3), (2, 4, 2, 3), seed=5)
    s, t = (s.detach() + 0.1).requires_grad_(), (t.detach() + 0.1).requires_grad_()  # no zero rows
    assert torch.autograd.gradcheck(lambda a, b: nst_loss(a, b, form=form), (s, t))
    teacher_fixed = t.detach()
    assert torch.autograd.gradcheck(lambda a: nst_loss(a, teacher_fixed, form=form), (s,))


def test_nst_form_picks_fewer_multiply_adds():
    # the MFD embeddings (reference mfd.md 1.1): CIFAR CNN 256-d, ResNet-18 512x6x6, ShuffleNet 1024x6x6
    assert nst_form(256, 256, 1) == nst_form(512, 512, 36) == nst_form(1024, 1024, 36) == "gram"
    assert nst_form(16, 16, 32 * 32) == "kernel"  # a first WRN stage
    # C_s = C_t = 3: Gram L^2 * 9, kernel L * 45: equal at L = 5 (ties go to gram)
    assert nst_form(3, 3, 5) == "gram" and nst_form(3, 3, 6) == "kernel"
    # a teacher gradient adds L^2 C_t against L C_t (C_s + C_t): 6*36 + 36 = 252 vs 6*45 + 6*6 = 306
    assert nst_form(3, 3, 6, teacher_grad=True) == "kernel" and nst_form(3, 3, 5, teacher_grad=True) == "gram"


def saved_numels(fn):
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: sizes.append(x.numel()) or x, lambda x: x):
        fn()
    return sizes


def test_gram_form_saves_no_channel_by_channel_matrix():
    s, t = features((2, 64, 3, 3), (2, 48, 3, 3), seed=3)
    t = t.detach()
    gram = saved_numels(lambda: nst_loss(s, t, form="gram"))
    kernel = saved_numels(lambda: nst_loss(s, t, form="kernel"))
    assert max(gram) == s.numel()  # the normalised student rows; D is 2 x 9 x 9
    assert 2 * 64 * 64 in kernel and 2 * 64 * 48 in kernel and 2 * 48 * 48 not in kernel  # K_tt unneeded
    assert sum(gram) < sum(kernel) / 5


def test_flat_embedding_loss_counts_active_units_and_has_zero_gradient():
    s, t = features((6, 32), (6, 16), seed=1)
    s, t = s.detach().float().requires_grad_(), t.detach().float()
    n_s, n_t = (s > 0).sum(1).double() / 32, (t > 0).sum(1).double() / 16
    loss = nst_loss(s, t)
    assert loss.item() == pytest.approx(((n_s - n_t) ** 2).mean().item(), rel=1e-6)
    (grad,) = torch.autograd.grad(loss, s)
    assert torch.equal(grad, torch.zeros_like(grad))


def test_nst_loss_runs_in_float32_under_autocast_and_for_low_precision_inputs():
    s, t = features((4, 16, 3, 3), (4, 8, 3, 3), seed=2)
    s, t = s.detach().float().requires_grad_(), t.detach().float()
    exact = nst_loss(s, t)
    (grad,) = torch.autograd.grad(exact, s)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = nst_loss(s, t)
        (grad_in_autocast,) = torch.autograd.grad(mixed, s)  # backward inside autocast too
    assert mixed.dtype == torch.float32
    assert mixed.item() == pytest.approx(exact.item(), rel=1e-6)
    assert torch.allclose(grad_in_autocast, grad, rtol=1e-5, atol=1e-9)
    # bf16 features (an autocast forward's output) are upcast; the gradient returns in bf16
    s16 = s.detach().bfloat16().requires_grad_()
    low = nst_loss(s16, t.bfloat16())
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(nst_loss(s16.float(), t.bfloat16().float()).item(), rel=1e-6)
    (g16,) = torch.autograd.grad(low, s16)
    assert g16.dtype == torch.bfloat16


def test_nst_loss_is_differentiable_once():
    s, t = features((2, 3, 2, 2), (2, 3, 2, 2), seed=4)
    (g,) = torch.autograd.grad(nst_loss(s, t.detach()), s, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


def models(first_stride=1):
    torch.manual_seed(0)
    return TinyNet((3, 6), first_stride=first_stride), TinyNet((4, 8)), torch.randn(4, 3, 8, 8)


@pytest.mark.parametrize("position, positions, indices", [
    ("block", "last", [1]), ("prerelu", "last", [1]), ("block", "all", [0, 1]), ("prerelu", [0], [0]),
])
def test_nst_term_sums_positions(position, positions, indices):
    student, teacher, x = models()
    term = TERMS.get("nst")(position=position, positions=positions)
    term.setup(make_ctx(student, teacher, x))
    inp = make_input(student, teacher, x)
    feats = (lambda f: f.stages) if position == "prerelu" else (lambda f: f.extra["block"])
    expected = sum(naive_nst(feats(inp.student)[i].detach().numpy(), feats(inp.teacher)[i].numpy()) for i in indices)
    assert term(inp).item() == pytest.approx(expected, rel=1e-5)


def test_nst_term_embedding_and_pooling():
    student, teacher, x = models(first_stride=2)
    term = TERMS.get("nst")(feature="embedding")
    term.setup(make_ctx(student, teacher, x))
    inp = make_input(student, teacher, x)
    e_s, e_t = inp.student.embedding.detach().numpy(), inp.teacher.embedding.numpy()
    assert term(inp).item() == pytest.approx(naive_nst(e_s[..., None], e_t[..., None]), rel=1e-5)

    term = TERMS.get("nst")()
    term.setup(make_ctx(student, teacher, x))
    s, t = inp.student.extra["block"][1], inp.teacher.extra["block"][1]
    pooled = F.adaptive_avg_pool2d(t, s.shape[2:])
    assert term(inp).item() == pytest.approx(naive_nst(s.detach().numpy(), pooled.numpy()), rel=1e-5)


def test_nst_term_gradients():
    student, teacher, x = models()
    term = TERMS.get("nst")(positions="all")
    term.setup(make_ctx(student, teacher, x))
    student.train()
    term(make_input(student, teacher, x)).backward()
    assert all(g is not None for g in grads_of(student.convs))
    assert all(g is None for g in grads_of(teacher))


@pytest.mark.parametrize("options, match", [
    ({"feature": "logits"}, "nst.feature"),
    ({"position": "x"}, "nst.position"),
    ({"positions": 1.5}, "nst.positions"),
])
def test_nst_bad_options(options, match):
    with pytest.raises(ConfigError, match=match):
        TERMS.get("nst")(**options)
