"""Jacobian matching: input gradients, jacobian_loss and the jacobian term (double backprop)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from test_methods_fakes import TinyNet

from fairdistill.errors import TrainingError
from fairdistill.methods.base import TERMS, TermInput
from fairdistill.methods.jacobian import input_gradient, jacobian_loss
from fairdistill.models.base import FeatureModel, Features

torch.set_num_threads(1)


class LinearNet(FeatureModel):
    """logits = W vec(x) + b, so d z_k / d x = W[k] exactly."""

    def __init__(self, in_features=12, num_classes=3):
        super().__init__()
        self.stage_channels = []
        self.fc = nn.Linear(in_features, num_classes)

    def forward_features(self, x):
        emb = x.flatten(1)
        return Features(logits=self.fc(emb), stages=[], embedding=emb)


def step_input(student, teacher, x, y):
    x = x.clone().requires_grad_(True)  # what the trainer does for input_grad terms
    return TermInput(x=x, y=y, g=torch.zeros_like(y), student=student.forward_features(x),
                     teacher=teacher.forward_features(x))


def test_jacobian_loss_hand_computed():
    s = torch.tensor([[3.0, 4.0], [1.0, 0.0]])  # normalised: (0.6, 0.8), (1, 0)
    t = torch.tensor([[0.0, 2.0], [-5.0, 0.0]])  # normalised: (0, 1), (-1, 0)
    # sample 0: 0.36 + 0.04 = 0.4; sample 1: 4; mean 2.2
    assert jacobian_loss(s, t).item() == pytest.approx(2.2)


def test_input_gradient_of_linear_model_is_the_weight_row():
    torch.manual_seed(0)
    net = LinearNet()
    x = torch.randn(5, 3, 2, 2, requires_grad=True)
    y = torch.tensor([0, 2, 1, 2, 0])
    grad = input_gradient(net(x), y, x, create_graph=False)
    assert torch.allclose(grad.flatten(1), net.fc.weight[y].detach())


def test_input_gradient_matches_per_sample_autograd_on_a_conv_net():
    torch.manual_seed(0)
    net = TinyNet((3, 4), bn=False)
    x = torch.randn(3, 3, 6, 6, requires_grad=True)
    y = torch.tensor([1, 0, 2])
    grad = input_gradient(net(x), y, x, create_graph=False)
    for b in range(3):
        xb = x[b:b + 1].detach().clone().requires_grad_(True)
        (gb,) = torch.autograd.grad(net(xb)[0, y[b]], xb)
        assert torch.allclose(grad[b], gb[0], atol=1e-6)


def test_input_gradient_needs_graphs():
    net = LinearNet()
    x = torch.randn(2, 12)
    with pytest.raises(TrainingError, match="input_grad"):
        input_gradient(net(x), torch.zeros(2, dtype=torch.long), x, create_graph=False)
    x.requires_grad_(True)
    with torch.no_grad():
        logits = net(x)
    with pytest.raises(TrainingError, match="teacher_grad"):
        input_gradient(logits, torch.zeros(2, dtype=torch.long), x, create_graph=False)


def test_jacobian_term_value_and_double_backprop_against_closed_form():
    torch.manual_seed(1)
    student, teacher = LinearNet(), LinearNet()
    term = TERMS.get("jacobian")()
    assert term.input_grad and term.teacher_grad and list(term.parameters()) == []
    x, y = torch.randn(4, 12), torch.tensor([0, 1, 2, 1])
    loss = term(step_input(student, teacher, x, y))
    loss.backward()

    w_s = student.fc.weight.detach().clone().requires_grad_(True)
    w_t = teacher.fc.weight.detach()
    closed = ((F.normalize(w_s[y], dim=1) - F.normalize(w_t[y], dim=1)) ** 2).sum(1).mean()
    closed.backward()
    assert loss.item() == pytest.approx(closed.item(), rel=1e-6)
    assert torch.allclose(student.fc.weight.grad, w_s.grad, atol=1e-6)
    assert all(p.grad is None for p in teacher.parameters())


def test_jacobian_term_zero_for_identical_direction():
    torch.manual_seed(2)
    student, teacher = LinearNet(), LinearNet()
    with torch.no_grad():
        teacher.fc.weight.copy_(3 * student.fc.weight)
    x, y = torch.randn(3, 12), torch.tensor([0, 1, 2])
    assert TERMS.get("jacobian")()(step_input(student, teacher, x, y)).item() == pytest.approx(0, abs=1e-6)
