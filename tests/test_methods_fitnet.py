"""FitNets: hint_loss, the hint regressor and the fitnet-hint term."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from test_methods_fakes import TinyNet, grads_of, make_ctx, make_input

from fairdistill.errors import ConfigError
from fairdistill.methods.base import TERMS
from fairdistill.methods.fitnet import hint_loss, hint_regressor

torch.set_num_threads(1)


def test_hint_loss_hand_computed():
    s = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    t = torch.tensor([[0.0, 0.0], [2.0, 1.0]])
    # 1/2 * mean(1, 4, 4, 4) = 13/8
    assert hint_loss(s, t).item() == pytest.approx(13 / 8)
    with pytest.raises(ValueError, match="shape"):
        hint_loss(s, t[:1])


@pytest.mark.parametrize("s_hw, t_hw, kind, kernel", [
    ((8, 8), (4, 4), nn.Conv2d, (3, 3)),
    ((4, 4), (8, 8), nn.ConvTranspose2d, (4, 4)),
    ((4, 4), (4, 4), nn.Conv2d, (1, 1)),
    ((6, 5), (4, 4), nn.Conv2d, (3, 2)),
])
def test_hint_regressor_maps_student_shape_to_teacher_shape(s_hw, t_hw, kind, kernel):
    reg = hint_regressor(torch.Size((2, 3, *s_hw)), torch.Size((2, 5, *t_hw)), relu=True, key="k")
    assert isinstance(reg[0], kind) and reg[0].kernel_size == kernel and isinstance(reg[-1], nn.ReLU)
    assert reg(torch.randn(2, 3, *s_hw)).shape == (2, 5, *t_hw)
    assert not isinstance(hint_regressor(torch.Size((2, 3, *s_hw)), torch.Size((2, 5, *t_hw)), False, "k")[-1], nn.ReLU)


def test_hint_regressor_rejects_smaller_student_map():
    with pytest.raises(ConfigError, match="smaller than the teacher"):
        hint_regressor(torch.Size((2, 3, 3, 3)), torch.Size((2, 5, 4, 4)), relu=True, key="fitnet-hint")


def models(student_channels=(3, 6, 6), teacher_channels=(4, 8, 8)):
    torch.manual_seed(0)
    return TinyNet(student_channels), TinyNet(teacher_channels), torch.randn(4, 3, 8, 8)


@pytest.mark.parametrize("position, key, relu", [("block", "block", True), ("prerelu", "stages", False)])
def test_fitnet_stage_hint_default_middle_stage(position, key, relu):
    student, teacher, x = models()
    term = TERMS.get("fitnet-hint")(position=position)
    term.setup(make_ctx(student, teacher, x))
    assert term.index == 1  # (3 - 1) // 2
    assert (term.regressor[0].in_channels, term.regressor[0].out_channels) == (6, 8)
    assert isinstance(term.regressor[-1], nn.ReLU) == relu
    student.train()
    inp = make_input(student, teacher, x)
    s = inp.student.stages[1] if key == "stages" else inp.student.extra["block"][1]
    t = inp.teacher.stages[1] if key == "stages" else inp.teacher.extra["block"][1]
    expected = 0.5 * ((term.regressor(s) - t) ** 2).mean()
    assert term(inp).item() == pytest.approx(expected.item(), rel=1e-6)


def test_fitnet_gradients_reach_student_and_regressor_only():
    student, teacher, x = models()
    term = TERMS.get("fitnet-hint")(position_index=2)
    term.setup(make_ctx(student, teacher, x))
    student.train()
    term(make_input(student, teacher, x)).backward()
    assert all(g is not None and g.abs().sum() > 0 for g in grads_of(term.regressor))
    assert all(g is not None for g in grads_of(student.convs))
    assert all(g is None for g in grads_of(teacher))


def test_fitnet_embedding_without_regressor_when_shapes_match():
    student, teacher, x = models(teacher_channels=(4, 8, 6))
    term = TERMS.get("fitnet-hint")(feature="embedding")
    term.setup(make_ctx(student, teacher, x))
    assert isinstance(term.regressor, nn.Identity) and list(term.parameters()) == []
    inp = make_input(student, teacher, x)
    expected = 0.5 * ((inp.student.embedding - inp.teacher.embedding) ** 2).mean()
    assert term(inp).item() == pytest.approx(expected.item())


def test_fitnet_embedding_regressor_when_sizes_differ():
    student, teacher, x = models()
    term = TERMS.get("fitnet-hint")(feature="embedding")
    term.setup(make_ctx(student, teacher, x))
    assert isinstance(term.regressor, nn.Linear) and term.regressor.weight.shape == (8, 6)


@pytest.mark.parametrize("options, match", [
    ({"feature": "logits"}, "fitnet-hint.feature"),
    ({"position": "after"}, "fitnet-hint.position"),
    ({"position_index": "middle"}, "fitnet-hint.position_index"),
])
def test_fitnet_bad_options(options, match):
    with pytest.raises(ConfigError, match=match):
        TERMS.get("fitnet-hint")(**options)


def test_fitnet_position_index_out_of_range():
    student, teacher, x = models()
    with pytest.raises(ConfigError, match="fitnet-hint.position_index"):
        TERMS.get("fitnet-hint")(position_index=3).setup(make_ctx(student, teacher, x))
