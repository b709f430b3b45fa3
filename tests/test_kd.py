"""Hinton KD loss against a NumPy computation and hand-computed values."""
import math

import numpy as np
import pytest
import torch

from fairdistill.methods.kd import KD, kd_loss


def np_kd(s, t, T):
    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    ps, pt = softmax(s / T), softmax(t / T)
    return T * T * np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), axis=1))


@pytest.mark.parametrize("T", [1.0, 3.0, 4.0])
def test_kd_matches_numpy(T):
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(6, 5)), rng.normal(size=(6, 5)) * 2
    got = kd_loss(torch.tensor(s), torch.tensor(t), T).item()
    assert got == pytest.approx(np_kd(s, t, T), rel=1e-10)


def test_kd_hand_computed():
    # two classes, T = 1: teacher (0.5, 0.5), student softmax(log 3, 0) = (0.75, 0.25)
    s = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    t = torch.zeros(1, 2, dtype=torch.float64)
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert kd_loss(s, t, 1.0).item() == pytest.approx(expected)
    # T = 2 scales logits by 1/2 and the loss by 4
    p = torch.softmax(s / 2, 1)[0]
    expected2 = 4 * (0.5 * math.log(0.5 / p[0].item()) + 0.5 * math.log(0.5 / p[1].item()))
    assert kd_loss(s, t, 2.0).item() == pytest.approx(expected2)


def test_kd_zero_when_equal_and_gradient_only_to_student():
    s = torch.randn(4, 3, requires_grad=True)
    t = s.detach().clone()
    assert kd_loss(s, t, 3.0).item() == pytest.approx(0.0, abs=1e-7)
    kd_loss(s, t + torch.randn(4, 3), 3.0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_kd_term_rejects_bad_temperature():
    from fairdistill.errors import ConfigError

    with pytest.raises(ConfigError, match="kd.T"):
        KD(T=0)
