"""CIFAR zoo: parameter counts, the feature contract, and equality with independent references.

The references below are written with plain tensor ops (F.conv2d, a hand BatchNorm) from the
papers' descriptions of the standard networks, not by calling the models' own forward code.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fairdistill.errors import ConfigError
from fairdistill.models import MODELS, FeatureModel, build_model, count_parameters
from fairdistill.models.pyramidnet import block_widths

torch.set_num_threads(1)


# ---------------------------------------------------------------- helpers

def randomize_bns(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial affine parameters (some gamma < 0) and running statistics for every BN."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                sign = torch.where(torch.rand(c, generator=g) < 0.2, -1.0, 1.0)
                m.weight.copy_(sign * (0.5 + torch.rand(c, generator=g)))
                m.bias.copy_(0.5 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))


def bn(x: torch.Tensor, m: nn.BatchNorm2d) -> torch.Tensor:
    """Eval-mode BatchNorm by hand: (x - mu) / sqrt(var + eps) * gamma + beta."""
    shape = (1, -1, 1, 1)
    return (x - m.running_mean.view(shape)) / torch.sqrt(m.running_var.view(shape) + m.eps) * m.weight.view(
        shape
    ) + m.bias.view(shape)


def conv(x: torch.Tensor, m: nn.Conv2d) -> torch.Tensor:
    return F.conv2d(x, m.weight, m.bias, m.stride, m.padding)


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal up to float32 rounding, relative to the tensor's scale."""
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, b.abs().max().item()))


def images(b: int = 2, size: int = 32, channels: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, channels, size, size, generator=torch.Generator().manual_seed(seed))


SMALL = {
    "mfd-cnn": dict(),
    "wrn-10-2-drop": dict(name="wrn", depth=10, widen_factor=2, dropout=0.3),
    "wrn-16-1": dict(name="wrn", depth=16, widen_factor=1),
    "resnet14": dict(name="resnet_cifar", depth=14),
    "pyramid-basic-14": dict(name="pyramidnet", depth=14, alpha=12, bottleneck=False),
    "pyramid-bottleneck-20": dict(name="pyramidnet", depth=20, alpha=12, bottleneck=True),
}


def small(key: str, num_classes: int = 10) -> FeatureModel:
    opts = dict(SMALL[key])
    name = opts.pop("name", key)
    torch.manual_seed(0)
    return build_model(name, num_classes, **opts)


# ---------------------------------------------------------------- sizes

@pytest.mark.parametrize(
    "name, millions",
    [
        ("wrn-28-4", 5.87),
        ("wrn-16-4", 2.77),
        ("wrn-28-2", 1.47),
        ("wrn-16-2", 0.70),
        ("resnet56", 0.86),
        ("pyramidnet-110-84", 3.91),
        ("pyramidnet-200-240", 26.84),
    ],
)
def test_parameter_counts_match_ofd_paper(name, millions):
    n = count_parameters(build_model(name, 100))
    assert abs(n / 1e6 - millions) / millions < 0.01, n


def test_mfd_cnn_parameter_count_by_hand():
    def conv_p(i, o):
        return i * o * 9 + o

    expected = (
        conv_p(3, 32) + conv_p(32, 32) + conv_p(32, 64) + conv_p(64, 64) + conv_p(64, 128) + conv_p(128, 128)
        + (128 * 4 * 4 * 256 + 256) + (256 * 10 + 10)
    )
    assert count_parameters(build_model("mfd-cnn", 10)) == expected == 814122
    assert build_model("mfd-cnn", 10, image_size=64).fc1.in_features == 128 * 8 * 8


def test_pyramidnet_widths_by_hand():
    # width_k = 16 + k * alpha / (3n), rounded (Han et al., Eq. 3)
    w = block_widths(22, 240)  # PyramidNet-200: n = (200 - 2) / 9
    assert (w[22], w[44], w[-1]) == (round(16 + 23 * 240 / 66), round(16 + 45 * 240 / 66), 256) == (100, 180, 256)
    w = block_widths(18, 84)  # PyramidNet-110: n = (110 - 2) / 6
    assert (w[17], w[35], w[-1]) == (44, 72, 100)
    assert build_model("pyramidnet-200-240", 100).stage_channels == [100, 180, 1024]
    assert build_model("pyramidnet-110-84", 100).stage_channels == [44, 72, 100]


def test_wrn28_4_stage_shapes():
    model = build_model("wrn-28-4", 100).eval()
    with torch.no_grad():
        f = model.forward_features(images(2))
    assert [tuple(s.shape) for s in f.stages] == [(2, 64, 32, 32), (2, 128, 16, 16), (2, 256, 8, 8)]
    assert model.stage_channels == [64, 128, 256]
    assert tuple(f.embedding.shape) == (2, 256) and tuple(f.logits.shape) == (2, 100)


# ---------------------------------------------------------------- the contract, every model

@pytest.mark.parametrize("key", sorted(SMALL))
def test_forward_equals_forward_features(key):
    model = small(key)
    x = images(3)
    model.eval()
    assert torch.equal(model(x), model.forward_features(x).logits)
    model.train()
    torch.manual_seed(5)
    a = model(x)
    torch.manual_seed(5)
    b = model.forward_features(x).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize("key", sorted(SMALL))
def test_stage_shapes_negatives_and_gradients(key):
    model = small(key).train()
    f = model.forward_features(images(3))
    assert [s.shape[1] for s in f.stages] == model.stage_channels
    assert [s.shape[-1] for s in f.stages] == [32, 16, 8]
    assert len(f.extra["block"]) == 3
    for s in f.stages:
        assert (s < 0).any(), "a stage feature has no negative value: it is not pre-ReLU"
    for b in f.extra["block"]:
        assert b.shape[0] == 3 and b.shape[-1] in (32, 16, 8)
    assert f.embedding.dim() == 2 and f.embedding.shape[0] == 3
    # No in-place op touched a tensor autograd still needs.
    (f.logits.sum() + sum(s.pow(2).sum() for s in f.stages)).backward()
    bns = model.stage_bns()
    assert len(bns) == 3
    for m, c in zip(bns, model.stage_channels):
        assert m is None or (isinstance(m, nn.BatchNorm2d) and m.num_features == c)


@pytest.mark.parametrize("key", sorted(SMALL))
def test_each_batchnorm_runs_once_per_forward(key):
    # The official extract_feature re-applies stage BNs (gotcha G12); here every BN sees one batch.
    model = small(key).train()
    model.forward_features(images(2))
    counts = {int(m.num_batches_tracked) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    assert counts in (set(), {1})


@pytest.mark.parametrize("key", ["wrn-16-1", "pyramid-basic-14", "pyramid-bottleneck-20"])
def test_exact_stage_bns_give_batch_mean_beta_and_std_gamma(key):
    # In train mode a BN output has per-channel batch mean beta and std |gamma| * sqrt(v/(v+eps)).
    model = small(key)
    randomize_bns(model)
    model.train()
    f = model.forward_features(images(8))
    for s, m in zip(f.stages, model.stage_bns()):
        mean = s.mean(dim=(0, 2, 3))
        var = s.var(dim=(0, 2, 3), unbiased=False)
        close(mean, m.bias.detach())
        torch.testing.assert_close(var.sqrt(), m.weight.detach().abs(), rtol=2e-3, atol=1e-4)


def test_resnet_stage_bns_are_last_bn2():
    model = small("resnet14")
    assert model.stage_bns() == [model.layer1[-1].bn2, model.layer2[-1].bn2, model.layer3[-1].bn2]


# ---------------------------------------------------------------- WRN

def wrn_reference(model, x):
    """Standard pre-activation WRN forward (Zagoruyko & Komodakis), eval mode, from the weights."""
    out = conv(x, model.conv1)
    groups = []
    for group in (model.block1, model.block2, model.block3):
        for u in group.layer:
            a = F.relu(bn(out, u.bn1))
            r = conv(F.relu(bn(conv(a, u.conv1), u.bn2)), u.conv2)
            out = r + (out if u.convShortcut is None else conv(a, u.convShortcut))
        groups.append(out)
    pooled = F.avg_pool2d(F.relu(bn(out, model.bn1)), 8).flatten(1)
    return F.linear(pooled, model.fc.weight, model.fc.bias), groups


def test_wrn_equals_reference_and_hooked_group_outputs():
    model = small("wrn-16-1")
    randomize_bns(model)
    model.eval()
    hooked = {}
    for name in ("block1", "block2", "block3"):
        getattr(model, name).register_forward_hook(lambda mod, inp, out, name=name: hooked.__setitem__(name, out))
    x = images(2)
    with torch.no_grad():
        f = model.forward_features(x)
        logits, groups = wrn_reference(model, x)
    close(f.logits, logits)
    for g, b, h in zip(groups, f.extra["block"], ("block1", "block2", "block3")):
        close(b, g)
        assert torch.equal(hooked[h], b)
    # OFD positions: the next pre-activation BN applied by hand to the hooked group output.
    close(f.stages[0], bn(hooked["block1"], model.block2.layer[0].bn1))
    close(f.stages[1], bn(hooked["block2"], model.block3.layer[0].bn1))
    close(f.stages[2], bn(hooked["block3"], model.bn1))
    close(f.embedding, F.relu(f.stages[2]).mean(dim=(2, 3)))


def test_wrn_state_dict_names_follow_official_code():
    keys = set(build_model("wrn-16-2", 100).state_dict())
    for k in (
        "conv1.weight",
        "block1.layer.0.bn1.running_var",
        "block1.layer.0.convShortcut.weight",
        "block2.layer.1.conv2.weight",
        "block3.layer.0.convShortcut.weight",
        "bn1.weight",
        "fc.bias",
    ):
        assert k in keys
    assert "block2.layer.1.convShortcut.weight" not in keys


def test_wrn_dropout_acts_only_in_train_mode():
    model = small("wrn-10-2-drop")
    x = images(2)
    model.train()
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    b = model(x)
    assert not torch.equal(a, b)
    model.eval()
    assert torch.equal(model(x), model(x))


# ---------------------------------------------------------------- CIFAR ResNet

def resnet_reference(model, x):
    """Standard post-activation ResNet (He et al. 2016): every block ends with ReLU(out + shortcut)."""
    h = F.relu(bn(conv(x, model.conv1), model.bn1))
    pre_relu, post_relu = [], []
    for layer in (model.layer1, model.layer2, model.layer3):
        for blk in layer:
            r = bn(conv(F.relu(bn(conv(h, blk.conv1), blk.bn1)), blk.conv2), blk.bn2)
            sc = h if blk.downsample is None else bn(conv(h, blk.downsample[0]), blk.downsample[1])
            s = r + sc
            h = F.relu(s)
        pre_relu.append(s)
        post_relu.append(h)
    pooled = F.avg_pool2d(h, 8).flatten(1)
    return F.linear(pooled, model.fc.weight, model.fc.bias), pre_relu, post_relu


def test_relocated_relu_resnet_equals_standard_resnet():
    model = small("resnet14")
    randomize_bns(model)
    model.eval()
    x = images(2)
    with torch.no_grad():
        f = model.forward_features(x)
        logits, pre, post = resnet_reference(model, x)
    close(f.logits, logits)
    for a, b in zip(f.stages, pre):
        close(a, b)
    for a, b in zip(f.extra["block"], post):
        close(a, b)
        assert (a >= 0).all()
    # layer modules called on their own give the pre-ReLU stage outputs too (hook-friendly)
    with torch.no_grad():
        close(model.layer1(model.bn1(model.conv1(x))), f.stages[0])


def test_resnet_uses_projection_shortcuts_where_shapes_change():
    model = build_model("resnet56", 100)
    assert model.layer1[0].downsample is None
    for layer in (model.layer2, model.layer3):
        proj = layer[0].downsample
        assert isinstance(proj[0], nn.Conv2d) and proj[0].kernel_size == (1, 1) and proj[0].stride == (2, 2)
        assert isinstance(proj[1], nn.BatchNorm2d)
        assert all(b.downsample is None for b in layer[1:])
    assert len(model.layer1) == len(model.layer2) == len(model.layer3) == 9


# ---------------------------------------------------------------- PyramidNet

def pyramid_reference(model, x, bottleneck):
    """PyramidNet forward (Han et al. 2017) from the weights, with OFD's positions computed apart."""

    def shortcut(h, stride, channels):
        if stride != 1:
            h = F.avg_pool2d(h, 2, 2, ceil_mode=True)
        zeros = torch.zeros(h.shape[0], channels - h.shape[1], h.shape[2], h.shape[3])
        return torch.cat([h, zeros], dim=1)

    def block(h, b):
        stride = b.conv2.stride[0] if bottleneck else b.conv1.stride[0]
        if bottleneck:
            r = F.relu(bn(conv(bn(h, b.bn1), b.conv1), b.bn2))
            r = F.relu(bn(conv(r, b.conv2), b.bn3))
            r = bn(conv(r, b.conv3), b.bn4)
        else:
            r = bn(conv(F.relu(bn(conv(bn(h, b.bn1), b.conv1), b.bn2)), b.conv2), b.bn3)
        return r + shortcut(h, stride, r.shape[1])

    h = bn(conv(x, model.conv1), model.bn1)
    groups = []
    for layer in (model.layer1, model.layer2, model.layer3):
        for b in layer:
            h = block(h, b)
        groups.append(h)
    logits = F.linear(F.avg_pool2d(F.relu(bn(h, model.bn_final)), 8).flatten(1), model.fc.weight, model.fc.bias)
    if bottleneck:
        first = [model.layer2[0], model.layer3[0]]
        p = [bn(conv(bn(g, b.bn1), b.conv1), b.bn2) for g, b in zip(groups, first)]
    else:
        p = [bn(groups[0], model.layer2[0].bn1), bn(groups[1], model.layer3[0].bn1)]
    return logits, p + [bn(h, model.bn_final)], groups


@pytest.mark.parametrize("key, bottleneck", [("pyramid-basic-14", False), ("pyramid-bottleneck-20", True)])
def test_pyramidnet_equals_reference(key, bottleneck):
    model = small(key)
    randomize_bns(model)
    model.eval()
    x = images(2)
    with torch.no_grad():
        f = model.forward_features(x)
        logits, stages, groups = pyramid_reference(model, x, bottleneck)
    close(f.logits, logits)
    for a, b in zip(f.stages, stages):
        close(a, b)
    for a, b in zip(f.extra["block"], groups):
        close(a, b)
    entry = "bn2" if bottleneck else "bn1"
    expected = [getattr(model.layer2[0], entry), getattr(model.layer3[0], entry), model.bn_final]
    assert model.stage_bns() == expected


def test_pyramidnet_200_teacher_positions_are_inside_the_next_stage():
    model = build_model("pyramidnet-200-240", 100)
    assert model.stage_bns()[0] is model.layer2[0].bn2 and model.layer2[0].conv1.kernel_size == (1, 1)
    assert model.layer3[-1].bn4.num_features == 1024 and model.fc.in_features == 1024


# ---------------------------------------------------------------- MFD CNN

def cnn_reference(model, x):
    """MFD's CIFAR-10S CNN in eval mode (dropout off), from the weights."""
    h, pre, post = x, [], []
    convs = [model.conv1, model.conv2, model.conv3, model.conv4, model.conv5, model.conv6]
    for i in range(3):
        p = conv(F.relu(conv(h, convs[2 * i])), convs[2 * i + 1])
        pre.append(p)
        post.append(F.relu(p))
        h = F.max_pool2d(F.relu(p), 2)
    act7 = F.relu(F.linear(h.reshape(h.shape[0], -1), model.fc1.weight, model.fc1.bias))
    return F.linear(act7, model.last.weight, model.last.bias), pre, post, act7


def test_mfd_cnn_equals_reference():
    model = small("mfd-cnn").eval()
    x = images(2)
    with torch.no_grad():
        f = model.forward_features(x)
        logits, pre, post, act7 = cnn_reference(model, x)
    close(f.logits, logits)
    close(f.embedding, act7)
    assert f.embedding.shape == (2, 256)
    for a, b in zip(f.stages, pre):
        close(a, b)
    for a, b in zip(f.extra["block"], post):
        close(a, b)
    assert f.extra["block"][-1].shape == (2, 128, 8, 8)
    assert model.stage_bns() == [None, None, None]


def test_mfd_cnn_other_image_size_and_channels():
    model = build_model("mfd-cnn", 3, image_size=16, in_channels=1).eval()
    f = model.forward_features(images(2, size=16, channels=1))
    assert f.logits.shape == (2, 3) and [s.shape[-1] for s in f.stages] == [16, 8, 4]


def test_mfd_cnn_dropout_is_random_in_train_mode_only():
    model = small("mfd-cnn")
    x = images(2)
    model.train()
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    assert not torch.equal(a, model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize(
    "name, options, words",
    [
        ("mfd-cnn", dict(image_size=30), ["image_size=30", "multiple of 8"]),
        ("wrn", dict(depth=27), ["depth=27", "6n+4"]),
        ("wrn", dict(widen_factor=0), ["widen_factor", "got 0"]),
        ("wrn", dict(dropout=1.5), ["dropout", "got 1.5"]),
        ("resnet_cifar", dict(depth=21), ["depth=21", "6n+2"]),
        ("pyramidnet", dict(depth=104, bottleneck=True), ["depth=104", "9n+2"]),
        ("pyramidnet", dict(alpha=-1), ["alpha", "got -1"]),
    ],
)
def test_invalid_options_raise_config_error(name, options, words):
    with pytest.raises(ConfigError) as err:
        build_model(name, 10, **options)
    for w in words:
        assert w in str(err.value)


def test_mfd_cnn_wrong_input_size_is_explained():
    with pytest.raises(ConfigError, match="image_size"):
        build_model("mfd-cnn", 10)(images(1, size=64))


def test_registered_names():
    for name in (
        "mfd-cnn", "wrn", "wrn-16-2", "wrn-16-4", "wrn-28-2", "wrn-28-4", "wrn-40-2",
        "resnet_cifar", "resnet20", "resnet56", "resnet110",
        "pyramidnet", "pyramidnet-110-84", "pyramidnet-200-240",
    ):
        assert name in MODELS
    assert len(build_model("resnet20", 10).layer1) == 3 and len(build_model("resnet110", 10).layer3) == 18
    assert math.isclose(count_parameters(build_model("wrn-40-2", 10)) / 1e6, 2.2, rel_tol=0.02)
