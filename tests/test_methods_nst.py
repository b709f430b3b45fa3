"""Neuron selectivity transfer: nst_loss against a naive MMD and the nst term."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_methods_fakes import TinyNet, grads_of, make_ctx, make_input

from fairdistill.errors import ConfigError
from fairdistill.methods.base import TERMS
from fairdistill.methods.nst import nst_loss

torch.set_num_threads(1)


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
    # K_ss mean 0.5, K_tt 1, K_st mean 0.5 -> 0.5 + 1 - 1
    assert nst_loss(s[..., None], t[..., None]).item() == pytest.approx(0.5)


def test_nst_loss_matches_naive_and_is_zero_for_equal_features():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 5, 4, 4, generator=gen)
    assert nst_loss(s, t).item() == pytest.approx(naive_nst(s.numpy(), t.numpy()), rel=1e-5)
    assert nst_loss(s, s).item() == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="spatial"):
        nst_loss(s, t[:, :, :2])


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
