"""Detection recipes: OFD on SSD (every backbone position and every extra layer, margins from
the extra layers' BNs or estimated without them, the loss against an independent computation),
the shipped detection configs, and digits-s-det with OFD from the command line."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from fairdistill.cli import main
from fairdistill.config import load_config
from fairdistill.engine import Trainer
from fairdistill.models import build_model

ROOT = Path(__file__).resolve().parents[1]
TINY_DATA = {"name": "digits-s-det", "batch_size": 8, "eval_batch_size": 16,
             "options": {"train_canvases": 16, "test_canvases": 4}, "augment": {"flip": False}}
DIVIDERS = [4.0, 2.0, 1.0, 1.0, 1.0]


def truncated_mean(beta: float, gamma: float) -> float:
    """E[x | x < 0] for x ~ N(beta, gamma^2) by the trapezoid rule on a fine grid (independent of
    the closed form of Eq. 4)."""
    s = abs(gamma)
    x = torch.linspace(beta - 14 * s, 0.0, 40001, dtype=torch.float64)
    density = torch.exp(-0.5 * ((x - beta) / s) ** 2)
    return float(torch.trapezoid(x * density, x) / torch.trapezoid(density, x))


def teacher_file(tmp_path, extras_bn: bool = True) -> str:
    """An ssd-tiny (width 4) state dict with random BN affine parameters (beta / |gamma| < 2,
    so Eq. 4 needs no fallback)."""
    torch.manual_seed(5)
    teacher = build_model("ssd-tiny", 10, width=4, extras_bn=extras_bn)
    for m in teacher.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5).mul_(torch.sign(torch.randn(m.num_features)))
                m.bias.uniform_(-1.0, 1.0)
    path = tmp_path / f"teacher_bn{int(extras_bn)}.pt"
    torch.save(teacher.state_dict(), path)
    return str(path)


def ofd_config(tmp_path, name: str, extras_bn: bool = True):
    return load_config(data={
        "data": TINY_DATA, "model": {"name": "ssd-tiny", "options": {"width": 3}},
        "method": "ofd", "terms": {"ofd": {"weight": 1e-4, "dividers": DIVIDERS}},
        "teacher": {"checkpoint": teacher_file(tmp_path, extras_bn),
                    "model": {"name": "ssd-tiny", "options": {"width": 4, "extras_bn": extras_bn}}},
        "optim": {"name": "sgd", "lr": 1e-3}, "stages": [{"iterations": 1}],
        "progress": False, "threads": 1, "out": str(tmp_path / name),
    })


def independent_ofd(student, teacher, connectors, margins, x) -> float:
    """sum_i partial_L2(BN(conv_1x1(S_i)), max(T_i, m_i)) / d_i / B in float64: the connector's BN
    with batch statistics (training mode), the kept elements those where S > max(T, m) or T > 0."""
    s_feats, t_feats = student.forward_features(x).stages, teacher.forward_features(x).stages
    total = 0.0
    for s, t, (conv, bn), m, d in zip(s_feats, t_feats, connectors, margins, DIVIDERS):
        y = torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0].double(), s.double())
        mean, var = y.mean((0, 2, 3), keepdim=True), y.var((0, 2, 3), unbiased=False, keepdim=True)
        source = (y - mean) / torch.sqrt(var + bn.eps) * bn.weight.double().view(1, -1, 1, 1) \
            + bn.bias.double().view(1, -1, 1, 1)
        target = torch.maximum(t.double(), m.double().view(1, -1, 1, 1))
        keep = (source > target) | (t.double() > 0)
        total += float(((source - target) ** 2)[keep].sum()) / d
    return total / x.shape[0]


def test_ofd_on_ssd_distils_every_position_with_the_extra_layers_bn_margins_and_its_loss(tmp_path):
    cfg = ofd_config(tmp_path, "ofd")
    trainer = Trainer(cfg)
    term, teacher, student = trainer.objective.terms["ofd"], trainer.teacher, trainer.student
    # every backbone stage end and both extra layers, the extras' margin BN their second BN
    assert term.indices == [0, 1, 2, 3, 4]
    bns = teacher.stage_bns()
    assert bns[3] is teacher.extras[0].bn2 and bns[4] is teacher.extras[1].bn2
    margins = [getattr(term, f"margin_{j}") for j in range(5)]
    for bn, m in zip(bns, margins):
        expected = [truncated_mean(b, g) for g, b in zip(bn.weight.tolist(), bn.bias.tolist())]
        assert m.tolist() == pytest.approx(expected, abs=1e-6)
    # connectors 1x1 from the student's channels to the teacher's, at equal spatial sizes
    x, _, _ = next(iter(trainer.data.train_loader.epoch(0)))
    s_feats, t_feats = student.forward_features(x).stages, teacher.forward_features(x).stages
    assert [tuple(t.shape[-2:]) for t in t_feats] == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
    for (conv, bn), s, t in zip(term.connectors, s_feats, t_feats):
        assert s.shape[-2:] == t.shape[-2:]
        assert tuple(conv.weight.shape) == (t.shape[1], s.shape[1], 1, 1) and bn.num_features == t.shape[1]
    # the run's one step: its OFD part equals the independent sum over positions
    s_copy, t_copy, c_copy = (copy.deepcopy(m).train() for m in (student, teacher, term.connectors))
    with torch.no_grad():
        expected = independent_ofd(s_copy, t_copy, c_copy, margins, x)
    trainer.run()
    record = json.loads((tmp_path / "ofd" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["train"]["ofd"] == pytest.approx(expected, rel=1e-5)
    assert record["train"]["loss"] == pytest.approx(record["train"]["loc"] + record["train"]["conf"] + 1e-4 * expected,
                                                    rel=1e-5)


def test_ofd_on_ssd_without_extra_bn_estimates_the_extra_layers_margins(tmp_path):
    trainer = Trainer(ofd_config(tmp_path, "ofd_nobn", extras_bn=False))
    term, teacher = trainer.objective.terms["ofd"], trainer.teacher
    bns = teacher.stage_bns()
    assert bns[3] is None and bns[4] is None and all(b is not None for b in bns[:3])
    # independent estimate: E[F_t | F_t < 0] per channel over every training image, teacher in eval
    # mode; a channel without a negative value gets -3 x its standard deviation (supplement A's
    # fallback, as bn_margin's)
    ds = trainer.data.train_set
    mean, std = torch.tensor(ds.mean).view(1, -1, 1, 1), torch.tensor(ds.std).view(1, -1, 1, 1)
    x = (ds.images.float() / 255 - mean) / std
    teacher.eval()
    with torch.no_grad():
        stages = teacher.forward_features(x).stages
    for j in (3, 4):
        f = stages[j].double()
        count = (f < 0).sum((0, 2, 3))
        neg = torch.where(count > 0, f.clamp(max=0).sum((0, 2, 3)) / count.clamp(min=1),
                          -3 * f.std((0, 2, 3), unbiased=False))
        assert getattr(term, f"margin_{j}").tolist() == pytest.approx(neg.tolist(), rel=1e-4)
        assert 0 < int((count > 0).sum()) <= f.shape[1]
    expected = [truncated_mean(b, g) for g, b in zip(bns[2].weight.tolist(), bns[2].bias.tolist())]
    assert term.margin_2.tolist() == pytest.approx(expected, abs=1e-6)


def test_the_voc_recipes_are_the_ssd300_schedule_with_ofd_on_all_seven_positions():
    folder = ROOT / "configs" / "voc_det"
    for name in ("teacher_resnet50", "resnet18_scratch", "mobilenetv2_scratch", "resnet18_ofd", "mobilenetv2_ofd"):
        cfg = load_config(folder / f"{name}.yaml")
        assert cfg.data.name == "voc-det" and cfg.data.batch_size == 32 and cfg.data.augment["size"] == 300
        assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == ("sgd", 1e-3, 0.9, 5e-4)
        assert (cfg.schedule.name, cfg.schedule.unit, cfg.schedule.milestones) == ("multistep", "iteration", [80000, 100000])
        assert cfg.stages[-1].iterations == 120000 and cfg.model.name == "ssd300"
        assert cfg.model.options["backbone_weights"]
        if name.endswith("_ofd"):
            ofd = cfg.terms["ofd"]
            assert ofd["weight"] == 1e-4 and ofd["positions"] == "all" and len(ofd["dividers"]) == 7
            first = cfg.stages[0]
            assert (first.iterations, first.train, first.ce_weight) == (500, ["ofd"], 0.0)
            assert cfg.teacher.run and cfg.teacher.bn_mode == "train"
    raw = yaml.safe_load((folder / "resnet18_ofd.yaml").read_text())
    assert raw["teacher"]["run"].endswith("teacher_resnet50/seed0")


def test_digits_s_det_trains_with_ofd_from_the_cli_and_prints_map_and_group_gaps(tmp_path, capsys):
    folder = ROOT / "configs" / "digits_s_det"
    tiny = ["data.options.train_canvases=16", "data.options.test_canvases=4", "data.batch_size=8",
            "stages=[{iterations: 2}]", "threads=1", "progress=false"]
    assert main(["train", str(folder / "teacher.yaml"), *tiny, "model.options.width=4",
                 f"out={tmp_path / 'teacher'}"]) == 0
    capsys.readouterr()
    assert main(["train", str(folder / "ofd.yaml"), *tiny, "model.options.width=3", f"teacher.run={tmp_path / 'teacher'}",
                 f"out={tmp_path / 'ofd'}"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("finished ofd: mAP ") and "(by group " in line
    assert all(key in line for key in ("AP gap A ", " M ", "DEO_A ", "DEO_M "))
    result = json.loads((tmp_path / "ofd" / "result.json").read_text())
    final = result["final"]
    groups = " / ".join(f"{100 * v:.2f}" for v in final["map_by_group"])
    assert f"mAP {100 * final['map']:.2f} (by group {groups})" in line and len(final["map_by_group"]) == 2
    assert f"AP gap A {100 * final['ap_gap_a']:.2f} M {100 * final['ap_gap_m']:.2f}" in line
    assert math.isfinite(final["map"]) and result["method"] == "ofd"
