"""Adversarial debiasing: gradient reversal, batched per-class adversaries, the loss reduction."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fairdistill.errors import ConfigError
from fairdistill.methods.adversary import Adversary, ClasswiseAdversaries, adversary_loss, reverse_gradient
from fairdistill.methods.base import TERMS, SetupContext, TermInput
from fairdistill.models.base import Features


def loop_adversaries(batched: ClasswiseAdversaries):
    """K separate Linear -> ReLU -> Linear MLPs holding copies of the batched weights."""
    mlps = []
    for k in range(len(batched.mlps)):
        src = batched.mlps[k]
        first = nn.Linear(src[0].in_features, src[0].out_features)
        second = nn.Linear(src[2].in_features, src[2].out_features)
        with torch.no_grad():
            first.weight.copy_(src[0].weight)
            first.bias.copy_(src[0].bias)
            second.weight.copy_(src[2].weight)
            second.bias.copy_(src[2].bias)
        mlps.append(nn.Sequential(first, nn.ReLU(), second))
    return mlps


def official_style_loss(mlps, logits, y, g):
    """Sum over present classes of CrossEntropyLoss() (mean) of adversary c on class-c rows."""
    total = 0
    for c, mlp in enumerate(mlps):
        rows = y == c
        if rows.any():
            total = total + F.cross_entropy(mlp(logits[rows]), g[rows])
    return total


def test_gradient_reversal_forward_and_backward():
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    out = reverse_gradient(x, 2.5)
    assert torch.equal(out, x.detach())
    (out * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.allclose(x.grad, torch.tensor([-2.5, -5.0, -7.5]))


def test_batched_adversaries_match_loop():
    torch.manual_seed(0)
    batched = ClasswiseAdversaries(num_adversaries=4, in_features=4, hidden=5, out_features=3)
    mlps = loop_adversaries(batched)
    x = torch.randn(11, 4)
    index = torch.tensor([0, 3, 3, 1, 0, 2, 2, 2, 1, 0, 3])
    got = batched(x, index)
    want = torch.stack([mlps[k](x[i]) for i, k in enumerate(index.tolist())])
    assert torch.allclose(got, want, atol=1e-6)


def test_init_matches_linear_bounds():
    torch.manual_seed(1)
    adv = ClasswiseAdversaries(3, in_features=16, hidden=32, out_features=2)
    for mlp in adv.mlps:
        assert mlp[0].weight.abs().max() <= 1 / 16**0.5 and mlp[0].bias.abs().max() <= 1 / 16**0.5
        assert mlp[2].weight.abs().max() <= 1 / 32**0.5 and mlp[2].bias.abs().max() <= 1 / 32**0.5


def test_loss_is_sum_of_per_class_means():
    torch.manual_seed(2)
    batched = ClasswiseAdversaries(3, 3, 8, 2)
    mlps = loop_adversaries(batched)
    logits = torch.randn(10, 3)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 0, 0])  # class 2 absent, unequal class sizes
    g = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1, 0])
    got = adversary_loss(batched(logits, y), g, y, num_classes=3)
    want = official_style_loss(mlps, logits, y, g)
    assert torch.allclose(got, want, atol=1e-6)
    # hand check of the reduction on fixed per-sample scores: sum_c mean_{y=c} CE
    scores = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    ce = [torch.log(torch.tensor(2.0)), torch.log(1 + torch.exp(torch.tensor(-2.0))), torch.log(1 + torch.exp(torch.tensor(-1.0)))]
    got = adversary_loss(scores, torch.tensor([1, 0, 1]), torch.tensor([0, 0, 1]), num_classes=2)
    assert got.item() == pytest.approx(((ce[0] + ce[1]) / 2 + ce[2]).item(), rel=1e-6)


def _setup_term(term, num_classes=3, num_groups=2, batch=6):
    logits = torch.zeros(batch, num_classes)
    ctx = SetupContext(
        teacher=None, student_features=Features(logits, [], logits), teacher_features=None,
        num_classes=num_classes, num_groups=num_groups, device=torch.device("cpu"),
    )
    term.setup(ctx)
    return term


def test_term_gradients_reversed_for_student_ordinary_for_adversary():
    assert TERMS.get("adversary") is Adversary
    torch.manual_seed(3)
    term = _setup_term(Adversary(grl_lambda=2.0, hidden=4))
    assert term.needs_teacher is False
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    g = torch.tensor([0, 1, 1, 1, 0, 0])
    logits = torch.randn(6, 3, requires_grad=True)
    inp = TermInput(x=None, y=y, g=g, student=Features(logits, [], logits), teacher=None)
    loss = term(inp)
    loss.backward()

    # reference: the same adversaries without reversal, gradients of the plain loss
    mlps = loop_adversaries(term.adversaries)
    plain_logits = logits.detach().clone().requires_grad_()
    ref = official_style_loss(mlps, plain_logits, y, g)
    ref.backward()
    assert torch.allclose(loss, ref, atol=1e-6)
    assert torch.allclose(logits.grad, -2.0 * plain_logits.grad, atol=1e-6)
    for k, mlp in enumerate(mlps):
        assert torch.allclose(term.adversaries.mlps[k][0].weight.grad, mlp[0].weight.grad, atol=1e-6)
        assert torch.allclose(term.adversaries.mlps[k][2].bias.grad, mlp[2].bias.grad, atol=1e-6)


def test_term_optimizer_spec_and_errors():
    assert Adversary().optimizer == {"name": "adam", "lr": 0.003, "weight_decay": 0.0}
    assert Adversary(lr=3e-4).optimizer["lr"] == 3e-4
    with pytest.raises(ConfigError, match="adversary.grl_lambda"):
        Adversary(grl_lambda=-1)
    with pytest.raises(ConfigError, match="adversary.lr"):
        Adversary(lr="fast")
    with pytest.raises(ConfigError, match="adversary.hidden"):
        Adversary(hidden=0)
    with pytest.raises(ConfigError, match="at least 2 groups"):
        _setup_term(Adversary(), num_groups=1)
    term = _setup_term(Adversary(), num_classes=4, num_groups=3)
    assert len(term.adversaries.mlps) == 4
    assert tuple(term.adversaries.mlps[0][0].weight.shape) == (32, 4)
    assert tuple(term.adversaries.mlps[3][2].weight.shape) == (3, 32)
