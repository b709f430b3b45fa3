"""The official protocols of issue 11, each against a re-implementation of the official code's
order of operations (docs/fidelity.md)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fairdistill.errors import ConfigError
from fairdistill.models import build_model
from fairdistill.models.pyramidnet import pyramidnet
from fairdistill.models.wrn import wrn

# ----------------------------------------------------------------------------- OFD: BN updated twice


def official_wrn_extract(model, x):
    """CIFAR-100/models/WideResNet.py ``extract_feature(x, preReLU=True)``: the plain forward
    (groups computing their own entry BN), then the three BNs applied again, with autograd."""
    feat1 = model.block1(model.conv1(x))
    feat2 = model.block2(feat1)
    feat3 = model.block3(feat2)
    logits = model.fc(F.relu(model.bn1(feat3)).mean(dim=(2, 3)))
    feats = [model.block2.layer[0].bn1(feat1), model.block3.layer[0].bn1(feat2), model.bn1(feat3)]
    return feats, logits


def official_pyramid_extract(model, x, bottleneck: bool):
    """CIFAR-100/models/PyramidNet.py ``extract_feature(x, preReLU=True)``."""
    feat1 = model.layer1(model.bn1(model.conv1(x)))
    feat2 = model.layer2(feat1)
    feat3 = model.layer3(feat2)
    logits = model.fc(F.relu(model.bn_final(feat3)).mean(dim=(2, 3)))
    if bottleneck:
        l2, l3 = model.layer2[0], model.layer3[0]
        feats = [l2.bn2(l2.conv1(l2.bn1(feat1))), l3.bn2(l3.conv1(l3.bn1(feat2))), model.bn_final(feat3)]
    else:
        feats = [model.layer2[0].bn1(feat1), model.layer3[0].bn1(feat2), model.bn_final(feat3)]
    return feats, logits


def _loss(feats, logits, y):
    # any loss that reads the features and the logits (OFD's reads both)
    return F.cross_entropy(logits, y) + sum((f * (i + 1)).square().mean() for i, f in enumerate(feats))


def _one_step(model, extract, x, y):
    """One SGD step (the OFD CIFAR settings) on ``_loss``; returns the features it read."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    feats, logits = extract(model, x)
    _loss(feats, logits, y).backward()
    opt.step()
    return [f.detach() for f in feats]


def _stages_logits(feats):
    return feats.stages, feats.logits


def _bn_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


MODELS_UNDER_TEST = [
    ("wrn", lambda flag: wrn(5, depth=10, widen_factor=2, official_bn_updates=flag), official_wrn_extract),
    ("pyramid-bottleneck", lambda flag: pyramidnet(5, depth=11, alpha=12, bottleneck=True, official_bn_updates=flag),
     lambda m, x: official_pyramid_extract(m, x, True)),
    ("pyramid-basic", lambda flag: pyramidnet(5, depth=8, alpha=12, bottleneck=False, official_bn_updates=flag),
     lambda m, x: official_pyramid_extract(m, x, False)),
]


@pytest.mark.parametrize("name,build,official", MODELS_UNDER_TEST, ids=[m[0] for m in MODELS_UNDER_TEST])
def test_official_bn_updates_match_official_extract_feature(name, build, official):
    torch.manual_seed(0)
    ours = build(True).double().train()
    ref = build(False).double().train()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    with torch.no_grad():  # move the statistics off their initial values first
        ours(x * 2 + 1)
        ref(x * 2 + 1)

    got = _one_step(ours, lambda m, x: _stages_logits(m.forward_features(x)), x, y)
    want = _one_step(ref, official, x, y)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)

    ours_bn, ref_bn = _bn_state(ours), _bn_state(ref)
    assert ours_bn.keys() == ref_bn.keys()
    for k in ours_bn:
        torch.testing.assert_close(ours_bn[k], ref_bn[k], rtol=0, atol=1e-13, msg=k)
    for (k, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12, msg=k)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-12)


def test_second_update_is_the_momentum_formula_and_only_on_the_official_bns():
    torch.manual_seed(1)
    model = wrn(3, depth=10, widen_factor=1, official_bn_updates=True).double().train()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    plain = copy.deepcopy(model)
    feats = model.forward_features(x)
    plain(x)
    g3 = feats.extra["block"][2].detach()
    mu, var = g3.mean(dim=(0, 2, 3)), g3.var(dim=(0, 2, 3), unbiased=True)
    # from r = 0 (mean) and 1 (var), two updates with momentum 0.1: weight 1 - 0.9^2 = 0.19
    torch.testing.assert_close(model.bn1.running_mean, 0.19 * mu, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(model.bn1.running_var, 0.81 + 0.19 * var, rtol=1e-12, atol=1e-14)
    assert int(model.bn1.num_batches_tracked) == 2
    twice = {"block2.layer.0.bn1", "block3.layer.0.bn1", "bn1"}
    for (name, bn), (_, ref) in zip(model.named_modules(), plain.named_modules()):
        if isinstance(bn, nn.BatchNorm2d):
            assert int(bn.num_batches_tracked) == (2 if name in twice else 1), name
            if name not in twice:
                torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=0, atol=0)


def test_official_bn_updates_leave_forward_and_eval_mode_alone():
    torch.manual_seed(2)
    x = torch.randn(4, 3, 8, 8)
    for build in (lambda f: wrn(3, depth=10, widen_factor=1, official_bn_updates=f),
                  lambda f: pyramidnet(3, depth=11, alpha=8, bottleneck=True, official_bn_updates=f)):
        on, off = build(True), build(False)
        off.load_state_dict(on.state_dict())
        on(x), off(x)  # plain forward (teacher training, evaluation): one update each
        for a, b in zip(_bn_state(on).values(), _bn_state(off).values()):
            assert torch.equal(a, b)
        on.eval()
        before = _bn_state(on)
        on.forward_features(x)
        assert all(torch.equal(before[k], v) for k, v in _bn_state(on).items())
        # a teacher with BN in train mode inside an eval-mode model (set_bn_mode "train") still updates twice
        for m in on.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.train()
        on.forward_features(x)
        counts = [int(v) for k, v in _bn_state(on).items() if "num_batches" in k]
        assert max(counts) - min(counts) == 1


def test_official_bn_updates_option_checked_and_on_the_presets():
    assert build_model("wrn-16-2", 10, official_bn_updates=True).official_bn_updates is True
    assert build_model("pyramidnet-110-84", 10, official_bn_updates=True).official_bn_updates is True
    assert build_model("wrn", 10, depth=10).official_bn_updates is False
    with pytest.raises(ConfigError, match="official_bn_updates"):
        build_model("wrn-16-2", 10, official_bn_updates="often")
    with pytest.raises(ConfigError, match="official_bn_updates"):
        pyramidnet(10, depth=8, official_bn_updates=1)


# ----------------------------------------------------------------------------- AD: per-class Adams


class _Reverse(torch.autograd.Function):
    """The official ``ReverseLayerF``: identity forward, gradient times -lambda."""

    @staticmethod
    def forward(ctx, x, lam):
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.neg() * ctx.lam, None


# classes 2 and 3 first appear in batch 1; 3 is absent from batches 2, 3 and 5; 0 from 1 and 3
AD_BATCHES = [[0, 1, 1, 0, 1, 0], [1, 2, 3, 2, 1, 3], [0, 0, 2, 1, 2, 1], [2, 2, 2, 1, 2, 1],
              [0, 1, 2, 3, 3, 0], [1, 1, 2, 1, 0, 2]]


def _ad_runs(absent_class: str, lam=2.0, lr=3e-3):
    """(ours, official) after every batch of AD_BATCHES: classifier + adversary parameters and the
    adversaries' Adam step counts. Official: trainer/adv_debiasing.py with K MLPs and K Adams;
    ``zero_grad`` sets gradients to None (PyTorch >= 2.0) for ``skip``, zeroes them (PyTorch 1.6)
    for ``step``."""
    from fairdistill.methods.adversary import Adversary
    from fairdistill.methods.base import SetupContext, TermInput
    from fairdistill.models.base import Features

    torch.manual_seed(0)
    k, groups, d = 4, 2, 5
    clf = nn.Linear(d, k).double()
    term = Adversary(grl_lambda=lam, hidden=6, lr=lr, absent_class=absent_class)
    z0 = torch.zeros(2, k, dtype=torch.float64)
    term.setup(SetupContext(teacher=None, student_features=Features(z0, [], z0), teacher_features=None,
                            num_classes=k, num_groups=groups, device=torch.device("cpu")))
    term.double().train()
    ref_clf, ref_mlps = copy.deepcopy(clf), [copy.deepcopy(m) for m in term.adversaries.mlps]
    opts = [torch.optim.Adam(clf.parameters(), lr=1e-3), torch.optim.Adam(term.parameters(), lr=lr, weight_decay=0.0)]
    ref_opt = torch.optim.Adam(ref_clf.parameters(), lr=1e-3)
    ref_adv_opts = [torch.optim.Adam(m.parameters(), lr=lr) for m in ref_mlps]
    gen = torch.Generator().manual_seed(1)
    ours_hist, ref_hist = [], []
    for labels in AD_BATCHES:
        x = torch.randn(len(labels), d, generator=gen, dtype=torch.float64)
        y, g = torch.tensor(labels), torch.randint(0, groups, (len(labels),), generator=gen)
        # ours, as engine/step.py: one loss, zero_grad(set_to_none=True), backward, every optimizer steps
        logits = clf(x)
        loss = F.cross_entropy(logits, y) + term(TermInput(x=x, y=y, g=g, student=Features(logits, [], logits),
                                                            teacher=None))
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in opts:
            o.step()
        # official
        outputs = ref_clf(x)
        adv_loss = 0
        for c in range(k):
            if (y == c).sum() == 0:
                continue
            adv_loss = adv_loss + F.cross_entropy(ref_mlps[c](_Reverse.apply(outputs[y == c].clone(), lam)), g[y == c])
        ref_loss = F.cross_entropy(outputs, y) + adv_loss
        ref_opt.zero_grad()
        for o in ref_adv_opts:
            o.zero_grad(set_to_none=absent_class == "skip")
        ref_loss.backward()
        ref_opt.step()
        for o in ref_adv_opts:
            o.step()

        def steps(opt, params):
            return [int(opt.state[p]["step"]) if p in opt.state else 0 for p in params]

        ours_hist.append(([p.detach().clone() for p in [*clf.parameters(), *term.parameters()]],
                          [steps(opts[1], list(m.parameters())) for m in term.adversaries.mlps]))
        ref_hist.append(([p.detach().clone() for p in [*ref_clf.parameters(), *(q for m in ref_mlps for q in m.parameters())]],
                         [steps(o, list(m.parameters())) for o, m in zip(ref_adv_opts, ref_mlps)]))
    return ours_hist, ref_hist


@pytest.mark.parametrize("absent_class", ["skip", "step"])
def test_adversary_adam_equals_one_official_adam_per_class(absent_class):
    ours, ref = _ad_runs(absent_class)
    for t, ((p_ours, s_ours), (p_ref, s_ref)) in enumerate(zip(ours, ref)):
        assert s_ours == s_ref, f"batch {t}: step counts {s_ours} vs official {s_ref}"
        for a, b in zip(p_ours, p_ref):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=f"batch {t}")
    # the counts by hand: class 0 is in batches 0, 2, 4, 5; 2 in 1-5; 3 in 1 and 4 only
    last_counts = [c[0] for c in ours[-1][1]]
    assert last_counts == ([4, 6, 5, 2] if absent_class == "skip" else [6, 6, 5, 5])


def test_absent_adversary_is_untouched_with_skip_and_moves_with_step():
    for absent_class, moves in (("skip", False), ("step", True)):
        hist, _ = _ad_runs(absent_class)
        # adversary 3's parameters are the last 4 tensors; batch 2 lacks class 3 (seen in batch 1)
        before, after = hist[1][0][-4:], hist[2][0][-4:]
        assert any(not torch.equal(a, b) for a, b in zip(before, after)) == moves
        # before its first appearance (batch 0) adversary 3 is never stepped
        assert hist[0][1][3] == [0, 0, 0, 0]


def test_adversary_loss_keeps_the_scores_dtype():
    from fairdistill.methods.adversary import adversary_loss

    scores = torch.randn(6, 2, dtype=torch.float64)
    y, g = torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 1, 0, 1, 0, 1])
    loss = adversary_loss(scores, g, y, 3)
    assert loss.dtype == torch.float64
    ce = F.cross_entropy(scores, g, reduction="none")
    torch.testing.assert_close(loss, ce.view(3, 2).mean(1).sum(), rtol=0, atol=1e-15)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert adversary_loss(scores.float(), g, y, 3).dtype == torch.float32
