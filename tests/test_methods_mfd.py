"""MFD's MMD loss against a naive per-cell loop, hand-computed cases, and the term's contract."""
from __future__ import annotations

import math

import pytest
import torch

from fairdistill.errors import ConfigError
from fairdistill.methods.base import TERMS, SetupContext, TermInput
from fairdistill.methods.mfd import MFD, joint_mmd_loss, mmd_loss
from fairdistill.models.base import Features


def naive_kernel(a, b, kernel, bandwidth):
    if kernel == "poly":
        return (a @ b.t()) ** 2
    d = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    return torch.exp(-d / bandwidth)


def naive_mmd(s, t, y, g, sigma, kernel, num_classes, num_groups):
    """Per-cell loop straight from reference mfd.md §1.2-1.3 (float64, explicit differences)."""
    s = s.reshape(len(s), -1).double()
    t = t.reshape(len(t), -1).double()
    if kernel == "poly":
        s = s / s.norm(dim=1, keepdim=True)
        t = t / t.norm(dim=1, keepdim=True)
        bandwidth = None
    else:
        # the bandwidth is a constant of the batch: no gradient flows through it
        bandwidth = 2 * sigma * ((t[:, None, :] - s[None, :, :]) ** 2).sum(-1).mean().detach()
    total = torch.zeros((), dtype=torch.float64)
    for c in range(num_classes):
        tc = t[y == c]
        if len(tc) == 0:
            continue
        for k in range(num_groups):
            sc = s[(y == c) & (g == k)]
            if len(sc) == 0:
                continue
            total = total + (
                naive_kernel(tc, tc, kernel, bandwidth).mean()
                + naive_kernel(sc, sc, kernel, bandwidth).mean()
                - 2 * naive_kernel(tc, sc, kernel, bandwidth).mean()
            )
    return total


def random_case(seed, batch, dims, num_classes, num_groups):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(batch, *dims, generator=gen, dtype=torch.float64)
    t = torch.randn(batch, *dims, generator=gen, dtype=torch.float64) + 0.5
    y = torch.randint(0, num_classes, (batch,), generator=gen)
    g = torch.randint(0, num_groups, (batch,), generator=gen)
    return s, t, y, g


@pytest.mark.parametrize("kernel", ["rbf", "poly"])
@pytest.mark.parametrize(
    "seed,batch,dims,num_classes,num_groups,sigma",
    [(0, 24, (5,), 3, 2, 1.0), (1, 17, (2, 3, 3), 4, 4, 0.5), (2, 9, (7,), 5, 4, 2.0)],
)
def test_mmd_matches_naive_loop(kernel, seed, batch, dims, num_classes, num_groups, sigma):
    s, t, y, g = random_case(seed, batch, dims, num_classes, num_groups)
    got = mmd_loss(s, t, y, g, sigma=sigma, kernel=kernel, num_classes=num_classes, num_groups=num_groups)
    want = naive_mmd(s, t, y, g, sigma, kernel, num_classes, num_groups)
    assert torch.allclose(got, want, rtol=1e-6, atol=0)


def test_mmd_singleton_and_absent_cells():
    # 4 groups, 3 classes: class 2 absent, cell (0, 3) has one sample, cell (1, 0) absent
    y = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    g = torch.tensor([0, 0, 1, 2, 3, 1, 1, 2, 3, 3])
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(10, 6, generator=gen, dtype=torch.float64)
    t = torch.randn(10, 6, generator=gen, dtype=torch.float64)
    for kernel in ("rbf", "poly"):
        got = mmd_loss(s, t, y, g, kernel=kernel, num_classes=3, num_groups=4)
        want = naive_mmd(s, t, y, g, 1.0, kernel, 3, 4)
        assert torch.allclose(got, want, rtol=1e-6, atol=0)
    # inferred sizes give the same value (absent trailing class changes nothing)
    assert torch.allclose(mmd_loss(s, t, y, g), mmd_loss(s, t, y, g, num_classes=3, num_groups=4))


def test_mmd_gradient_matches_naive_loop():
    s, t, y, g = random_case(4, 20, (4,), 3, 2)
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    mmd_loss(s1, t, y, g, num_classes=3, num_groups=2).backward()
    naive_mmd(s2, t, y, g, 1.0, "rbf", 3, 2).backward()
    assert torch.allclose(s1.grad, s2.grad, rtol=1e-6, atol=1e-12)


def test_mmd_hand_computed_rbf():
    # 1-d features; teacher all 0; student 0 (group 0) and 2 (group 1); one class.
    # sbar = mean of (0-0)^2, (0-2)^2 over the 2x2 teacher-student pairs = 2 -> bandwidth 4.
    # cell (0,0): all kernels 1 -> 0. cell (0,1): 1 + 1 - 2 exp(-4/4).
    s = torch.tensor([[0.0], [2.0]], dtype=torch.float64)
    t = torch.zeros(2, 1, dtype=torch.float64)
    y = torch.tensor([0, 0])
    g = torch.tensor([0, 1])
    got = mmd_loss(s, t, y, g)
    assert got.item() == pytest.approx(2 - 2 * math.exp(-1), rel=1e-9)
    # sigma multiplies the bandwidth: sigma=2 -> exp(-4/8)
    assert mmd_loss(s, t, y, g, sigma=2.0).item() == pytest.approx(2 - 2 * math.exp(-0.5), rel=1e-9)


def test_mmd_hand_computed_poly():
    # normalised: teacher [1,0],[1,0]; student [1,0] (g0), [0,1] (g1): cell g1 gives 1 + 1 - 0
    s = torch.tensor([[3.0, 0.0], [0.0, 0.5]], dtype=torch.float64)
    t = torch.tensor([[2.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    got = mmd_loss(s, t, torch.tensor([0, 0]), torch.tensor([0, 1]), kernel="poly")
    assert got.item() == pytest.approx(2.0, rel=1e-12)


def test_mmd_zero_when_student_equals_teacher_in_every_group():
    # S_{c,g} identical to T_c as a multiset for every g -> every cell's MMD is 0
    t = torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.0, 1.0], [2.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 0])
    g = torch.tensor([0, 0, 1, 1])
    assert abs(mmd_loss(t.clone(), t, y, g).item()) < 1e-9


def test_joint_mmd_matches_naive():
    s, t, _, _ = random_case(5, 12, (3,), 2, 2)
    zeros = torch.zeros(12, dtype=torch.long)
    # one class and one group: the conditional loss has a single cell equal to the joint MMD
    assert torch.allclose(joint_mmd_loss(s, t), naive_mmd(s, t, zeros, zeros, 1.0, "rbf", 1, 1), rtol=1e-6)


def test_mmd_bad_inputs():
    s = torch.randn(4, 3)
    with pytest.raises(ValueError, match="kernel"):
        mmd_loss(s, s, torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long), kernel="linear")
    with pytest.raises(ValueError, match="dims"):
        mmd_loss(s, torch.randn(4, 5), torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        mmd_loss(s, s, torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long))


def _features(emb):
    return Features(logits=torch.zeros(len(emb), 2), stages=[], embedding=emb)


def _ctx(student_emb, teacher_emb, num_classes=2, num_groups=2):
    return SetupContext(
        teacher=None, student_features=_features(student_emb), teacher_features=_features(teacher_emb),
        num_classes=num_classes, num_groups=num_groups,
        device=torch.device("cpu"),
    )


def test_term_is_half_mmd_and_detaches_teacher():
    assert TERMS.get("mfd") is MFD
    s, t, y, g = random_case(6, 16, (2, 2, 2), 2, 2)
    s.requires_grad_()
    t.requires_grad_()
    term = MFD(sigma=0.7)
    term.setup(_ctx(s.detach(), t.detach()))
    inp = TermInput(x=None, y=y, g=g, student=_features(s), teacher=_features(t))
    out = term(inp)
    assert torch.allclose(out, 0.5 * naive_mmd(s.detach(), t.detach(), y, g, 0.7, "rbf", 2, 2), rtol=1e-6)
    out.backward()
    assert s.grad is not None and t.grad is None
    joint = MFD(joint=True)
    joint.setup(_ctx(s.detach(), t.detach()))
    assert torch.allclose(joint(inp), 0.5 * joint_mmd_loss(s.detach(), t.detach()))


def test_term_config_errors():
    with pytest.raises(ConfigError, match="mfd.sigma"):
        MFD(sigma=0)
    with pytest.raises(ConfigError, match="mfd.kernel"):
        MFD(kernel="gauss")
    with pytest.raises(ConfigError, match="mfd.joint"):
        MFD(joint="yes")
    with pytest.raises(ConfigError, match="same architecture|architecture"):
        MFD().setup(_ctx(torch.zeros(2, 8), torch.zeros(2, 4)))
