"""Attention transfer: at_loss against a naive computation and the at term."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_methods_fakes import TinyNet, grads_of, make_ctx, make_input

from fairdistill.errors import ConfigError
from fairdistill.methods.at import at_loss
from fairdistill.methods.base import TERMS

torch.set_num_threads(1)


def naive_at_loss(s, t):
    """Per sample: map[h, w] = mean_c f^2, divided by its L2 norm; then mean of squared diffs."""
    diffs = []
    for b in range(s.shape[0]):
        maps = []
        for f in (s[b], t[b]):
            a = (f ** 2).mean(0).reshape(-1)
            maps.append(a / np.sqrt((a ** 2).sum()))
        diffs.extend(((maps[0] - maps[1]) ** 2).tolist())
    return float(np.mean(diffs))


def test_at_loss_hand_computed():
    s = torch.tensor([[[[1.0, 0.0]]]])  # map (1, 0)
    t = torch.tensor([[[[1.0, 1.0]]]])  # map (1, 1)/sqrt(2)
    expected = ((1 - 1 / math.sqrt(2)) ** 2 + 0.5) / 2
    assert at_loss(s, t).item() == pytest.approx(expected)
    assert expected == pytest.approx((2 - math.sqrt(2)) / 2)


def test_at_loss_matches_naive_with_different_channels():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 5, 4, 4, generator=gen), torch.randn(3, 7, 4, 4, generator=gen)
    assert at_loss(s, t).item() == pytest.approx(naive_at_loss(s.numpy(), t.numpy()), rel=1e-5)
    assert at_loss(s, s).item() == 0


def test_at_loss_rejects_spatial_mismatch():
    with pytest.raises(ValueError, match="spatial"):
        at_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 2, 2))


def models(first_stride=1):
    torch.manual_seed(0)
    return TinyNet((3, 6), first_stride=first_stride), TinyNet((4, 8)), torch.randn(4, 3, 8, 8)


@pytest.mark.parametrize("position, positions, indices", [
    ("block", "all", [0, 1]), ("prerelu", "all", [0, 1]), ("block", "last", [1]), ("prerelu", [0], [0]),
])
def test_at_term_sums_at_loss_over_positions(position, positions, indices):
    student, teacher, x = models()
    term = TERMS.get("at")(position=position, positions=positions)
    term.setup(make_ctx(student, teacher, x))
    student.train()
    inp = make_input(student, teacher, x)
    key = "stages" if position == "prerelu" else "block"
    s_list = inp.student.stages if key == "stages" else inp.student.extra["block"]
    t_list = inp.teacher.stages if key == "stages" else inp.teacher.extra["block"]
    expected = sum(naive_at_loss(s_list[i].detach().numpy(), t_list[i].numpy()) for i in indices)
    assert term(inp).item() == pytest.approx(expected, rel=1e-5)


def test_at_term_pools_the_larger_map():
    student, teacher, x = models(first_stride=2)  # student maps are half the teacher's
    term = TERMS.get("at")()
    term.setup(make_ctx(student, teacher, x))
    inp = make_input(student, teacher, x)
    s, t = inp.student.extra["block"], inp.teacher.extra["block"]
    expected = sum(naive_at_loss(s[i].detach().numpy(), F.adaptive_avg_pool2d(t[i], s[i].shape[2:]).numpy())
                   for i in range(2))
    assert term(inp).item() == pytest.approx(expected, rel=1e-5)


def test_at_term_gradients():
    student, teacher, x = models()
    term = TERMS.get("at")()
    term.setup(make_ctx(student, teacher, x))
    student.train()
    term(make_input(student, teacher, x)).backward()
    assert all(g is not None for g in grads_of(student.convs))
    assert all(g is None for g in grads_of(teacher))
    assert list(term.parameters()) == []


@pytest.mark.parametrize("options, match", [
    ({"position": "pre"}, "at.position.*Did you mean 'prerelu'"),
    ({"positions": "every"}, "at.positions"),
])
def test_at_bad_options(options, match):
    with pytest.raises(ConfigError, match=match):
        TERMS.get("at")(**options)


def test_at_block_needs_block_features():
    student, teacher, x = models()
    ctx = make_ctx(student, teacher, x)
    ctx.teacher_features.extra.clear()
    with pytest.raises(ConfigError, match="extra\\['block'\\]"):
        TERMS.get("at")().setup(ctx)
