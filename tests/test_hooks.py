"""HookedModel: true pre-activations from any classifier, even with in-place ops after capture."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fairdistill.errors import ConfigError
from fairdistill.models import HookedModel
from fairdistill.models.resnet_imagenet import resnet18

torch.set_num_threads(1)


class TorchvisionBlock(nn.Module):
    """torchvision's BasicBlock: one in-place ReLU module reused, ``out += identity`` in place."""

    def __init__(self, inp: int, out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inp, out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out, out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.downsample = None
        if stride != 1 or inp != out:
            self.downsample = nn.Sequential(nn.Conv2d(inp, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(TorchvisionBlock(8, 8))
        self.layer2 = nn.Sequential(TorchvisionBlock(8, 16, 2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def make_net() -> TinyNet:
    torch.manual_seed(0)
    net = TinyNet()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.bias.data.normal_(0, 0.5)
            m.running_mean.normal_(0, 0.2)
    return net.eval()


def manual_forward(net: TinyNet, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Independent forward with out-of-place ops; returns the pre-activations by name."""
    r = {}
    r["bn1"] = net.bn1(net.conv1(x))
    h = F.relu(r["bn1"])
    for name, layer in (("layer1", net.layer1), ("layer2", net.layer2)):
        b = layer[0]
        identity = h if b.downsample is None else b.downsample(h)
        r[f"{name}.0.bn2"] = b.bn2(b.conv2(F.relu(b.bn1(b.conv1(h)))))
        h = F.relu(r[f"{name}.0.bn2"] + identity)
        r[name] = h
    r["pooled"] = h.mean(dim=(2, 3))
    r["logits"] = net.fc(r["pooled"])
    return r


def test_captured_bn_output_survives_in_place_add_and_relu():
    net = make_net()
    x = torch.randn(2, 3, 8, 8)
    want = manual_forward(net, x)
    hooked = HookedModel(net, stages=["layer1.0.bn2", "layer2.0.bn2"],
                         stage_bns=["layer1.0.bn2", "layer2.0.bn2"])
    feats = hooked.forward_features(x)
    for got, path in zip(feats.stages, ["layer1.0.bn2", "layer2.0.bn2"]):
        assert (got < 0).any()
        torch.testing.assert_close(got, want[path])
    torch.testing.assert_close(feats.logits, want["logits"])
    assert hooked.stage_channels == [8, 16]
    assert hooked.stage_bns() == [net.layer1[0].bn2, net.layer2[0].bn2]


def test_a_hook_without_clone_would_be_overwritten():
    """Shows the test above exercises the in-place hazard: a naive hook sees the post-ReLU sum."""
    net = make_net()
    x = torch.randn(2, 3, 8, 8)
    want = manual_forward(net, x)
    kept = []
    h = net.layer1[0].bn2.register_forward_hook(lambda m, a, o: kept.append(o))
    net(x)
    h.remove()
    assert (kept[0] >= 0).all()
    assert not torch.allclose(kept[0], want["layer1.0.bn2"])


def test_input_capture_gives_pre_activation_of_an_in_place_relu():
    net = make_net()
    x = torch.randn(2, 3, 8, 8)
    want = manual_forward(net, x)
    hooked = HookedModel(net, stages=["relu", "layer2"], stage_inputs=[True, False],
                         embedding="fc", embedding_input=True, input_shape=(3, 8, 8))
    feats = hooked.forward_features(x)
    assert (feats.stages[0] < 0).any()
    torch.testing.assert_close(feats.stages[0], want["bn1"])
    torch.testing.assert_close(feats.stages[1], want["layer2"])
    torch.testing.assert_close(feats.embedding, want["pooled"])
    assert hooked.stage_channels == [8, 16]


def test_hooks_do_not_change_logits_and_are_removed():
    net = make_net()
    x = torch.randn(2, 3, 8, 8)
    before = net(x)
    hooked = HookedModel(net, stages=["layer1.0.bn2", "layer2.0.bn2"], embedding="avgpool")
    feats = hooked.forward_features(x)
    assert torch.equal(feats.logits, before)
    assert torch.equal(hooked(x), before)
    assert torch.equal(net(x), before)
    assert feats.embedding.shape == (2, 16, 1, 1)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())
    twin = copy.deepcopy(hooked)
    torch.testing.assert_close(twin.forward_features(x).stages[0], feats.stages[0])


def test_embedding_defaults_to_last_stage():
    net = make_net()
    feats = HookedModel(net, stages=["layer1.0.bn2", "layer2.0.bn2"]).forward_features(torch.randn(1, 3, 8, 8))
    assert feats.embedding is feats.stages[-1]


def test_gradients_flow_through_captured_features():
    net = make_net()
    x = torch.randn(2, 3, 8, 8)
    HookedModel(net, stages=["layer2.0.bn2"]).forward_features(x).stages[0].pow(2).sum().backward()
    got = net.layer2[0].conv2.weight.grad.clone()
    net.zero_grad()
    manual_forward(net, x)["layer2.0.bn2"].pow(2).sum().backward()
    torch.testing.assert_close(got, net.layer2[0].conv2.weight.grad)


def test_unknown_path_names_it_and_suggests_the_nearest():
    with pytest.raises(ConfigError, match=r"stages\[1\].*'layr2.0.bn2'.*Did you mean 'layer2.0.bn2'"):
        HookedModel(make_net(), stages=["layer1", "layr2.0.bn2"])
    with pytest.raises(ConfigError, match="embedding.*'avgpol'.*'avgpool'"):
        HookedModel(make_net(), stages=["layer1.0.bn2"], embedding="avgpol")
    with pytest.raises(ConfigError, match=r"stage_bns\[0\]"):
        HookedModel(make_net(), stages=["layer1.0.bn2"], stage_bns=["layer1.0.bn9"])


def test_channels_need_a_dry_forward_for_untyped_modules():
    net = make_net()
    with pytest.raises(ConfigError, match="input_shape"):
        HookedModel(net, stages=["layer1", "layer2"])
    net.train()
    net.layer1.eval()
    stats = net.bn1.running_mean.clone()
    hooked = HookedModel(net, stages=["layer1", "layer2"], input_shape=(3, 8, 8))
    assert hooked.stage_channels == [8, 16]
    assert net.training and not net.layer1.training and net.layer2.training  # modes restored
    assert torch.equal(net.bn1.running_mean, stats)  # the dry forward left BN statistics alone


def test_bad_stage_bns_are_config_errors():
    net = make_net()
    with pytest.raises(ConfigError, match="Conv2d, not a BatchNorm"):
        HookedModel(net, stages=["layer1.0.bn2"], stage_bns=["layer1.0.conv2"])
    with pytest.raises(ConfigError, match="8 channels but stage 'layer2.0.bn2' has 16"):
        HookedModel(net, stages=["layer2.0.bn2"], stage_bns=["layer1.0.bn2"])
    with pytest.raises(ConfigError, match="2 entries for 1 stages"):
        HookedModel(net, stages=["layer2.0.bn2"], stage_bns=[None, None])


def test_module_that_runs_twice_is_refused():
    with pytest.raises(ConfigError, match="'layer1.0.relu' ran 2 times"):  # found by the dry forward
        HookedModel(make_net(), stages=["layer1.0.relu"], stage_inputs=True, input_shape=(3, 8, 8))
    hooked = HookedModel(make_net(), stages=["layer1.0.bn2"], embedding="layer2.0.relu")
    with pytest.raises(ConfigError, match="'layer2.0.relu' ran 2 times"):
        hooked.forward_features(torch.randn(1, 3, 8, 8))


def test_hooking_the_zoo_resnet_reproduces_its_own_features():
    model = resnet18(num_classes=3).eval()
    x = torch.randn(1, 3, 32, 32)
    layers = ["layer1", "layer2", "layer3", "layer4"]
    hooked = HookedModel(model, stages=layers, embedding="fc", embedding_input=True,
                         stage_bns=[f"{p}.1.bn2" for p in layers], input_shape=(3, 32, 32))
    own, got = model.forward_features(x), hooked.forward_features(x)
    assert hooked.stage_channels == model.stage_channels
    assert hooked.stage_bns() == model.stage_bns()
    for a, b in zip(got.stages, own.stages):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(got.embedding, own.embedding)
    torch.testing.assert_close(got.logits, own.logits)
