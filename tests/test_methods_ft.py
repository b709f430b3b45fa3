"""Factor transfer: factor_loss, paraphraser/translator and the ft-paraphraser / ft terms."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from test_methods_fakes import TinyNet, grads_of, make_ctx, make_input

from fairdistill.errors import ConfigError
from fairdistill.methods.base import TERMS
from fairdistill.methods.ft import Paraphraser, Translator, factor_loss

torch.set_num_threads(1)


def naive_factor_loss(s, t):
    out = []
    for b in range(s.shape[0]):
        fs, ft = s[b].reshape(-1), t[b].reshape(-1)
        out.extend(np.abs(fs / np.linalg.norm(fs) - ft / np.linalg.norm(ft)).tolist())
    return float(np.mean(out))


def test_factor_loss_hand_computed_and_naive():
    s = torch.tensor([[[[3.0]], [[4.0]]]])  # factor (0.6, 0.8)
    t = torch.tensor([[[[0.0]], [[-2.0]]]])  # factor (0, -1)
    assert factor_loss(s, t).item() == pytest.approx((0.6 + 1.8) / 2)
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 2, 4, 4, generator=gen), torch.randn(3, 2, 4, 4, generator=gen)
    assert factor_loss(s, t).item() == pytest.approx(naive_factor_loss(s.numpy(), t.numpy()), rel=1e-5)
    with pytest.raises(ValueError, match="shape"):
        factor_loss(s, t[:, :1])


def test_paraphraser_and_translator_architecture():
    p = Paraphraser(8, rate=0.5)
    convs = [m for m in p.encoder if isinstance(m, nn.Conv2d)]
    deconvs = [m for m in p.decoder if isinstance(m, nn.ConvTranspose2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(8, 8), (8, 4), (4, 4)]
    assert [(c.in_channels, c.out_channels) for c in deconvs] == [(4, 4), (4, 8), (8, 8)]
    assert all(c.kernel_size == (3, 3) and c.stride == (1, 1) for c in convs + deconvs)
    relus = [m for m in p.modules() if isinstance(m, nn.LeakyReLU)]
    assert len(relus) == 6 and all(r.negative_slope == 0.1 for r in relus)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in p.modules())
    x = torch.randn(2, 8, 5, 5)
    assert p(x).shape == x.shape and p.encoder(x).shape == (2, 4, 5, 5)
    tr = Translator(6, 4)
    assert [(c.in_channels, c.out_channels) for c in tr if isinstance(c, nn.Conv2d)] == [(6, 6), (6, 4), (4, 4)]


def setup_pair(first_stride=1, name="para", **para_options):
    torch.manual_seed(0)
    student, teacher, x = TinyNet((3, 6), first_stride=first_stride), TinyNet((4, 8)), torch.randn(4, 3, 8, 8)
    para = TERMS.get("ft-paraphraser")(**para_options)
    ft = TERMS.get("ft")(paraphraser=name)
    terms = {"para": para, "ft": ft}
    ctx = make_ctx(student, teacher, x, terms=terms)
    ft.setup(ctx)  # order must not matter
    para.setup(ctx)
    return student, teacher, x, para, ft


def test_paraphraser_term_reconstruction_loss_and_gradients():
    student, teacher, x, para, _ = setup_pair()
    inp = make_input(student, teacher, x)
    t = inp.teacher.extra["block"][-1]
    loss = para(inp)
    assert loss.item() == pytest.approx((para.paraphraser(t) - t).abs().mean().item())
    loss.backward()
    assert all(g is not None for g in grads_of(para))
    assert all(g is None for g in grads_of(student)) and all(g is None for g in grads_of(teacher))


@pytest.mark.parametrize("position", ["block", "prerelu"])
def test_ft_term_value_and_frozen_paraphraser(position):
    student, teacher, x, para, ft = setup_pair(position=position)
    assert ft.translator[0].in_channels == 6 and ft.translator[-2].out_channels == 4
    assert not any(p is q for p in ft.parameters() for q in para.parameters())
    student.train()
    inp = make_input(student, teacher, x)
    pick = (lambda f: f.stages[-1]) if position == "prerelu" else (lambda f: f.extra["block"][-1])
    with torch.no_grad():
        expected = naive_factor_loss(ft.translator(pick(inp.student)).numpy(),
                                     para.paraphraser.encoder(pick(inp.teacher)).numpy())
    loss = ft(inp)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert all(g is not None for g in grads_of(ft.translator))
    assert all(g is not None for g in grads_of(student.convs))
    assert all(g is None for g in grads_of(para)) and all(g is None for g in grads_of(teacher))


def test_ft_pools_the_larger_factor():
    student, teacher, x, para, ft = setup_pair(first_stride=2, name=None)
    inp = make_input(student, teacher, x)
    with torch.no_grad():
        f_s = ft.translator(inp.student.extra["block"][-1])
        f_t = F.adaptive_avg_pool2d(para.paraphraser.encoder(inp.teacher.extra["block"][-1]), f_s.shape[2:])
    assert ft(inp).item() == pytest.approx(naive_factor_loss(f_s.numpy(), f_t.numpy()), rel=1e-5)


def test_ft_needs_its_paraphraser():
    torch.manual_seed(0)
    student, teacher, x = TinyNet((3, 6)), TinyNet((4, 8)), torch.randn(2, 3, 8, 8)
    with pytest.raises(ConfigError, match="0 ft-paraphraser terms"):
        TERMS.get("ft")().setup(make_ctx(student, teacher, x))
    two = {"a": TERMS.get("ft-paraphraser")(), "b": TERMS.get("ft-paraphraser")()}
    with pytest.raises(ConfigError, match="2 ft-paraphraser terms"):
        TERMS.get("ft")().setup(make_ctx(student, teacher, x, terms=two))
    with pytest.raises(ConfigError, match="'c' is not a configured ft-paraphraser.*a, b"):
        TERMS.get("ft")(paraphraser="c").setup(make_ctx(student, teacher, x, terms=two))


@pytest.mark.parametrize("term, options, match", [
    ("ft-paraphraser", {"rate": 0}, "ft-paraphraser.rate"),
    ("ft-paraphraser", {"rate": "half"}, "ft-paraphraser.rate"),
    ("ft-paraphraser", {"position": "pre"}, "ft-paraphraser.position"),
    ("ft", {"paraphraser": 3}, "ft.paraphraser"),
])
def test_ft_bad_options(term, options, match):
    with pytest.raises(ConfigError, match=match):
        TERMS.get(term)(**options)
