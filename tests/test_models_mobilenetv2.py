"""MobileNetV2: torchvision names and size, the paper's function, OFD positions, output-stride rule."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_models_imagenet import bn, bn_entries, randomize_bn
from torch import nn

from fairdistill.errors import ConfigError
from fairdistill.models import build_model, count_parameters
from fairdistill.models.mobilenetv2 import MobileNetV2, MobileNetV2Backbone

torch.set_num_threads(1)

# Sandler et al. Table 2: expansion t, channels c, repeats n, first stride s.
TABLE = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def block_list() -> list[tuple[int, int, int, int]]:
    """(input channels, output channels, expansion, stride) of features[1..17]."""
    out, inp = [], 32
    for t, c, n, s in TABLE:
        for i in range(n):
            out.append((inp, c, t, s if i == 0 else 1))
            inp = c
    return out


def torchvision_mobilenetv2_table(classes: int = 1000) -> dict:
    """State-dict names and shapes of torchvision's mobilenet_v2, written from its naming rules."""
    t = {"features.0.0.weight": (32, 3, 3, 3), **bn_entries("features.0.1", 32)}
    for k, (inp, out, e, _) in enumerate(block_list(), start=1):
        p, hid, j = f"features.{k}.conv", inp * e, 0
        if e != 1:
            t[f"{p}.0.0.weight"] = (hid, inp, 1, 1)
            t.update(bn_entries(f"{p}.0.1", hid))
            j = 1
        t[f"{p}.{j}.0.weight"] = (hid, 1, 3, 3)
        t.update(bn_entries(f"{p}.{j}.1", hid))
        t[f"{p}.{j + 1}.weight"] = (out, hid, 1, 1)
        t.update(bn_entries(f"{p}.{j + 2}", out))
    t["features.18.0.weight"] = (1280, 320, 1, 1)
    t.update(bn_entries("features.18.1", 1280))
    t["classifier.1.weight"], t["classifier.1.bias"] = (classes, 1280), (classes,)
    return t


def shapes(model: nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def conv(x, m: nn.Conv2d):
    pad = (m.kernel_size[0] // 2) * m.dilation[0]  # "same" padding, from the kernel and dilation
    return F.conv2d(x, m.weight, None, m.stride, pad, m.dilation, m.groups)


def reference_features(features: nn.Sequential, x: torch.Tensor):
    """The paper's network from the weights alone (eval BN): each block is its conv-BN pairs with
    ReLU6 between them and none after the last; a shortcut wherever the shape is kept."""
    x = F.relu6(bn(conv(x, features[0][0]), features[0][1]))
    expansions, low = {}, None
    for k in range(1, 18):
        if k == 4:
            low = x
        mods = [m for m in features[k].modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
        h = x
        for i, (c, b) in enumerate(zip(mods[0::2], mods[1::2])):
            h = bn(conv(h, c), b)
            if i == 0 and c.kernel_size == (1, 1) and len(mods) == 6:
                expansions[k] = h
            if i < len(mods) // 2 - 1:
                h = F.relu6(h)
        x = x + h if h.shape == x.shape else h
    return x, expansions, low


def test_classifier_names_and_count_are_torchvisions():
    with torch.device("meta"):
        model = MobileNetV2(num_classes=1000)
    assert shapes(model) == torchvision_mobilenetv2_table()
    assert count_parameters(model) == 3_504_872  # torchvision's published figure


def test_torchvision_layout_state_dict_loads_strictly():
    table = torchvision_mobilenetv2_table(classes=5)
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=g) if s else torch.tensor(2) for k, s in table.items()}
    model = build_model("mobilenetv2", num_classes=5)
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.features[14].conv[0][0].weight, state["features.14.conv.0.0.weight"])


def test_classifier_computes_the_papers_function_and_exact_positions():
    torch.manual_seed(0)
    model = build_model("mobilenetv2", num_classes=7)
    randomize_bn(model)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    y, expansions, _ = reference_features(model.features, x)
    fmap = F.relu6(bn(conv(y, model.features[18][0]), model.features[18][1]))
    pooled = fmap.mean(dim=(2, 3))
    logits = F.linear(pooled, model.classifier[1].weight, model.classifier[1].bias)
    feats = model.forward_features(x)
    torch.testing.assert_close(model(x), logits)
    torch.testing.assert_close(feats.logits, logits)
    torch.testing.assert_close(feats.embedding, pooled)
    want = [expansions[4], expansions[7], expansions[14], y]
    assert model.stage_channels == [144, 192, 576, 320] and model.stage_strides == [4, 8, 16, 32]
    assert [tuple(s.shape) for s in feats.stages] == [(2, 144, 16, 16), (2, 192, 8, 8), (2, 576, 4, 4), (2, 320, 2, 2)]
    for k, (got, ref) in enumerate(zip(feats.stages, want)):
        torch.testing.assert_close(got, ref)
        assert (got < 0).any()
        torch.testing.assert_close(feats.extra["block"][k], F.relu6(got) if k < 3 else got)
    assert model.stage_bns() == [model.features[4].conv[0][1], model.features[7].conv[0][1],
                                 model.features[14].conv[0][1], model.features[17].conv[3]]
    fmap_model = build_model("mobilenetv2", num_classes=7, embedding="map")
    fmap_model.load_state_dict(model.state_dict())
    torch.testing.assert_close(fmap_model.eval().forward_features(x).embedding, fmap)


def test_stage_bns_outputs_are_the_positions():
    model = build_model("mobilenetv2", num_classes=3)
    randomize_bn(model, seed=3)
    model.eval()
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, a, o, k=k: seen.__setitem__(k, o.clone()))
             for k, m in enumerate(model.stage_bns())]
    feats = model.forward_features(torch.randn(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    for k, stage in enumerate(feats.stages):
        torch.testing.assert_close(stage, seen[k])


def dw_layout(features: nn.Sequential) -> list[tuple[int, int]]:
    """(stride, dilation) of the depthwise conv of features[1..17]."""
    out = []
    for k in range(1, 18):
        dw = [m for m in features[k].modules() if isinstance(m, nn.Conv2d) and m.groups > 1][0]
        out.append((dw.stride[0], dw.dilation[0]))
    return out


@pytest.mark.parametrize("output_stride", [16, 8])
def test_backbone_output_stride_rule(output_stride):
    # dense.md §1.1 / the official rule, block by block: once the target stride is reached,
    # groups run at stride 1 with the dilation accumulated before them.
    nominal = [s for _, _, _, s in block_list()]
    groups = [0, 1, 1, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 5, 5, 5, 6]
    if output_stride == 16:  # the 64-ch group reaches 16; 96 and 160 at dilation 1, 320 at 2
        dil_of_group = {4: 1, 5: 1, 6: 2}
    else:  # the 32-ch group reaches 8; 64 at 1, 96 and 160 at 2, 320 at 4
        dil_of_group = {3: 1, 4: 2, 5: 2, 6: 4}
    expected = [(1, dil_of_group[g]) if g in dil_of_group else (nominal[i], 1) for i, g in enumerate(groups)]
    backbone = MobileNetV2Backbone(output_stride)
    assert dw_layout(backbone.features) == expected
    assert len(backbone.features) == 18  # no 1280 conv in the segmentation backbone
    assert dw_layout(MobileNetV2(10).features) == [(s, 1) for s in nominal]


def test_dilated_backbone_computes_the_papers_function():
    torch.manual_seed(1)
    backbone = MobileNetV2Backbone(16)
    randomize_bn(backbone)
    backbone.eval()
    x = torch.randn(1, 3, 65, 65)
    y, expansions, low = reference_features(backbone.features, x)
    out = backbone.forward_stages(x, collect=True)
    torch.testing.assert_close(out.high, y)
    torch.testing.assert_close(out.low, low)
    for got, ref in zip(out.stages, [expansions[4], expansions[7], expansions[14], y]):
        torch.testing.assert_close(got, ref)
    assert [s.shape[-1] for s in out.stages] == [17, 9, 5, 5]  # strides 4, 8, 16, 16 at 65 px
    assert backbone.stage_strides == [4, 8, 16, 16]
    assert MobileNetV2Backbone(8).stage_strides == [4, 8, 8, 8]


def test_backbone_init_is_the_official_kaiming_fan_in():
    backbone = MobileNetV2Backbone(16)
    w = backbone.features[14].conv[0][0].weight  # 1x1, fan_in 96
    assert abs(w.std().item() / (2.0 / 96) ** 0.5 - 1) < 0.05
    assert torch.all(backbone.features[5].conv[1][1].weight == 1)


def test_bad_embedding_is_a_config_error():
    with pytest.raises(ConfigError, match="embedding"):
        build_model("mobilenetv2", num_classes=2, embedding="vector")
