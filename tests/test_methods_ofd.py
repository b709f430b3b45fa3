"""OFD: BN margin (supplement Eq. 4), partial L2, margin estimate, connector and the ofd term."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from scipy import stats
from test_methods_fakes import TinyNet, grads_of, make_ctx, make_input, randomize_bns

from fairdistill.errors import ConfigError
from fairdistill.methods.base import TERMS
from fairdistill.methods.connector import Connector
from fairdistill.methods import kernels
from fairdistill.methods.kernels import ConvBatchNorm
from fairdistill.methods.ofd import NegativeMean, bn_margin, connector_partial_l2, partial_l2

torch.set_num_threads(1)


# ---- bn_margin -------------------------------------------------------------------------------

def test_bn_margin_reference_values():
    # reference/ofd.md §1.2, checked there against 2M-sample Monte Carlo.
    gamma = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.3])
    beta = torch.tensor([0.0, 0.3, -1.0, -0.2, 1.5])
    expected = torch.tensor([-0.7979, -0.3075, -2.0183, -0.8751, -0.9])
    assert torch.allclose(bn_margin(gamma, beta), expected, atol=1e-4)


def test_bn_margin_matches_truncated_normal_mean():
    rng = np.random.default_rng(0)
    gamma = rng.uniform(-3, 3, 200)
    beta = rng.uniform(-3, 3, 200)
    got = bn_margin(torch.tensor(gamma, dtype=torch.float64), torch.tensor(beta, dtype=torch.float64)).numpy()
    s = np.abs(gamma)
    mass = stats.norm.cdf(-beta / s)
    kept = mass > 1e-3
    assert kept.sum() > 50 and (~kept).sum() > 5  # both branches exercised
    expected = -3 * s
    # E[x | x < 0] for x ~ N(beta, s^2): the normal truncated to (-inf, 0].
    expected[kept] = stats.truncnorm.mean(-np.inf, -beta[kept] / s[kept], loc=beta[kept], scale=s[kept])
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)


def test_bn_margin_monte_carlo():
    gen = torch.Generator().manual_seed(0)
    x = 0.7 * torch.randn(400_000, generator=gen, dtype=torch.float64) + 0.4
    mc = x[x < 0].mean().item()
    assert bn_margin(torch.tensor([-0.7]), torch.tensor([0.4])).item() == pytest.approx(mc, abs=5e-3)


def test_bn_margin_zero_gamma_is_finite_and_continuous():
    m = bn_margin(torch.tensor([0.0, 0.0, 0.0]), torch.tensor([-0.5, 0.0, 0.7]))
    assert torch.isfinite(m).all()
    assert m.tolist() == [-0.5, 0.0, 0.0]
    near = bn_margin(torch.tensor([1e-6, 1e-6]), torch.tensor([-0.5, 0.7]))
    assert torch.allclose(near, torch.tensor([-0.5, 0.0]), atol=1e-5)


def test_bn_margin_keeps_dtype_and_is_always_nonpositive():
    m = bn_margin(torch.randn(64, dtype=torch.float16), torch.randn(64, dtype=torch.float16))
    assert m.dtype == torch.float16 and (m <= 0).all()


# ---- partial_l2 ------------------------------------------------------------------------------

def naive_partial_l2(s, t, m):
    """The 2019 three-case form, element by element (reference/ofd.md §1.1)."""
    total = 0.0
    for idx in np.ndindex(s.shape):
        sv, tv, mv = s[idx], t[idx], m[idx[1]]
        if tv <= mv and sv > mv:
            total += (sv - mv) ** 2
        elif mv < tv <= 0 and sv > tv:
            total += (sv - tv) ** 2
        elif tv > 0:
            total += (sv - tv) ** 2
    return total


def test_partial_l2_hand_computed():
    m = torch.tensor([-1.0])
    # (S, F_t): full L2 for F_t > 0; pushed to m when F_t <= m; to F_t when m < F_t <= 0;
    # zero where S <= max(F_t, m) <= 0, incl. the ties S == T == m and S == T == 0.
    pairs = [(0.5, 2.0), (0.0, -3.0), (-2.0, -3.0), (-0.2, -0.5), (-0.7, -0.5), (1.0, 0.0), (-1.0, 0.0),
             (-1.0, -1.0), (0.0, 0.0)]
    s = torch.tensor([[p[0] for p in pairs]])
    t = torch.tensor([[p[1] for p in pairs]])
    assert partial_l2(s.T.reshape(-1, 1), t.T.reshape(-1, 1), m).item() == pytest.approx(2.25 + 1 + 0.09 + 1)


@pytest.mark.parametrize("shape", [(3, 4, 5, 5), (40, 4)])
def test_partial_l2_matches_three_case_rule_with_ties(shape):
    gen = torch.Generator().manual_seed(1)
    margin = -torch.tensor([0.5, 1.0, 0.25, 1.5])
    # Values on a 0.25 grid so that S == T, F_t == m and F_t == 0 all occur.
    s = torch.randint(-8, 8, shape, generator=gen) * 0.25
    t = torch.randint(-8, 8, shape, generator=gen) * 0.25
    mb = margin.reshape(1, -1, *([1] * (len(shape) - 2)))
    assert ((s == torch.max(t, mb)).any() and (t == mb).any() and (t == 0).any())
    expected = naive_partial_l2(s.numpy(), t.numpy(), margin.numpy())
    assert partial_l2(s, t, margin).item() == pytest.approx(expected, rel=1e-6)


def test_partial_l2_bad_shapes():
    with pytest.raises(ValueError, match="shape"):
        partial_l2(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 2, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="margins"):
        partial_l2(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4), torch.zeros(4))


def autograd_partial_l2(s, t, m):
    """Reference: the masked form differentiated by autograd (teacher side constant)."""
    m = m.reshape(1, -1, *([1] * (s.dim() - 2)))
    target = torch.max(t, m)
    keep = (s > target) | (t > 0)
    return ((s.double() - target.double()) ** 2 * keep).sum()


@pytest.mark.parametrize("channels_last", [False, True])
def test_partial_l2_gradient_is_twice_the_kept_difference(channels_last):
    gen = torch.Generator().manual_seed(4)
    s = torch.randint(-8, 8, (3, 4, 5, 5), generator=gen) * 0.25
    t = torch.randint(-8, 8, (3, 4, 5, 5), generator=gen) * 0.25
    m = -torch.tensor([0.5, 1.0, 0.25, 1.5])
    if channels_last:
        s, t = s.contiguous(memory_format=torch.channels_last), t.contiguous(memory_format=torch.channels_last)
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    partial_l2(s1, t, m).backward()
    autograd_partial_l2(s2, t, m).backward()
    assert torch.equal(s1.grad, s2.grad.float())
    assert (s1.grad == 0).any() and (s1.grad != 0).any()


def test_partial_l2_long_sums_stay_accurate():
    gen = torch.Generator().manual_seed(5)
    s = torch.randn(8, 16, 64, 64, generator=gen) * 3 + 2
    t = torch.randn(8, 16, 64, 64, generator=gen)
    m = -torch.rand(16, generator=gen)
    expected = autograd_partial_l2(s.double(), t.double(), m.double()).item()
    assert partial_l2(s, t, m).item() == pytest.approx(expected, rel=1e-6)


def test_partial_l2_half_inputs_sum_in_float32_and_target_gets_no_gradient():
    gen = torch.Generator().manual_seed(6)
    s = (torch.randn(2, 3, 4, 4, generator=gen)).half().requires_grad_()
    t = torch.randn(2, 3, 4, 4, generator=gen).half().requires_grad_()
    m = -torch.rand(3, generator=gen)
    loss = partial_l2(s, t, m)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(autograd_partial_l2(s.float(), t.float(), m).item(), rel=1e-6)
    loss.backward()
    assert s.grad.dtype == torch.float16 and t.grad is None


# ---- margin estimate -------------------------------------------------------------------------

def test_negative_mean_over_batches_and_fallback():
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(4, 3, 2, 2, generator=gen), torch.randn(5, 3, 2, 2, generator=gen)
    a[:, 2], b[:, 2] = a[:, 2].abs(), b[:, 2].abs()  # channel 2 never negative
    meter = NegativeMean()
    meter.update(a)
    meter.update(b)
    values = np.concatenate([a.numpy().transpose(1, 0, 2, 3).reshape(3, -1), b.numpy().transpose(1, 0, 2, 3).reshape(3, -1)], 1)
    expected = [values[c][values[c] < 0].mean() for c in range(2)] + [-3 * values[2].std()]
    np.testing.assert_allclose(meter.value().numpy(), expected, rtol=1e-5)


# ---- connector -------------------------------------------------------------------------------

def test_connector_structure_and_init():
    torch.manual_seed(0)
    conn = Connector(64, 256)
    conv, bn = conn
    assert conv.kernel_size == (1, 1) and conv.bias is None and conv.in_channels == 64 and conv.out_channels == 256
    assert torch.equal(bn.weight, torch.ones(256)) and torch.equal(bn.bias, torch.zeros(256))
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / 256), rel=0.03)
    assert not any(isinstance(m, torch.nn.ReLU) for m in conn.modules())


def reference_pair(s_channels=5, t_channels=7, seed=0, dtype=torch.float32):
    """A Connector with non-trivial BN parameters and a deep copy run as plain conv + BN."""
    torch.manual_seed(seed)
    conn = Connector(s_channels, t_channels).to(dtype)
    with torch.no_grad():
        conn[1].weight.uniform_(0.5, 2.0)
        conn[1].bias.normal_()
    return conn, copy.deepcopy(conn)


def plain(conn, x):
    return torch.nn.Sequential.forward(conn, x)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_connector_training_matches_conv_then_batch_norm(channels_last, dtype, tol):
    conn, ref = reference_pair(dtype=dtype)
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(4, 5, 6, 6, generator=gen) * 2 + 3).to(dtype)  # a mean far from 0
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(4, 7, 6, 6, generator=gen).to(dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = conn(x1), plain(ref, x2)
    assert y1.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert rel_err(y1, y2) < tol
    (y1 * weight).sum().backward()
    (y2 * weight).sum().backward()
    assert rel_err(x1.grad, x2.grad) < tol
    for p, q in zip(conn.parameters(), ref.parameters()):
        assert rel_err(p.grad, q.grad) < tol
    for name in ("running_mean", "running_var"):
        assert rel_err(getattr(conn[1], name), getattr(ref[1], name)) < tol
    assert conn[1].num_batches_tracked.item() == ref[1].num_batches_tracked.item() == 1


def test_connector_gradcheck_float64():
    conn, _ = reference_pair(2, 3, dtype=torch.float64)
    x = torch.randn(2, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    conv, bn = conn

    def f(x, w, g, b):
        return ConvBatchNorm.apply(x, w, g, b, bn.eps)[0]

    assert torch.autograd.gradcheck(f, (x, conv.weight, bn.weight, bn.bias))


def test_connector_cumulative_running_stats_and_eval_mode():
    conn, ref = reference_pair()
    conn[1].momentum = ref[1].momentum = None
    gen = torch.Generator().manual_seed(8)
    for _ in range(3):
        x = torch.randn(3, 5, 4, 4, generator=gen) + 1
        conn(x), plain(ref, x)
    assert torch.allclose(conn[1].running_mean, ref[1].running_mean, atol=1e-6)
    assert torch.allclose(conn[1].running_var, ref[1].running_var, atol=1e-6)
    conn.eval(), ref.eval()
    x = torch.randn(3, 5, 4, 4, generator=gen)
    assert torch.allclose(conn(x), ref(x), atol=1e-6)  # eval: running statistics


def test_connector_under_autocast_computes_in_float32():
    conn, ref = reference_pair()
    x = torch.randn(2, 5, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conn(x.bfloat16())
    assert y.dtype == torch.float32
    assert torch.allclose(y, plain(ref, x.bfloat16().float()), atol=1e-5)


# ---- connector + partial L2 in one pass ----------------------------------------------------------

@pytest.mark.parametrize("chunk", [None, 2 * 7 * 36])  # one chunk; chunks of 2, 2 and 1 samples
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_connector_partial_l2_equals_the_composition(channels_last, dtype, tol, chunk, monkeypatch):
    if chunk is not None:
        monkeypatch.setattr(kernels, "CHUNK_ELEMENTS", chunk // torch.get_num_threads())
    conn, ref = reference_pair(dtype=dtype)
    gen = torch.Generator().manual_seed(9)
    x = (torch.randn(5, 5, 6, 6, generator=gen) + 1).to(dtype)
    t = torch.randn(5, 7, 6, 6, generator=gen).to(dtype)
    t[0, 0, :2] = 0.0  # ties F_t == 0
    m = -torch.rand(7, generator=gen).to(dtype)
    if channels_last:
        x, t = x.contiguous(memory_format=torch.channels_last), t.contiguous(memory_format=torch.channels_last)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    l1 = connector_partial_l2(conn, x1, t, m)
    l2 = autograd_partial_l2(plain(ref, x2), t, m)
    assert l1.item() == pytest.approx(l2.item(), rel=tol)
    (3 * l1).backward()
    (3 * l2).backward()
    assert rel_err(x1.grad, x2.grad) < tol
    assert x1.grad.is_contiguous(memory_format=torch.channels_last) == channels_last
    for p, q in zip(conn.parameters(), ref.parameters()):
        assert rel_err(p.grad, q.grad) < tol
    for name in ("running_mean", "running_var"):
        assert rel_err(getattr(conn[1], name), getattr(ref[1], name)) < tol


def test_connector_partial_l2_under_autocast_computes_in_float32():
    conn, ref = reference_pair()
    gen = torch.Generator().manual_seed(10)
    x, t, m = torch.randn(2, 5, 4, 4, generator=gen), torch.randn(2, 7, 4, 4, generator=gen), -torch.rand(7, generator=gen)
    xb, tb = x.bfloat16().requires_grad_(), t.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = connector_partial_l2(conn, xb, tb, m)
    loss.backward()
    x2 = xb.detach().float().requires_grad_()
    expected = autograd_partial_l2(plain(ref, x2), tb.float(), m)
    expected.backward()
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert xb.grad.dtype == torch.bfloat16
    assert torch.allclose(xb.grad.float(), x2.grad.float(), rtol=1e-2, atol=1e-2 * x2.grad.abs().max().item())


def test_connector_partial_l2_refuses_a_second_backward():
    conn, _ = reference_pair()
    x = torch.randn(2, 5, 3, 3, requires_grad=True)
    loss = 2 * connector_partial_l2(conn, x, torch.randn(2, 7, 3, 3), -torch.rand(7))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already used"):
        loss.backward()


def test_connector_partial_l2_eval_mode_and_bad_shapes():
    conn, ref = reference_pair()
    x, t, m = torch.randn(2, 5, 3, 3), torch.randn(2, 7, 3, 3), -torch.rand(7)
    conn.eval(), ref.eval()
    assert connector_partial_l2(conn, x, t, m).item() == pytest.approx(partial_l2(ref(x), t, m).item(), rel=1e-6)
    conn.train()
    with pytest.raises(ValueError, match="shape"):
        connector_partial_l2(conn, x, torch.randn(2, 6, 3, 3), m)
    with pytest.raises(ValueError, match="margins"):
        connector_partial_l2(conn, x, t, -torch.rand(6))


# ---- the ofd term ----------------------------------------------------------------------------

def pair(student_channels=(3, 6), teacher_channels=(4, 8), teacher_bn=True, seed=0):
    torch.manual_seed(seed)
    student, teacher = TinyNet(student_channels), TinyNet(teacher_channels, bn=teacher_bn)
    randomize_bns(teacher, seed)
    x = torch.randn(4, 3, 8, 8)
    return student, teacher, x


def build(student, teacher, x, batches=None, **options):
    term = TERMS.get("ofd")(**options)
    term.setup(make_ctx(student, teacher, x, batches=batches))
    return term


def test_ofd_setup_sizes_connectors_and_margins_from_bn():
    student, teacher, x = pair()
    term = build(student, teacher, x)
    assert [(c[0].in_channels, c[0].out_channels) for c in term.connectors] == [(3, 4), (6, 8)]
    for j, bn in enumerate(teacher.stage_bns()):
        assert torch.allclose(getattr(term, f"margin_{j}"), bn_margin(bn.weight, bn.bias))
    assert {"margin_0", "margin_1"} <= set(term.state_dict())


@pytest.mark.parametrize("positions, expected_indices", [("all", [0, 1]), ("last", [1]), ([0], [0]), ([-1], [1])])
def test_ofd_value_is_weighted_partial_l2_over_batch(positions, expected_indices):
    student, teacher, x = pair()
    term = build(student, teacher, x, positions=positions)
    assert term.indices == expected_indices
    student.train()
    inp = make_input(student, teacher, x)
    expected = 0.0
    for j, i in enumerate(expected_indices):
        margin = bn_margin(teacher.stage_bns()[i].weight, teacher.stage_bns()[i].bias)
        s = term.connectors[j](inp.student.stages[i])
        expected += naive_partial_l2(s.detach().numpy(), inp.teacher.stages[i].numpy(), margin.detach().numpy()) / 2 ** (1 - i)
    assert term(inp).item() == pytest.approx(expected / x.shape[0], rel=1e-5)


def test_ofd_gradients_reach_student_and_connectors_not_teacher():
    student, teacher, x = pair()
    term = build(student, teacher, x)
    student.train()
    teacher.train()  # the official teacher BN mode
    inp = make_input(student, teacher, x, teacher_grad=True)  # even with a teacher graph
    term(inp).backward()
    assert all(g is not None and g.abs().sum() > 0 for g in grads_of(term.connectors))
    assert all(g is not None for g in grads_of(student.convs))
    assert all(g is None for g in grads_of(teacher))


def test_ofd_gradients_match_plain_connectors_and_the_masked_form():
    student, teacher, x = pair()
    term = build(student, teacher, x)
    ref_connectors = copy.deepcopy(term.connectors)
    student.train()
    inp = make_input(student, teacher, x)
    stages = [f.detach().requires_grad_() for f in inp.student.stages]
    ref_stages = [f.detach().requires_grad_() for f in inp.student.stages]
    inp.student.stages = stages
    term(inp).backward()
    expected = sum(
        autograd_partial_l2(plain(ref_connectors[i], ref_stages[i]), inp.teacher.stages[i], getattr(term, f"margin_{i}"))
        / 2 ** (1 - i) for i in range(2)) / x.shape[0]
    expected.backward()
    for a, b in zip(stages, ref_stages):
        assert rel_err(a.grad, b.grad.float()) < 1e-5
    for p, q in zip(term.connectors.parameters(), ref_connectors.parameters()):
        assert rel_err(p.grad, q.grad) < 1e-5


def test_ofd_estimates_margins_without_bn():
    student, teacher, x = pair(teacher_bn=False)
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(3, 3, 8, 8, generator=gen), torch.zeros(3), torch.zeros(3)) for _ in range(3)]
    teacher.train()
    term = build(student, teacher, x, batches=batches, estimate_batches=2)
    assert not teacher.training  # make_ctx leaves it in eval; the estimate restores that mode
    with torch.no_grad():
        feats = [teacher.forward_features(b[0]).stages for b in batches[:2]]
    for i in range(2):
        values = torch.cat([f[i].transpose(0, 1).reshape(f[i].shape[1], -1) for f in feats], 1).numpy()
        expected = [v[v < 0].mean() if (v < 0).any() else -3 * v.std() for v in values]
        np.testing.assert_allclose(getattr(term, f"margin_{i}").numpy(), expected, rtol=1e-5)


def test_ofd_estimate_option_overrides_bn_and_restores_teacher_mode():
    student, teacher, x = pair()
    batches = [(x, None, None)]
    ctx = make_ctx(student, teacher, x, batches=batches)
    teacher.train()
    term = TERMS.get("ofd")(margin="estimate")
    term.setup(ctx)
    assert teacher.training
    meter = NegativeMean()
    teacher.eval()
    with torch.no_grad():
        meter.update(teacher.forward_features(x).stages[1])
    assert torch.allclose(term.margin_1, meter.value())


def test_ofd_estimate_needs_batches():
    student, teacher, x = pair(teacher_bn=False)
    with pytest.raises(ConfigError, match="ofd.margin.*training batches"):
        build(student, teacher, x)


@pytest.mark.parametrize("options, match", [
    ({"positions": "first"}, "ofd.positions"),
    ({"positions": []}, "ofd.positions"),
    ({"positions": [True]}, "ofd.positions"),
    ({"margin": "running"}, "ofd.margin"),
    ({"estimate_batches": 0}, "ofd.estimate_batches"),
])
def test_ofd_bad_options(options, match):
    with pytest.raises(ConfigError, match=match):
        TERMS.get("ofd")(**options)


def test_ofd_bad_models():
    student, teacher, x = pair()
    with pytest.raises(ConfigError, match="out of range"):
        build(student, teacher, x, positions=[2])
    with pytest.raises(ConfigError, match="same stage twice"):
        build(student, teacher, x, positions=[1, -1])
    with pytest.raises(ConfigError, match="spatial sizes must match"):
        build(TinyNet((3, 6), first_stride=2), teacher, x)
    with pytest.raises(ConfigError, match="2 stages and the teacher 3"):
        build(student, TinyNet((4, 8, 8)), x)
