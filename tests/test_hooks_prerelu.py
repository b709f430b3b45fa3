"""prerelu resolution and default positions: exact pre-activations of user models, checked
against out-of-place forwards written here, for torchvision- and timm-style blocks."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fairdistill.errors import ConfigError
from fairdistill.models import build_model
from fairdistill.models.external import adapt, check_logits, default_stages
from test_hooks import TorchvisionBlock  # torchvision's BasicBlock

torch.set_num_threads(1)


class TinyResNet(nn.Module):
    """torchvision's ResNet layout (conv1, bn1, relu, layer1..layer4, avgpool, fc)."""

    def __init__(self, num_classes: int = 5, width: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        widths = [width, width, 2 * width, 2 * width, 4 * width]
        for i in range(4):
            setattr(self, f"layer{i + 1}", nn.Sequential(TorchvisionBlock(widths[i], widths[i + 1], 1 + (i % 2))))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def randomise_bn(net: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(-0.5, 0.5)
            m.running_mean.normal_(0, 0.2)
    return net.eval()


def manual(net: TinyResNet, x: torch.Tensor) -> dict:
    """Out-of-place forward: pre-ReLU sums, post-ReLU block outputs, pooled embedding."""
    h = F.relu(net.bn1(net.conv1(x)))
    pre, post = [], []
    for i in range(4):
        b = getattr(net, f"layer{i + 1}")[0]
        identity = h if b.downsample is None else b.downsample(h)
        s = b.bn2(b.conv2(F.relu(b.bn1(b.conv1(h))))) + identity
        h = F.relu(s)
        pre.append(s)
        post.append(h)
    pooled = h.mean(dim=(2, 3))
    return {"pre": pre, "post": post, "pooled": pooled, "logits": net.fc(pooled)}


def test_torchvision_layout_defaults_give_exact_pre_relu_sums(caplog):
    torch.manual_seed(1)
    net = randomise_bn(TinyResNet())
    with caplog.at_level(logging.INFO, logger="fairdistill"):
        hooked = adapt(net, None, (3, 16, 16))
    assert default_stages(net) == ([f"layer{i}" for i in range(1, 5)], "the ResNet layout layer1..layer4")
    assert [str(p) for p in hooked.stage_points] == [f"layer{i}.0.relu:input (call 2 of 2)" for i in range(1, 5)]
    assert hooked.bn_paths == [f"layer{i}.0.bn2" for i in range(1, 5)]  # official OFD: bn2 of the last block
    assert hooked.stage_channels == [4, 8, 8, 16]
    assert "call 2 of 2 (a reused module)" in caplog.text and "before a residual addition" in caplog.text
    x = torch.randn(3, 3, 16, 16)
    want = manual(net, x)
    feats = hooked.forward_features(x)
    for got, pre, post in zip(feats.stages, want["pre"], want["post"]):
        assert not torch.allclose(got, post)  # an un-cloned capture would hold the post-ReLU values
        torch.testing.assert_close(got, pre)
    for got, post in zip(feats.extra["block"], want["post"]):
        torch.testing.assert_close(got, post)
    torch.testing.assert_close(feats.embedding, want["pooled"])
    torch.testing.assert_close(feats.logits, want["logits"])
    assert torch.equal(hooked(x), net(x))


def test_gradients_reach_the_model_through_a_call_indexed_point():
    net = randomise_bn(TinyResNet())
    x = torch.randn(2, 3, 16, 16)
    adapt(net, None, (3, 16, 16)).forward_features(x).stages[2].pow(2).sum().backward()
    got = net.layer3[0].conv2.weight.grad.clone()
    net.zero_grad()
    manual(net, x)["pre"][2].pow(2).sum().backward()
    torch.testing.assert_close(got, net.layer3[0].conv2.weight.grad)


class SeqNet(nn.Module):
    """A Sequential stage ending with its own ReLU module; a timm-style block (separate act
    modules, ``act2`` after the residual add); a stage that ends with a functional ReLU."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act2 = nn.ReLU(inplace=True)
        self.tail = nn.Conv2d(4, 6, 1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 8 * 8, 3))

    def forward(self, x):
        h = self.stem(x)
        y = self.bn(self.conv(h))
        y += h
        y = self.act2(y)
        return self.head(F.relu(self.tail(y)))


def test_sequential_and_separate_activation_modules_resolve_without_call_index():
    net = randomise_bn(SeqNet())
    hooked = adapt(net, {"stages": ["stem", "act2", "tail"], "embedding": None}, (3, 8, 8))
    assert [str(p) for p in hooked.stage_points] == ["stem.2:input", "act2:input", "tail"]
    assert hooked.bn_paths == ["stem.1", None, None]  # exact BN output; act2's input is no BN output
    assert not hooked.block_points  # one stage could not be resolved: no "block" features
    assert str(hooked.embedding_point) == "head.1:input"  # the innermost module that outputs the logits
    x = torch.randn(2, 3, 8, 8)
    feats = hooked.forward_features(x)
    stem = net.stem[1](net.stem[0](x))
    y = net.bn(net.conv(F.relu(stem))) + F.relu(stem)
    torch.testing.assert_close(feats.stages[0], stem)
    torch.testing.assert_close(feats.stages[1], y)
    torch.testing.assert_close(feats.stages[2], net.tail(F.relu(y)))
    torch.testing.assert_close(feats.embedding, F.relu(net.tail(F.relu(y))).flatten(1))
    assert "extra" not in feats.extra


def test_a_functional_relu_cannot_be_resolved_and_is_said(caplog):
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(F.relu(self.block(x)).mean(dim=(2, 3)))

    class Wrapped(nn.Module):  # the block's functional ReLU lives inside its own forward
        def __init__(self):
            super().__init__()
            self.inner = Functional()

        def forward(self, x):
            return self.inner(x)

    with caplog.at_level(logging.WARNING, logger="fairdistill"):
        hooked = adapt(Wrapped(), {"stages": ["inner.block"]}, (3, 8, 8))
    assert str(hooked.stage_points[0]) == "inner.block"
    assert "no activation module inside 'inner.block'" in caplog.text
    assert hooked.notes and "functional ReLU" in hooked.notes[0]


def test_prerelu_false_keeps_stage_outputs_and_explicit_bns_win():
    net = randomise_bn(TinyResNet())
    hooked = adapt(net, {"prerelu": False, "bns": [None, None, None, "layer4.0.bn2"]}, (3, 16, 16))
    x = torch.randn(2, 3, 16, 16)
    feats, want = hooked.forward_features(x), manual(net, x)
    for got, post in zip(feats.stages, want["post"]):
        torch.testing.assert_close(got, post)
    assert hooked.stage_bns() == [None, None, None, net.layer4[0].bn2]


def test_timm_feature_info_gives_the_default_stages():
    net = randomise_bn(TinyResNet())
    net.feature_info = [{"module": "relu", "num_chs": 4, "reduction": 1},
                        {"module": "layer2", "num_chs": 8, "reduction": 2}]
    assert default_stages(net) == (["relu", "layer2"], "timm's feature_info")
    hooked = adapt(net, None, (3, 16, 16))
    assert [str(p) for p in hooked.stage_points] == ["relu:input", "layer2.0.relu:input (call 2 of 2)"]
    assert hooked.bn_paths == [None, "layer2.0.bn2"]
    assert hooked.stage_channels == [4, 8]


def test_plain_module_without_defaults_names_its_children():
    with pytest.raises(ConfigError, match=r"model.features.stages: Sequential has no default.*its modules: 0, 1"):
        adapt(nn.Sequential(nn.Conv2d(3, 2, 1), nn.Flatten()), None, (3, 4, 4))


def test_head_width_and_dry_forward_failures_are_config_errors():
    with pytest.raises(ConfigError, match="outputs 5 classes and the data set has 10"):
        check_logits(TinyResNet(num_classes=5), (3, 16, 16), 10, "model.name")
    with pytest.raises(ConfigError, match=r"dry forward of TinyResNet on a \(1, 1, 16, 16\) input failed"):
        check_logits(TinyResNet(), (1, 16, 16), 5, "model.name")


def test_zoo_models_take_image_size_and_features_from_the_config():
    cnn = build_model("mfd-cnn", 10, input_shape=(3, 8, 8))
    assert cnn.image_size == 8 and cnn.forward_features(torch.zeros(2, 3, 8, 8)).logits.shape == (2, 10)
    assert build_model("mfd-cnn", 10, input_shape=(3, 8, 8), image_size=16).image_size == 16  # the config wins
    hooked = build_model("resnet18", 4, features={"stages": ["layer1", "layer2"]}, input_shape=(3, 32, 32))
    own = hooked.model.eval().forward_features(torch.randn(1, 3, 32, 32))
    assert hooked.stage_channels == [64, 128] and str(hooked.embedding_point) == "fc:input"
    # the zoo ResNet moves each block's ReLU into the next block: its layer outputs are pre-ReLU already
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(hooked.forward_features(x).stages[1], hooked.model.forward_features(x).stages[1])
    assert len(own.stages) == 4
