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


# ----------------------------------------------------------------------------- engine: stage protocols


def _digits(tmp_path, name, **over):
    from fairdistill.config import load_config

    data = {"data": {"name": "digits-s", "batch_size": 128, "eval_batch_size": 1024},
            "model": {"name": "mfd-cnn", "options": {"image_size": 8, "dropout": 0.0}},
            "epochs": 3, "eval_every": 100, "progress": False, "threads": 1, "out": str(tmp_path / name), **over}
    return load_config(data=data)


def _reference_loop(trainer, epochs: int, build, lr_of, new_at: set):
    """A plain training loop over the trainer's own batches and initial weights: CE only; the
    optimizer ``build(params, lr)`` is made at epoch 0 and again at every epoch in ``new_at`` (the
    official OFD CIFAR script's pattern), otherwise its lr is set to ``lr_of(epoch)``."""
    from fairdistill.engine.trainer import epoch_seed

    model = copy.deepcopy(trainer.student)
    opt = None
    for e in range(epochs):
        if opt is None or e in new_at:
            opt = build(model.parameters(), lr_of(e))
        for group in opt.param_groups:
            group["lr"] = lr_of(e)
        torch.manual_seed(epoch_seed(trainer.cfg.seed, e))
        model.train()
        for x, y, _ in trainer.data.train_loader.epoch(e):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model


def _max_diff(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def _kill_after(n):
    def cb(trainer, record):
        if record["global_epoch"] == n:
            raise KeyboardInterrupt
    return cb


def test_reset_at_milestones_equals_a_new_sgd_at_each_drop_and_resumes(tmp_path):
    from fairdistill.engine import Trainer

    over = dict(epochs=2, optim={"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4,
                                 "reset_at_milestones": True},
                schedule={"name": "multistep", "milestones": [1], "gamma": 0.1})
    trainer = Trainer(_digits(tmp_path, "reset", **over))

    def official(params, lr):
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)

    def lr_of(e):
        return 0.1 * 0.1 ** (e >= 1)

    reset_ref = _reference_loop(trainer, 2, official, lr_of, {1})
    kept_ref = _reference_loop(trainer, 2, official, lr_of, set())
    assert _max_diff(reset_ref, kept_ref) > 1e-3  # the reset matters
    trainer.run()
    torch.testing.assert_close(list(trainer.student.parameters()), list(reset_ref.parameters()), rtol=1e-5, atol=1e-6)
    # killed after epoch 0: the resumed run loads the momentum of epoch 0, then resets at the milestone
    with pytest.raises(KeyboardInterrupt):
        Trainer(_digits(tmp_path, "killed", **over), callbacks=[_kill_after(1)]).run()
    resumed = Trainer(_digits(tmp_path, "killed", **over), resume=True)
    resumed.run()
    torch.testing.assert_close(list(resumed.student.parameters()), list(reset_ref.parameters()), rtol=1e-5, atol=1e-6)


def test_continued_optimizer_equals_one_adam_across_stages_and_resumes(tmp_path):
    from fairdistill.engine import Trainer

    stages = [{"name": "a", "epochs": 1}, {"name": "b", "epochs": 1, "optimizer": "continue"}]
    trainer = Trainer(_digits(tmp_path, "continued", stages=stages))

    def adam(params, lr):
        return torch.optim.Adam(params, lr=lr)

    one_adam = _reference_loop(trainer, 2, adam, lambda e: 1e-3, set())
    two_adams = _reference_loop(trainer, 2, adam, lambda e: 1e-3, {1})
    assert _max_diff(one_adam, two_adams) > 1e-4
    trainer.run()
    torch.testing.assert_close(list(trainer.student.parameters()), list(one_adam.parameters()), rtol=1e-5, atol=1e-6)

    fresh = Trainer(_digits(tmp_path, "fresh", stages=[stages[0], {"name": "b", "epochs": 1}]))
    fresh.run()
    torch.testing.assert_close(list(fresh.student.parameters()), list(two_adams.parameters()), rtol=1e-5, atol=1e-6)

    # killed after stage a: the resumed stage b continues a's Adam from the checkpoint
    with pytest.raises(KeyboardInterrupt):
        Trainer(_digits(tmp_path, "killed", stages=stages), callbacks=[_kill_after(1)]).run()
    resumed = Trainer(_digits(tmp_path, "killed", stages=stages), resume=True)
    resumed.run()
    torch.testing.assert_close(list(resumed.student.parameters()), list(one_adam.parameters()), rtol=1e-5, atol=1e-6)


def test_stage_without_evaluation_leaves_the_plateau_untouched(tmp_path):
    from fairdistill.engine import Trainer, load_checkpoint

    stages = [{"name": "hint", "epochs": 1, "evaluate": False, "schedule": {"name": "none"}},
              {"name": "main", "epochs": 2, "optimizer": "continue"}]
    seen = []

    def watch(trainer, record):
        seen.append((record["stage"], "test" in record, "val" in record,
                     load_checkpoint(trainer.run_dir.checkpoint)["plateau"]))

    cfg = _digits(tmp_path, "hint", stages=stages, schedule={"name": "plateau", "patience": 0},
                  data={"name": "digits-s", "batch_size": 128, "options": {"val_fraction": 0.2}})
    Trainer(cfg, callbacks=[watch]).run()
    assert [(s, t, v) for s, t, v, _ in seen] == [("hint", False, False), ("main", True, True), ("main", True, True)]
    assert seen[0][3] == {}  # no scheduler during the hint stage
    assert seen[1][3]["last_epoch"] == 1 and seen[2][3]["last_epoch"] == 2  # stepped by the main stage only


def test_protocol_options_are_checked_before_any_data(tmp_path):
    from fairdistill.config import load_config

    base = ["progress=false"]
    with pytest.raises(ConfigError, match="optim.reset_at_milestones: needs a multistep schedule"):
        load_config("configs/digits_s/scratch.yaml", [*base, "optim.reset_at_milestones=true", "schedule.name=cosine"])
    # without a schedule there is no milestone: allowed (e.g. a pre-stage with schedule none)
    assert load_config("configs/digits_s/scratch.yaml", [*base, "optim.reset_at_milestones=true"]).optim.reset_at_milestones
    with pytest.raises(ConfigError, match=r"stages\[0\].optimizer: continue needs a previous stage"):
        load_config("configs/digits_s/scratch.yaml", [*base, "stages=[{name: a, optimizer: continue}]"])
    with pytest.raises(ConfigError, match=r"stages\[1\].optimizer: continue needs the previous stage's optimizer"):
        load_config("configs/digits_s/scratch.yaml",
                    [*base, "stages=[{name: a, epochs: 1}, {name: b, optimizer: continue, optim: {name: sgd}}]"])
    with pytest.raises(ConfigError, match=r"stages\[0\].evaluate: false leaves the plateau"):
        load_config("configs/digits_s/scratch.yaml", [*base, "stages=[{name: a, evaluate: false}]",
                                                      "schedule.name=plateau"])


# ----------------------------------------------------------------------------- crops in the configs


def test_training_and_evaluation_crops_reach_every_loader(tmp_path):
    from fairdistill.engine import Trainer, evaluate_run
    from fairdistill.plots import run_embeddings

    data = {"name": "digits-s", "batch_size": 128, "eval_batch_size": 1024, "options": {"size": 16},
            "crop": "random:8", "eval_crop": "center:8", "flip": True}
    # a term makes setup_terms probe the student: the probe must be 8 x 8 too (mfd-cnn refuses others)
    trainer = Trainer(_digits(tmp_path, "crops", epochs=1, method="ad", data=data))
    assert trainer.data.train_loader.image_shape == (3, 8, 8) and trainer.data.train_loader.crop.kind == "random"
    assert trainer.data.test_loader.image_shape == (3, 8, 8) and trainer.data.test_loader.crop.kind == "center"
    result = trainer.run()
    again = evaluate_run(str(tmp_path / "crops"))
    assert again["accuracy"] == pytest.approx(result["final"]["accuracy"])
    emb = run_embeddings(tmp_path / "crops")
    assert emb.features.shape == (len(trainer.data.test_set), 256)


def test_setup_probe_uses_the_training_crop_made_deterministic(tmp_path):
    from fairdistill.distributed import DistContext
    from fairdistill.engine.build import build_data, setup_terms
    from fairdistill.methods.base import TERMS, Term
    from fairdistill.methods.objective import Objective

    if "test-record-setup" not in TERMS:
        @TERMS.register("test-record-setup")
        class RecordSetup(Term):
            """Records what setup_terms hands a term."""

            needs_teacher = False
            needs_features = False

            def setup(self, ctx):
                self.probe_logits = ctx.student_features.logits.shape
                self.batch = next(iter(ctx.train_batches))[0]

            def forward(self, inp):
                return inp.student.logits.sum() * 0.0

    # stored 16 x 16, trained on random 8 x 8 crops, evaluated uncropped: the probe and the
    # training-set passes must be centre 8 x 8 crops (mfd-cnn, built for 8, refuses 16)
    cfg = _digits(tmp_path, "probe", data={"name": "digits-s", "batch_size": 128, "options": {"size": 16},
                                           "crop": "random:8"}, terms={"rec": {"type": "test-record-setup"}})
    data = build_data(cfg, torch.device("cpu"), DistContext())
    assert data.test_loader.image_shape == (3, 16, 16)
    student = build_model("mfd-cnn", data.num_classes, image_size=8)
    objective = Objective(cfg.terms, data.task)
    setup_terms(objective, student, None, data, cfg, torch.device("cpu"))
    term = objective.term("rec")
    assert tuple(term.probe_logits) == (128, data.num_classes)
    ds = data.train_set
    images = ds.images[:128].float() / 255.0
    if ds.mean is not None:
        images = (images - torch.tensor(ds.mean).view(1, -1, 1, 1)) / torch.tensor(ds.std).view(1, -1, 1, 1)
    torch.testing.assert_close(term.batch, images[:, :, 4:12, 4:12])  # CenterCrop(8) of 16, no flip


def test_crop_options_are_checked_before_any_data():
    from fairdistill.config import load_config

    with pytest.raises(ConfigError, match="data.eval_crop: an evaluation crop must be deterministic"):
        load_config("configs/digits_s/scratch.yaml", ["data.eval_crop=random:8"])
    with pytest.raises(ConfigError, match="data.crop: kind 'random_resized' takes no padding"):
        load_config("configs/digits_s/scratch.yaml", ["data.crop=random_resized:8", "data.padding=2"])
    with pytest.raises(ConfigError, match="data.crop: unknown crop kind"):
        load_config("configs/digits_s/scratch.yaml", ["data.crop=randm:8"])


def test_paper_configs_use_the_official_protocols():
    from fairdistill.config import load_config, stage_list

    utk = load_config("configs/utkface/base.yaml").data
    assert (utk.options["resize"], utk.options["image_size"], utk.crop, utk.flip) == (256, 176, "random:176", True)
    celeba = load_config("configs/celeba/base.yaml").data
    assert (celeba.options["train_size"], celeba.crop, celeba.flip) == ("original", "random_resized:176", True)
    imagenet = load_config("configs/imagenet/base.yaml").data
    assert (imagenet.crop, imagenet.flip, imagenet.drop_last) == ("random_resized:224", True, False)
    assert imagenet.options == {"image_size": 224, "resize": 256}
    cifar = load_config("configs/cifar100/a/ofd.yaml")
    assert cifar.optim.reset_at_milestones and not cifar.data.drop_last
    assert cifar.model.options == {"official_bn_updates": True}
    assert load_config("configs/cifar100/d/ofd.yaml").model.options == {}  # ResNet56: no second BN update
    for name in ("fitnet", "ss_fitnet"):
        hint, main = stage_list(load_config(f"configs/cifar10s/{name}.yaml"))
        assert (hint.evaluate, hint.schedule, hint.epochs) == (False, {"name": "none"}, 25)
        assert main.optimizer == "continue" and main.evaluate
