"""Activation boundary: ab_loss against the element rule and the ab term."""
from __future__ import annotations

import pytest
import torch
from test_methods_fakes import TinyNet, grads_of, make_ctx, make_input

from fairdistill.errors import ConfigError
from fairdistill.methods.ab import ab_loss
from fairdistill.methods.base import TERMS

torch.set_num_threads(1)


def naive_ab_loss(s, t, mu):
    total = 0.0
    for sv, tv in zip(s.reshape(-1), t.reshape(-1)):
        if tv <= 0 and sv > -mu:
            total += (sv + mu) ** 2
        elif tv > 0 and sv <= mu:
            total += (sv - mu) ** 2
    return total


def test_ab_loss_hand_computed():
    # (s, t): t<=0 & s>-1 -> (s+1)^2 ; t>0 & s<=1 -> (s-1)^2 ; else 0. Ties at s=+-1 and t=0.
    s = torch.tensor([0.5, -2.0, -1.0, 0.0, 2.0, 1.0, -0.5])
    t = torch.tensor([-1.0, -1.0, -3.0, 0.0, 1.0, 1.0, 2.0])
    expected = 2.25 + 0 + 0 + 1 + 0 + 0 + 2.25
    assert ab_loss(s, t).item() == pytest.approx(expected)


@pytest.mark.parametrize("mu", [1.0, 0.5])
def test_ab_loss_matches_naive_with_ties(mu):
    gen = torch.Generator().manual_seed(0)
    s = torch.randint(-8, 8, (3, 4, 3, 3), generator=gen) * 0.25
    t = torch.randint(-4, 4, (3, 4, 3, 3), generator=gen) * 0.5
    assert (s.abs() == mu).any() and (t == 0).any()
    assert ab_loss(s, t, mu).item() == pytest.approx(naive_ab_loss(s.numpy(), t.numpy(), mu))
    with pytest.raises(ValueError, match="shape"):
        ab_loss(s, t[:1], mu)


def models(first_stride=1):
    torch.manual_seed(0)
    return TinyNet((3, 6), first_stride=first_stride), TinyNet((4, 8)), torch.randn(4, 3, 8, 8)


@pytest.mark.parametrize("position, positions, indices", [
    ("prerelu", "all", [0, 1]), ("block", "all", [0, 1]), ("prerelu", "last", [1]), ("prerelu", [0], [0]),
])
def test_ab_term_weights_positions_and_divides_by_batch(position, positions, indices):
    student, teacher, x = models()
    term = TERMS.get("ab")(position=position, positions=positions, margin=0.5)
    term.setup(make_ctx(student, teacher, x))
    assert [(c[0].in_channels, c[0].out_channels) for c in term.connectors] == [((3, 6)[i], (4, 8)[i]) for i in indices]
    student.train()
    inp = make_input(student, teacher, x)
    feats = (lambda f: f.stages) if position == "prerelu" else (lambda f: f.extra["block"])
    expected = 0.0
    for j, i in enumerate(indices):
        s = term.connectors[j](feats(inp.student)[i]).detach().numpy()
        expected += naive_ab_loss(s, feats(inp.teacher)[i].numpy(), 0.5) * 2.0 ** (i - 1)
    assert term(inp).item() == pytest.approx(expected / 4, rel=1e-5)


def test_ab_term_gradients():
    student, teacher, x = models()
    term = TERMS.get("ab")()
    term.setup(make_ctx(student, teacher, x))
    student.train()
    term(make_input(student, teacher, x)).backward()
    assert all(g is not None and g.abs().sum() > 0 for g in grads_of(term.connectors))
    assert all(g is not None for g in grads_of(student.convs))
    assert all(g is None for g in grads_of(teacher))


@pytest.mark.parametrize("options, match", [
    ({"margin": 0}, "ab.margin"),
    ({"margin": "1"}, "ab.margin"),
    ({"position": "post"}, "ab.position"),
    ({"positions": "first"}, "ab.positions"),
])
def test_ab_bad_options(options, match):
    with pytest.raises(ConfigError, match=match):
        TERMS.get("ab")(**options)


def test_ab_spatial_mismatch():
    student, teacher, x = models(first_stride=2)
    with pytest.raises(ConfigError, match="ab: at stage 0"):
        TERMS.get("ab")().setup(make_ctx(student, teacher, x))
