"""DeepLabV3+ models: sizes, names, the official function, OFD's six positions, weights, quirks."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_models_imagenet import COUNTS, bn, bn_entries, randomize_bn, torchvision_resnet_table
from test_models_mobilenetv2 import reference_features, torchvision_mobilenetv2_table
from torch import nn

import fairdistill.models.deeplab  # noqa: F401  (registers the models)
from fairdistill.errors import ConfigError
from fairdistill.models import MODELS, build_model, count_parameters

torch.set_num_threads(1)

BIG = ["deeplabv3plus-resnet101", "deeplabv3plus-resnet18", "deeplabv3plus-mobilenetv2"]
README_M = {"deeplabv3plus-resnet101": 59.34, "deeplabv3plus-resnet18": 16.61, "deeplabv3plus-mobilenetv2": 5.82}
# (backbone params without its classifier, ASPP input channels, low-level channels)
BACKBONES = {
    "deeplabv3plus-resnet101": (COUNTS["resnet101"] - 2048 * 1000 - 1000, 2048, 256),
    "deeplabv3plus-resnet18": (COUNTS["resnet18"] - 512 * 1000 - 1000, 512, 64),
    "deeplabv3plus-mobilenetv2": (3_504_872 - (320 * 1280 + 2 * 1280) - (1280 * 1000 + 1000), 320, 24),
}
CHANNELS = {
    "deeplabv3plus-resnet101": [256, 512, 1024, 2048, 256, 256],
    "deeplabv3plus-resnet18": [64, 128, 256, 512, 256, 256],
    "deeplabv3plus-mobilenetv2": [144, 192, 576, 320, 256, 256],
}
STRIDES = {16: [4, 8, 16, 16, 16, 4], 8: [4, 8, 8, 8, 8, 4]}
RATES = {16: (1, 6, 12, 18), 8: (1, 12, 24, 36)}
_cache: dict = {}


def model(name: str, **options) -> nn.Module:
    """A built model, cached per (name, options) (ResNet-18 and MobileNetV2 take ~1 s to init)."""
    key = (name, tuple(sorted(options.items())))
    if key not in _cache:
        torch.manual_seed(0)
        m = build_model(name, num_classes=options.pop("num_classes", 21), **options)
        randomize_bn(m, seed=1)
        _cache[key] = m
    return _cache[key]


def meta_model(name: str, output_stride: int = 16) -> nn.Module:
    """The model on the meta device (names and shapes, no memory), cached."""
    key = ("meta", name, output_stride)
    if key not in _cache:
        with torch.device("meta"):
            _cache[key] = MODELS.get(name)(num_classes=21, output_stride=output_stride)
    return _cache[key]


def head_params(c_in: int, low: int, classes: int = 21, c: int = 256, proj: int = 48) -> int:
    """ASPP + decoder parameter count from dense.md §1.1's layer list."""
    aspp = (c_in * c + 2 * c) + 3 * (9 * c_in * c + 2 * c) + (c_in * c + 2 * c) + (5 * c * c + 2 * c)
    decoder = (low * proj + 2 * proj) + (9 * (c + proj) * c + 2 * c) + (9 * c * c + 2 * c) + (c * classes + classes)
    return aspp + decoder


@pytest.mark.parametrize("name", BIG)
def test_parameter_counts(name):
    m = meta_model(name)
    backbone, c_in, low = BACKBONES[name]
    assert count_parameters(m) == backbone + head_params(c_in, low)
    assert abs(count_parameters(m) / (README_M[name] * 1e6) - 1) < 0.01


def official_head_table(c_in: int, low: int, classes: int = 21) -> dict:
    """Head state-dict names of the official modeling/aspp.py and decoder.py."""
    t = {}
    for k in range(1, 5):
        t[f"aspp.aspp{k}.atrous_conv.weight"] = (256, c_in, 1, 1) if k == 1 else (256, c_in, 3, 3)
        t.update(bn_entries(f"aspp.aspp{k}.bn", 256))
    t["aspp.global_avg_pool.1.weight"] = (256, c_in, 1, 1)
    t.update(bn_entries("aspp.global_avg_pool.2", 256))
    t["aspp.conv1.weight"] = (256, 1280, 1, 1)
    t.update(bn_entries("aspp.bn1", 256))
    t["decoder.conv1.weight"] = (48, low, 1, 1)
    t.update(bn_entries("decoder.bn1", 48))
    t["decoder.last_conv.0.weight"] = (256, 304, 3, 3)
    t.update(bn_entries("decoder.last_conv.1", 256))
    t["decoder.last_conv.4.weight"] = (256, 256, 3, 3)
    t.update(bn_entries("decoder.last_conv.5", 256))
    t["decoder.last_conv.8.weight"], t["decoder.last_conv.8.bias"] = (classes, 256, 1, 1), (classes,)
    return t


@pytest.mark.parametrize("name", BIG)
def test_state_dict_is_backbone_torchvision_plus_official_head(name):
    m = meta_model(name)
    if name == "deeplabv3plus-mobilenetv2":
        tv = torchvision_mobilenetv2_table()
        tv = {k: v for k, v in tv.items() if not k.startswith(("features.18.", "classifier."))}
    else:
        layers, bottleneck = ([3, 4, 23, 3], True) if name.endswith("101") else ([2, 2, 2, 2], False)
        tv = {k: v for k, v in torchvision_resnet_table(layers, bottleneck).items() if not k.startswith("fc.")}
    want = {f"backbone.{k}": v for k, v in tv.items()} | official_head_table(*BACKBONES[name][1:])
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == want


@pytest.mark.parametrize("output_stride", [16, 8])
@pytest.mark.parametrize("name", BIG)
def test_positions_channels_and_strides(name, output_stride):
    m = meta_model(name, output_stride)
    assert m.stage_channels == CHANNELS[name]
    assert m.stage_strides == STRIDES[output_stride]
    if name.endswith("101") and output_stride == 8:
        return  # its layout is test_resnet101_multi_grid_dilations'; a meta forward takes seconds
    with torch.device("meta"):  # shapes only: no memory, no arithmetic
        feats = m.forward_features(torch.empty(2, 3, 65, 65))
        logits = m(torch.empty(2, 3, 65, 65))
    assert tuple(logits.shape) == tuple(feats.logits.shape) == (2, 21, 65, 65)
    sides = [-(-65 // s) for s in STRIDES[output_stride]]  # ceil(65 / stride)
    assert [tuple(s.shape) for s in feats.stages] == [(2, c, h, h) for c, h in zip(CHANNELS[name], sides)]
    assert tuple(feats.embedding.shape) == (2, 256, 17, 17)
    assert m.aspp.rates == RATES[output_stride]
    assert [m.aspp.aspp2.atrous_conv.dilation[0], m.aspp.aspp3.atrous_conv.dilation[0],
            m.aspp.aspp4.atrous_conv.dilation[0]] == list(RATES[output_stride][1:])


@pytest.mark.parametrize("output_stride,grid3,grid4", [(16, [1] * 23, [2, 4, 8]), (8, [2] * 23, [4, 8, 16])])
def test_resnet101_multi_grid_dilations(output_stride, grid3, grid4):
    bb = meta_model("deeplabv3plus-resnet101", output_stride).backbone
    assert [b.conv2.dilation[0] for b in bb.layer3] == grid3
    assert [b.conv2.dilation[0] for b in bb.layer4] == grid4
    assert [b.conv2.padding[0] for b in bb.layer4] == grid4
    assert bb.layer4[0].conv2.stride == (1, 1) and bb.layer4[0].downsample[0].stride == (1, 1)
    assert bb.layer3[0].conv2.stride == ((2, 2) if output_stride == 16 else (1, 1))


@pytest.mark.parametrize("output_stride,d3,d4", [(16, 1, 2), (8, 2, 4)])
def test_resnet18_plain_dilation_on_both_convs(output_stride, d3, d4):
    bb = meta_model("deeplabv3plus-resnet18", output_stride).backbone
    assert [(b.conv1.dilation[0], b.conv2.dilation[0]) for b in bb.layer3] == [(d3, d3)] * 2
    assert [(b.conv1.dilation[0], b.conv2.dilation[0]) for b in bb.layer4] == [(d4, d4)] * 2


# ---------------------------------------------------------------------- an independent reference


def conv(x, m: nn.Conv2d):
    pad = (m.kernel_size[0] // 2) * m.dilation[0]
    return F.conv2d(x, m.weight, m.bias, m.stride, pad, m.dilation, m.groups)


def resize_align_corners(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize with align_corners=True by index arithmetic: output pixel i samples the
    input at i * (n_in - 1) / (n_out - 1) and interpolates linearly, separably in H and W."""
    def axis(n_in, n_out):
        src = torch.zeros(n_out, dtype=torch.float64) if n_out == 1 else \
            torch.arange(n_out, dtype=torch.float64) * (n_in - 1) / (n_out - 1)
        i0 = src.floor().long().clamp(max=n_in - 1)
        return i0, (i0 + 1).clamp(max=n_in - 1), (src - i0).to(x.dtype)

    (h0, h1, wh), (w0, w1, ww) = axis(x.shape[-2], size[0]), axis(x.shape[-1], size[1])
    rows = x[..., h0, :] * (1 - wh)[:, None] + x[..., h1, :] * wh[:, None]
    return rows[..., w0] * (1 - ww) + rows[..., w1] * ww


def reference_resnet(bb, x):
    """The textbook post-activation dilated ResNet (ReLU after each residual add), eval BN."""
    x = F.relu(bn(conv(x, bb.conv1), bb.bn1))
    if isinstance(bb.maxpool, nn.MaxPool2d):
        x = F.max_pool2d(x, 3, 2, 1)
    pre = []
    for layer in bb.layers():
        for blk in layer:
            convs = [m for m in blk.children() if isinstance(m, nn.Conv2d)]
            bns = [m for m in blk.children() if isinstance(m, nn.BatchNorm2d)]
            out = x
            for k, (c, b) in enumerate(zip(convs, bns)):
                out = bn(conv(out, c), b)
                if k < len(convs) - 1:
                    out = F.relu(out)
            short = x if blk.downsample is None else bn(conv(x, blk.downsample[0]), blk.downsample[1])
            p = out + short
            x = F.relu(p)
        pre.append(p)
    return pre, F.relu(pre[0]), x


def reference_head(m, high, low, size, rates):
    """ASPP + decoder of dense.md §1.1 from the weights, eval mode; returns (pos5, pos6, logits)."""
    a, d = m.aspp, m.decoder
    branches = [F.relu(bn(F.conv2d(high, a.aspp1.atrous_conv.weight), a.aspp1.bn))]
    for br, r in zip([a.aspp2, a.aspp3, a.aspp4], rates[1:]):
        branches.append(F.relu(bn(F.conv2d(high, br.atrous_conv.weight, padding=r, dilation=r), br.bn)))
    pooled = F.relu(bn(F.conv2d(high.mean(dim=(2, 3), keepdim=True), a.global_avg_pool[1].weight),
                       a.global_avg_pool[2]))
    branches.append(resize_align_corners(pooled, high.shape[-2:]))
    pos5 = bn(F.conv2d(torch.cat(branches, 1), a.conv1.weight), a.bn1)
    low = F.relu(bn(F.conv2d(low, d.conv1.weight), d.bn1))
    h = torch.cat([resize_align_corners(F.relu(pos5), low.shape[-2:]), low], 1)
    h = F.relu(bn(conv(h, d.last_conv[0]), d.last_conv[1]))
    pos6 = bn(conv(h, d.last_conv[4]), d.last_conv[5])
    logits = conv(F.relu(pos6), d.last_conv[8])
    return pos5, pos6, resize_align_corners(logits, size)


CASES = [("deeplabv3plus-tiny", {"num_classes": 11}, 64, (1, 2, 3, 4)),
         ("deeplabv3plus-resnet18", {}, 65, RATES[16]),
         ("deeplabv3plus-resnet18", {"output_stride": 8}, 33, RATES[8]),
         ("deeplabv3plus-mobilenetv2", {}, 65, RATES[16])]


@pytest.mark.parametrize("name,options,side,rates", CASES)
def test_model_computes_the_official_function_in_eval_mode(name, options, side, rates):
    m = model(name, **options).eval()
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        feats = m.forward_features(x)
        logits = m(x)
        if name.endswith("mobilenetv2"):
            y, exp, low = reference_features(m.backbone.features, x)
            stages, high = [exp[4], exp[7], exp[14], y], y
        else:
            stages, low, high = reference_resnet(m.backbone, x)
        pos5, pos6, ref_logits = reference_head(m, high, low, x.shape[-2:], rates)
    assert logits.shape == (2, m.num_classes, side, side)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(feats.logits, logits)  # getting features does not change the logits
    for got, ref in zip(feats.stages, stages + [pos5, pos6]):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(feats.embedding, F.relu(pos6), rtol=1e-4, atol=1e-4)


def test_final_upsampling_is_bilinear_align_corners():
    m = model("deeplabv3plus-tiny", num_classes=11).eval()
    seen = {}
    h = m.decoder.last_conv[8].register_forward_hook(lambda mod, a, o: seen.__setitem__("low_res", o))
    x = torch.randn(1, 3, 61, 70)
    with torch.no_grad():
        logits = m(x)
    h.remove()
    assert seen["low_res"].shape[-2:] == (16, 18)  # ceil(61/4), ceil(70/4)
    torch.testing.assert_close(logits, resize_align_corners(seen["low_res"], (61, 70)))
    corners = logits[..., [0, 0, -1, -1], [0, -1, 0, -1]]  # align_corners: corners copy exactly
    torch.testing.assert_close(corners, seen["low_res"][..., [0, 0, -1, -1], [0, -1, 0, -1]])


@pytest.mark.parametrize("name,options", [("deeplabv3plus-tiny", {"num_classes": 11}),
                                          ("deeplabv3plus-resnet18", {}), ("deeplabv3plus-mobilenetv2", {})])
def test_stage_bns_and_pre_activations_survive_a_training_step(name, options):
    m = model(name, **options).train()
    bns = m.stage_bns()
    if name.endswith("mobilenetv2"):
        f = m.backbone.features
        assert bns[:4] == [f[4].conv[0][1], f[7].conv[0][1], f[14].conv[0][1], f[17].conv[3]]
    else:
        assert bns[:4] == [layer[-1].last_bn for layer in m.backbone.layers()]
    assert bns[4:] == [m.aspp.bn1, m.decoder.last_conv[5]]
    bn_out, block_in = {}, {}  # copies taken when each tensor is made
    hooks = [b.register_forward_hook(lambda mod, a, o, k=k: bn_out.__setitem__(k, o.detach().clone()))
             for k, b in enumerate(bns)]
    if not name.endswith("mobilenetv2"):
        hooks += [layer[-1].register_forward_pre_hook(lambda mod, a, k=k: block_in.__setitem__(k, a[0].detach().clone()))
                  for k, layer in enumerate(m.backbone.layers())]
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    feats = m.forward_features(x)
    (feats.logits.square().mean() + sum(s.square().mean() for s in feats.stages)).backward()
    for hk in hooks:
        hk.remove()
    m.zero_grad(set_to_none=True)
    for k, stage in enumerate(feats.stages):
        assert stage.shape[1] == m.stage_channels[k]
        assert (stage < 0).any() and (stage > 0).any()
        if k < 4 and not name.endswith("mobilenetv2"):  # stage = last BN + shortcut of relu(input)
            blk = m.backbone.layers()[k][-1]
            with torch.no_grad():
                short = F.relu(block_in[k])
                short = short if blk.downsample is None else blk.downsample(short)
            torch.testing.assert_close(stage.detach(), bn_out[k] + short)
        else:  # a bare BN output, exactly
            assert torch.equal(stage.detach(), bn_out[k])
        act = F.relu6(stage) if name.endswith("mobilenetv2") and k < 3 else \
            stage if name.endswith("mobilenetv2") and k == 3 else F.relu(stage)
        torch.testing.assert_close(feats.extra["block"][k], act)
    torch.testing.assert_close(feats.embedding, F.relu(feats.stages[5]))


@pytest.mark.parametrize("name,options", [("deeplabv3plus-tiny", {"num_classes": 11})])
def test_aspp_dropout_on_features_quirk(name, options):
    base = model(name, **options)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))

    def run(fn, net):
        torch.manual_seed(123)
        return fn(net.train(), x).detach()

    on, off = copy.deepcopy(base), copy.deepcopy(base)
    off.aspp_dropout_on_features = False
    no_aspp_dropout = copy.deepcopy(base)
    no_aspp_dropout.aspp.dropout = nn.Identity()
    with torch.no_grad():  # eval mode: dropout is off everywhere, both paths agree
        torch.testing.assert_close(copy.deepcopy(off).eval().forward_features(x).logits, base.eval()(x))
    forward = run(lambda n, z: n(z), base)
    torch.testing.assert_close(run(lambda n, z: n.forward_features(z).logits, on), forward)
    quirk = run(lambda n, z: n.forward_features(z).logits, off)
    torch.testing.assert_close(quirk, run(lambda n, z: n(z), no_aspp_dropout))
    assert not torch.allclose(quirk, forward)  # the dropout really is skipped in train mode
    torch.testing.assert_close(run(lambda n, z: n(z), copy.deepcopy(off)), forward)  # forward keeps it
    assert build_model(name, num_classes=5, aspp_dropout_on_features=False).aspp_dropout_on_features is False


def test_head_init_is_official_kaiming_fan_in():
    m = build_model("deeplabv3plus-tiny", num_classes=11, width=16)
    w = m.aspp.aspp2.atrous_conv.weight  # fan_in 64 * 9, n = 36,864
    assert abs(w.std().item() / (2.0 / (64 * 9)) ** 0.5 - 1) < 0.03
    assert torch.all(m.aspp.bn1.weight == 1) and torch.all(m.decoder.last_conv[5].bias == 0)
    wb = m.backbone.layer4[0].conv2.weight  # backbone: N(0, 2 / (k^2 out)), fan_out 64 * 9
    assert abs(wb.std().item() / (2.0 / (64 * 9)) ** 0.5 - 1) < 0.03


@pytest.mark.parametrize("width", [16, 8])
def test_tiny_layout(width):
    m = build_model("deeplabv3plus-tiny", num_classes=11, width=width)
    w = width
    assert m.stage_channels == [w, 2 * w, 4 * w, 4 * w, 4 * w, 4 * w]
    assert m.stage_strides == [4, 8, 8, 8, 8, 4]
    assert count_parameters(m) == {16: 375_899, 8: 94_771}[width]
    feats = m.eval().forward_features(torch.randn(1, 3, 64, 64))
    assert [s.shape[-1] for s in feats.stages] == [16, 8, 8, 8, 8, 16]
    assert build_model("deeplabv3plus-tiny", num_classes=3, dropout=False).aspp.dropout.p == 0


# ---------------------------------------------------------------------- ImageNet backbone weights


def random_state(table: dict, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) if s else torch.tensor(7) for k, s in table.items()}


def test_resnet18_backbone_loads_a_torchvision_file(tmp_path):
    state = random_state(torchvision_resnet_table([2, 2, 2, 2], False))
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # as in old files
    path = tmp_path / "resnet18-5c106cde.pth"
    torch.save({"state_dict": state}, path)
    m = build_model("deeplabv3plus-resnet18", num_classes=21, backbone_weights=str(path))
    got = m.backbone.state_dict()
    assert set(got) == {k for k in state if not k.startswith("fc.")} | {k for k in got if k.endswith("tracked")}
    for k in got:
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(got[k], state[k]), k


def test_mobilenetv2_backbone_loads_a_torchvision_file(tmp_path):
    state = random_state(torchvision_mobilenetv2_table(), seed=1)
    path = tmp_path / "mobilenet_v2.pth"
    torch.save({"module." + k: v for k, v in state.items()}, path)  # a DataParallel save
    m = build_model("deeplabv3plus-mobilenetv2", num_classes=21, backbone_weights=str(path))
    got = m.backbone.state_dict()
    assert set(got) == {k for k in state if not k.startswith(("features.18.", "classifier."))}
    for k in got:
        assert torch.equal(got[k], state[k]), k


def test_safetensors_backbone_file(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    state = random_state(torchvision_resnet_table([2, 2, 2, 2], False), seed=2)
    path = tmp_path / "resnet18.safetensors"
    st.save_file(state, str(path))
    m = build_model("deeplabv3plus-resnet18", num_classes=21, backbone_weights=str(path))
    assert torch.equal(m.backbone.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])


def test_mismatching_backbone_file_is_a_config_error_naming_file_and_keys(tmp_path):
    state = random_state(torchvision_resnet_table([2, 2, 2, 2], False))
    del state["layer2.0.bn1.weight"]
    state["layer3.1.conv1.weight"] = torch.zeros(256, 256, 1, 1)
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "wrong.pth"
    torch.save(state, path)
    with pytest.raises(ConfigError) as err:
        build_model("deeplabv3plus-resnet18", num_classes=21, backbone_weights=str(path))
    msg = str(err.value)
    for part in ("backbone_weights", "wrong.pth", "layer2.0.bn1.weight", "extra.weight",
                 "layer3.1.conv1.weight (256, 256, 1, 1) in the file, (256, 256, 3, 3) in the model"):
        assert part in msg
    resnet34_file = tmp_path / "r34.pth"  # the right format but another architecture
    torch.save({k: torch.zeros(s) for k, s in torchvision_resnet_table([3, 4, 6, 3], False).items()}, resnet34_file)
    with pytest.raises(ConfigError, match=r"unexpected keys: layer1\.2\.conv1\.weight.*\(\d+ in all\)"):
        build_model("deeplabv3plus-resnet18", num_classes=21, backbone_weights=str(resnet34_file))


class NotATensor:
    pass


def test_unreadable_backbone_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no file"):
        build_model("deeplabv3plus-resnet18", num_classes=21, backbone_weights=str(tmp_path / "missing.pth"))
    code = tmp_path / "code.pth"
    torch.save({"conv1.weight": NotATensor()}, code)  # needs full unpickling: refused
    with pytest.raises(ConfigError, match="weights_only"):
        build_model("deeplabv3plus-resnet18", num_classes=21, backbone_weights=str(code))
    odd = tmp_path / "odd.pth"
    torch.save({"conv1.weight": [1, 2]}, odd)
    with pytest.raises(ConfigError, match="does not hold a state dict"):
        build_model("deeplabv3plus-resnet18", num_classes=21, backbone_weights=str(odd))


@pytest.mark.parametrize("options,match", [({"output_stride": 32}, "output_stride"),
                                           ({"aspp_dropout_on_features": "yes"}, "aspp_dropout_on_features")])
def test_bad_options_are_config_errors(options, match):
    with pytest.raises(ConfigError, match=match):
        build_model("deeplabv3plus-resnet18", num_classes=21, **options)
    with pytest.raises(ConfigError, match="width"):
        build_model("deeplabv3plus-tiny", num_classes=11, width=0)
