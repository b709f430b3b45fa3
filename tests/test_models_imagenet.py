"""ImageNet-size zoo: torchvision names and sizes, OFD's pre-ReLU positions, same function."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fairdistill.errors import ConfigError
from fairdistill.models import MODELS, build_model, count_parameters
from fairdistill.models.mobilenet import mobilenet_v1
from fairdistill.models.resnet_imagenet import Bottleneck, ResNet, resnet18
from fairdistill.models.shufflenet import shufflenet_v2_x1_0

torch.set_num_threads(1)

# Published torchvision / OFD parameter counts with a 1000-class head.
COUNTS = {
    "resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
    "resnet101": 44_549_160, "resnet152": 60_192_808, "shufflenet_v2_x1_0": 2_278_604,
}


def meta_model(name: str, **options) -> nn.Module:
    with torch.device("meta"):  # no memory, no init cost: only names and shapes
        return MODELS.get(name)(num_classes=1000, **options)


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def bn_entries(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


def torchvision_resnet_table(layers: list[int], bottleneck: bool, classes: int = 1000) -> dict:
    """State-dict names and shapes of torchvision's ResNet, written from its naming rules."""
    t = {"conv1.weight": (64, 3, 7, 7), **bn_entries("bn1", 64)}
    inp, exp = 64, 4 if bottleneck else 1
    for li, (n, planes) in enumerate(zip(layers, [64, 128, 256, 512]), start=1):
        for j in range(n):
            p = f"layer{li}.{j}"
            if bottleneck:
                convs = [(planes, inp, 1), (planes, planes, 3), (planes * exp, planes, 1)]
            else:
                convs = [(planes, inp, 3), (planes, planes, 3)]
            for k, (o, i, ks) in enumerate(convs, start=1):
                t[f"{p}.conv{k}.weight"] = (o, i, ks, ks)
                t.update(bn_entries(f"{p}.bn{k}", o))
            if j == 0 and (li > 1 or inp != planes * exp):
                t[f"{p}.downsample.0.weight"] = (planes * exp, inp, 1, 1)
                t.update(bn_entries(f"{p}.downsample.1", planes * exp))
            inp = planes * exp
    t["fc.weight"], t["fc.bias"] = (classes, 512 * exp), (classes,)
    return t


def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN affine and running statistics, so eval-mode outputs test every term."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = torch.rand(c, generator=g) + 0.5
            m.bias.data = torch.randn(c, generator=g) * 0.3
            m.running_mean = torch.randn(c, generator=g) * 0.2
            m.running_var = torch.rand(c, generator=g) + 0.5


def bn(x: torch.Tensor, m: nn.BatchNorm2d) -> torch.Tensor:
    return F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)


def conv(x: torch.Tensor, m: nn.Conv2d) -> torch.Tensor:
    return F.conv2d(x, m.weight, None, m.stride, m.padding, groups=m.groups)


def standard_resnet(model: ResNet, x: torch.Tensor):
    """The textbook post-activation ResNet (ReLU after each residual add), eval-mode BN."""
    x = F.max_pool2d(F.relu(bn(conv(x, model.conv1), model.bn1)), 3, 2, 1)
    pre_relu = []
    for layer in model.layers():
        for blk in layer:
            names = ["1", "2", "3"] if isinstance(blk, Bottleneck) else ["1", "2"]
            out = x
            for k, n in enumerate(names):
                out = bn(conv(out, getattr(blk, f"conv{n}")), getattr(blk, f"bn{n}"))
                if k < len(names) - 1:
                    out = F.relu(out)
            short = x if blk.downsample is None else bn(conv(x, blk.downsample[0]), blk.downsample[1])
            pre = out + short
            x = F.relu(pre)
        pre_relu.append(pre)
    pooled = x.mean(dim=(2, 3))
    return F.linear(pooled, model.fc.weight, model.fc.bias), pre_relu, x, pooled


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_parameter_counts(name):
    assert count_parameters(meta_model(name)) == COUNTS[name]


def test_mobilenet_parameter_count_from_its_layer_table():
    table = [(32, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 512)] + [(512, 512)] * 5
    table += [(512, 1024), (1024, 1024)]
    expected = 3 * 32 * 9 + 2 * 32 + sum(9 * i + 2 * i + i * o + 2 * o for i, o in table) + 1024 * 1000 + 1000
    assert count_parameters(meta_model("mobilenet_v1")) == expected == 4_231_976


@pytest.mark.parametrize("name,layers,bottleneck", [
    ("resnet18", [2, 2, 2, 2], False), ("resnet34", [3, 4, 6, 3], False),
    ("resnet50", [3, 4, 6, 3], True), ("resnet152", [3, 8, 36, 3], True),
])
def test_resnet_state_dict_matches_torchvision_names(name, layers, bottleneck):
    assert shapes(meta_model(name)) == torchvision_resnet_table(layers, bottleneck)


def test_resnet18_loads_a_torchvision_layout_state_dict_strictly():
    table = torchvision_resnet_table([2, 2, 2, 2], False, classes=7)
    g = torch.Generator().manual_seed(1)
    state = {k: torch.randn(s, generator=g) if s else torch.tensor(3) for k, s in table.items()}
    model = resnet18(num_classes=7)
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.layer3[0].downsample[0].weight, state["layer3.0.downsample.0.weight"])


def test_resnet_init_is_torchvisions():
    model = resnet18(num_classes=10)
    w = model.layer4[1].conv2.weight  # kaiming normal, fan_out = 512 * 9
    target = (2.0 / (512 * 9)) ** 0.5
    assert abs(w.std().item() / target - 1) < 0.01
    assert torch.all(model.layer2[0].bn1.weight == 1) and torch.all(model.layer2[0].bn1.bias == 0)


@pytest.mark.parametrize("bottleneck", [False, True])
def test_resnet_relu_relocation_computes_the_standard_resnet(bottleneck):
    torch.manual_seed(0)
    model = ResNet(Bottleneck, [1, 1, 1, 1], 10) if bottleneck else resnet18(num_classes=10)
    randomize_bn(model)
    model.eval()
    x = torch.randn(2, 3, 48, 48)
    logits, pre_relu, fmap, pooled = standard_resnet(model, x)
    feats = model.forward_features(x)
    torch.testing.assert_close(feats.logits, logits)
    torch.testing.assert_close(model(x), logits)
    for got, want in zip(feats.stages, pre_relu):
        torch.testing.assert_close(got, want)
        assert (got < 0).any()  # truly pre-ReLU
    for got, stage in zip(feats.extra["block"], feats.stages):
        torch.testing.assert_close(got, F.relu(stage))
    torch.testing.assert_close(feats.embedding, pooled)
    exp = 4 if bottleneck else 1
    assert model.stage_channels == [64 * exp, 128 * exp, 256 * exp, 512 * exp]
    assert [s.shape[1:] for s in feats.stages] == [
        (c, h, h) for c, h in zip(model.stage_channels, [12, 6, 3, 2])
    ]
    last = "bn3" if bottleneck else "bn2"
    assert model.stage_bns() == [getattr(layer[-1], last) for layer in model.layers()]


def test_resnet18_map_embedding_is_post_relu_layer4_map():
    model = build_model("resnet18", num_classes=3, embedding="map").eval()
    randomize_bn(model)
    x = torch.randn(2, 3, 64, 64)
    _, _, fmap, _ = standard_resnet(model, x)
    feats = model.forward_features(x)
    assert feats.embedding.shape == (2, 512, 2, 2)
    torch.testing.assert_close(feats.embedding, fmap)
    torch.testing.assert_close(feats.logits, model(x))


def test_resnet_features_have_gradients_and_are_not_overwritten():
    model = resnet18(num_classes=4)
    randomize_bn(model)
    feats = model.forward_features(torch.randn(2, 3, 32, 32))  # train mode
    before = [s.detach().clone() for s in feats.stages]
    (feats.logits.sum() + sum(s.sum() for s in feats.stages)).backward()
    for s, b in zip(feats.stages, before):
        assert torch.equal(s.detach(), b)
    assert model.conv1.weight.grad is not None


def test_bad_embedding_option_is_a_config_error():
    with pytest.raises(ConfigError, match="embedding.*pooled, map"):
        build_model("resnet50", num_classes=2, embedding="mean")
    with pytest.raises(ConfigError, match="embedding"):
        build_model("shufflenet_v2_x1_0", num_classes=2, embedding="vector")


def test_mobilenet_positions_are_exact_pointwise_bn_outputs():
    torch.manual_seed(0)
    model = mobilenet_v1(num_classes=5)
    randomize_bn(model)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    bn_out = {}
    hooks = [bn_.register_forward_hook(lambda m, a, o, k=k: bn_out.__setitem__(k, o.clone()))
             for k, bn_ in enumerate(model.stage_bns())]
    with torch.no_grad():
        y = model.model(x)  # the plain Sequential, in-place ReLUs and all
        logits = model.fc(y.mean(dim=(2, 3)))
    for h in hooks:
        h.remove()
    feats = model.forward_features(x)
    torch.testing.assert_close(feats.logits, logits)
    torch.testing.assert_close(feats.embedding, y.mean(dim=(2, 3)))
    assert model.stage_channels == [128, 256, 512, 1024]
    assert [tuple(s.shape) for s in feats.stages] == [(2, 128, 16, 16), (2, 256, 8, 8), (2, 512, 4, 4), (2, 1024, 2, 2)]
    for k, (stage, block) in enumerate(zip(feats.stages, feats.extra["block"])):
        torch.testing.assert_close(stage, bn_out[k])
        torch.testing.assert_close(block, F.relu(stage))
        assert (stage < 0).any()
    assert model.stage_bns() == [model.model[k][4] for k in (3, 5, 11, 13)]


def test_mobilenet_names_follow_ofd_sequential_layout():
    names = shapes(meta_model("mobilenet_v1"))
    assert names["model.0.0.weight"] == (32, 3, 3, 3)
    assert names["model.13.0.weight"] == (1024, 1, 3, 3)  # depthwise
    assert names["model.13.3.weight"] == (1024, 1024, 1, 1)  # pointwise
    assert names["model.13.4.weight"] == (1024,)
    assert names["fc.weight"] == (1000, 1024)


def torchvision_shufflenet_table() -> dict:
    """State-dict names and shapes of torchvision's shufflenet_v2_x1_0, from its naming rules."""
    t = {"conv1.0.weight": (24, 3, 3, 3), **bn_entries("conv1.1", 24)}
    inp = 24
    for s, (n, out) in enumerate(zip([4, 8, 4], [116, 232, 464]), start=2):
        half = out // 2
        for j in range(n):
            p = f"stage{s}.{j}"
            if j == 0:
                t[f"{p}.branch1.0.weight"] = (inp, 1, 3, 3)
                t.update(bn_entries(f"{p}.branch1.1", inp))
                t[f"{p}.branch1.2.weight"] = (half, inp, 1, 1)
                t.update(bn_entries(f"{p}.branch1.3", half))
            t[f"{p}.branch2.0.weight"] = (half, inp if j == 0 else half, 1, 1)
            t.update(bn_entries(f"{p}.branch2.1", half))
            t[f"{p}.branch2.3.weight"] = (half, 1, 3, 3)
            t.update(bn_entries(f"{p}.branch2.4", half))
            t[f"{p}.branch2.5.weight"] = (half, half, 1, 1)
            t.update(bn_entries(f"{p}.branch2.6", half))
        inp = out
    t["conv5.0.weight"] = (1024, 464, 1, 1)
    t.update(bn_entries("conv5.1", 1024))
    t["fc.weight"], t["fc.bias"] = (1000, 1024), (1000,)
    return t


def test_shufflenet_state_dict_matches_torchvision_names():
    assert shapes(meta_model("shufflenet_v2_x1_0")) == torchvision_shufflenet_table()


def shuffle_by_index(x: torch.Tensor) -> torch.Tensor:
    """Channel shuffle with 2 groups as a permutation: out = [c0, c_h, c1, c_h+1, ...]."""
    c = x.shape[1]
    perm = torch.arange(c).view(2, c // 2).t().reshape(-1)
    return x[:, perm]


def standard_shufflenet(model, x):
    x = F.max_pool2d(F.relu(bn(conv(x, model.conv1[0]), model.conv1[1])), 3, 2, 1)

    def branch(seq, z):  # conv-BN(-ReLU) chains; ReLU after the BN that a ReLU module follows
        mods = list(seq)
        for i, m in enumerate(mods):
            if isinstance(m, nn.Conv2d):
                z = conv(z, m)
            elif isinstance(m, nn.BatchNorm2d):
                z = bn(z, m)
                if i + 1 < len(mods) and isinstance(mods[i + 1], nn.ReLU):
                    z = F.relu(z)
        return z

    outs = []
    for stage in (model.stage2, model.stage3, model.stage4):
        for unit in stage:
            if unit.stride == 1:
                c = x.shape[1] // 2
                x = shuffle_by_index(torch.cat([x[:, :c], branch(unit.branch2, x[:, c:])], 1))
            else:
                x = shuffle_by_index(torch.cat([branch(unit.branch1, x), branch(unit.branch2, x)], 1))
        outs.append(x)
    conv5_bn = bn(conv(x, model.conv5[0]), model.conv5[1])
    fmap = F.relu(conv5_bn)
    return F.linear(fmap.mean(dim=(2, 3)), model.fc.weight, model.fc.bias), outs, conv5_bn, fmap


def test_shufflenet_computes_the_standard_function_and_pre_relu_stages():
    torch.manual_seed(0)
    model = shufflenet_v2_x1_0(num_classes=2)
    randomize_bn(model)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    logits, outs, conv5_bn, fmap = standard_shufflenet(model, x)
    feats = model.forward_features(x)
    torch.testing.assert_close(feats.logits, logits)
    torch.testing.assert_close(model(x), logits)
    torch.testing.assert_close(feats.embedding, fmap)
    assert feats.embedding.shape == (2, 1024, 2, 2)
    assert model.stage_channels == [116, 232, 464, 1024]
    for k, (stage, block) in enumerate(zip(feats.stages, feats.extra["block"])):
        assert stage.shape[1] == model.stage_channels[k]
        assert (stage < 0).any()
        torch.testing.assert_close(F.relu(stage), block)
        torch.testing.assert_close(block, (outs + [fmap])[k])
    torch.testing.assert_close(feats.stages[3], conv5_bn)
    assert model.stage_bns() == [None, None, None, model.conv5[1]]


def test_shufflenet_pooled_embedding_is_mean_of_conv5_map():
    model = build_model("shufflenet_v2_x1_0", num_classes=2, embedding="pooled").eval()
    feats = model.forward_features(torch.randn(1, 3, 32, 32))
    assert feats.embedding.shape == (1, 1024)
    torch.testing.assert_close(feats.embedding, feats.extra["block"][-1].mean(dim=(2, 3)))
