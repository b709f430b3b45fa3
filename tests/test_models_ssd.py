"""SSD priors (ssd.pytorch's geometry), the SSD300 / ssd-tiny detectors and their OFD positions."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fairdistill.errors import ConfigError
from fairdistill.models import MODELS
from fairdistill.models.base import count_parameters
from fairdistill.models.mobilenetv2 import mobilenetv2
from fairdistill.models.priors import SSD300_VOC, PriorConfig, prior_boxes
from fairdistill.models.resnet_imagenet import resnet18
from fairdistill.models.ssd import TINY_PRIORS, ssd300, ssd_tiny
from fairdistill.ops import multibox

torch.set_num_threads(1)

SSD300_SIZES = [75, 38, 19, 10, 5, 3, 1]


# ---- priors ------------------------------------------------------------------------------------

def test_ssd300_prior_count_and_range():
    p = prior_boxes(SSD300_VOC)
    assert p.shape == (8732, 4) and p.dtype == torch.float32
    assert SSD300_VOC.num_priors() == 8732 and SSD300_VOC.boxes_per_location() == [4, 6, 6, 6, 4, 4]
    assert (p >= 0).all() and (p <= 1).all()


def test_first_priors_of_each_map_by_hand():
    p = prior_boxes(SSD300_VOC).double()
    c = 0.5 / 37.5  # centre of cell (0, 0) of map 1: (j + 0.5) / (300 / 8)
    r2 = math.sqrt(2)
    want = [[c, c, 0.1, 0.1], [c, c, math.sqrt(0.1 * 0.2), math.sqrt(0.1 * 0.2)],
            [c, c, 0.1 * r2, 0.1 / r2], [c, c, 0.1 / r2, 0.1 * r2],
            [1.5 / 37.5, c, 0.1, 0.1]]  # next column: only cx moves
    assert torch.allclose(p[:5], torch.tensor(want, dtype=torch.float64), atol=1e-7)
    assert torch.allclose(p[38 * 4], torch.tensor([c, 1.5 / 37.5, 0.1, 0.1], dtype=torch.float64), atol=1e-7)
    assert p[37 * 4, 0].item() == pytest.approx(1.0)  # last column: 37.5 / 37.5
    # map 2 starts after 38 * 38 * 4 = 5776 priors: s = 60/300, s' = sqrt(0.2 * 111/300), ratios 2 and 3
    c2, s, r3 = 0.5 / 18.75, 0.2, math.sqrt(3)
    want2 = [[c2, c2, s, s], [c2, c2, math.sqrt(s * 0.37), math.sqrt(s * 0.37)], [c2, c2, s * r2, s / r2],
             [c2, c2, s / r2, s * r2], [c2, c2, s * r3, s / r3], [c2, c2, s / r3, s * r3]]
    assert torch.allclose(p[5776:5782], torch.tensor(want2, dtype=torch.float64), atol=1e-7)
    # the last (1 x 1) map: s = 0.88, the ratio-2 pair clipped to 1 on its long side
    assert torch.allclose(p[-2:], torch.tensor([[0.5, 0.5, 1.0, 0.88 / r2], [0.5, 0.5, 0.88 / r2, 1.0]],
                                               dtype=torch.float64), atol=1e-7)


def test_prior_config_is_generic_and_checked():
    assert prior_boxes(TINY_PRIORS).shape == (336, 4)
    unclipped = PriorConfig(10, (1,), (10,), (8,), (20,), ((4,),), clip=False)
    assert prior_boxes(unclipped)[2].tolist() == pytest.approx([0.5, 0.5, 1.6, 0.4])
    with pytest.raises(ConfigError, match="steps"):
        PriorConfig(300, (38, 19), (8,), (30, 60), (60, 111), ((2,), (2,)))
    with pytest.raises(ConfigError, match="min_size"):
        PriorConfig(300, (38,), (8,), (60,), (30,), ((2,),))


# ---- the detectors -----------------------------------------------------------------------------

def spatial(model: nn.Module, size: int) -> list[int]:
    model.eval()  # one image: the 1x1 map's BN cannot use batch statistics
    with torch.no_grad():
        return [s.shape[-1] for s in model.forward_features(torch.zeros(1, 3, size, size, device="meta")).stages]


@pytest.mark.parametrize("backbone, channels, params", [
    ("resnet50", [256, 512, 1024, 2048, 512, 256, 256], 31_663_918),
    ("resnet18", [64, 128, 256, 512, 512, 256, 256], 15_483_182),
    ("mobilenetv2", [144, 192, 576, 320, 512, 256, 256], 6_299_630),
])
def test_ssd300_positions_pair_across_backbones(backbone, channels, params):
    with torch.device("meta"):
        model = ssd300(num_classes=20, backbone=backbone)
    assert count_parameters(model) == params  # the docstring's figures
    assert spatial(model, 300) == SSD300_SIZES  # equal sizes: OFD's 1x1 connectors pair them
    assert model.stage_channels == channels
    bns = model.stage_bns()
    assert len(bns) == 7 and all(isinstance(b, nn.BatchNorm2d) for b in bns)
    assert [b.num_features for b in bns] == channels
    with torch.device("meta"):
        plain = ssd300(num_classes=20, backbone=backbone, extras_bn=False)
    assert plain.stage_bns()[4:] == [None, None, None] and all(b is not None for b in plain.stage_bns()[:4])
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.extras.modules())
    assert all(m.bias is not None for m in plain.extras.modules() if isinstance(m, nn.Conv2d))


def test_ssd300_resnet18_outputs_and_features():
    torch.manual_seed(0)
    model = ssd300(num_classes=20, backbone="resnet18").eval()
    x = torch.randn(1, 3, 300, 300)
    with torch.no_grad():
        loc, conf = model(x)
        feats = model.forward_features(x)
    assert loc.shape == (1, 8732, 4) and conf.shape == (1, 8732, 21)
    assert torch.equal(feats.logits[0], loc) and torch.equal(feats.logits[1], conf)
    assert [s.shape[-1] for s in feats.stages] == SSD300_SIZES
    assert [s.shape[1] for s in feats.stages] == model.stage_channels
    assert all((s < 0).any() for s in feats.stages)  # pre-ReLU
    assert feats.embedding.shape == (1, 256, 1, 1) and (feats.embedding >= 0).all()
    assert torch.equal(feats.embedding, torch.relu(feats.stages[-1]))
    assert [s.shape[-1] for s in feats.extra["sources"]] == [38, 19, 10, 5, 3, 1]
    assert model.priors.shape == (8732, 4) and "priors" not in model.state_dict()
    with pytest.raises(ConfigError, match="300x300"):
        model(torch.zeros(1, 3, 256, 256))
    with pytest.raises(ConfigError, match="64x64"):
        ssd_tiny(10)(torch.zeros(1, 3, 300, 300))


def tiny_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 3, 64, 64, generator=g)
    targets = [{"boxes": torch.tensor([[0.1, 0.1, 0.4, 0.5], [0.5, 0.2, 0.9, 0.7]]), "labels": torch.tensor([3, 7])},
               {"boxes": torch.tensor([[0.3, 0.3, 0.6, 0.7]]), "labels": torch.tensor([1])}]
    return x, targets


def test_ssd_tiny_positions_bns_and_order():
    torch.manual_seed(0)
    model = ssd_tiny(num_classes=10, width=8)
    for m in model.modules():  # non-trivial BN affine parameters and statistics
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    model.train()
    x, _ = tiny_batch()
    captured = {}
    hooks = [bn.register_forward_hook(lambda m, i, o, k=k: captured.__setitem__(k, o.clone()))
             for k, bn in enumerate(model.stage_bns())]
    feats = model.forward_features(x)
    for h in hooks:
        h.remove()
    assert [s.shape[-1] for s in feats.stages] == [32, 16, 8, 4, 2]
    assert model.stage_channels == [8, 16, 32, 32, 32]
    for k, s in enumerate(feats.stages):  # each position is exactly its BN's output (before ReLU)
        assert torch.equal(captured[k], s)
    loc, conf = feats.logits
    assert loc.shape == (2, 336, 4) and conf.shape == (2, 336, 11)
    # prior order = (map, row, column, box): prior 4 * (8 * 1 + 2) + 3 is head-0 output at (1, 2), box 3
    raw = model.conf[0](feats.extra["sources"][0])  # (B, 4 * 11, 8, 8)
    assert torch.allclose(conf[:, 4 * 10 + 3], raw[:, 3 * 11:4 * 11, 1, 2])
    first_map2 = 8 * 8 * 4
    assert torch.allclose(loc[:, first_map2 + 4 * 5 + 1], model.loc[1](feats.extra["sources"][1])[:, 4:8, 1, 1])
    assert model.priors[4 * 10 + 3].tolist() == pytest.approx([2.5 / 8, 1.5 / 8, 0.2 / math.sqrt(2), 0.2 * math.sqrt(2)])


def test_features_do_not_change_outputs():
    torch.manual_seed(1)
    model = ssd_tiny(num_classes=4, width=4).train()
    x, _ = tiny_batch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    plain = model(x)
    feats = model.forward_features(x)
    assert torch.equal(plain[0], feats.logits[0]) and torch.equal(plain[1], feats.logits[1])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_ssd_tiny_sizes_and_options():
    assert count_parameters(ssd_tiny(10, width=16)) == 266_116  # the docstring's figures
    assert count_parameters(ssd_tiny(10, width=6)) == 62_226
    with pytest.raises(ConfigError, match="width"):
        ssd_tiny(10, width=0)
    with pytest.raises(ConfigError, match="num_classes"):
        ssd_tiny(0)
    with pytest.raises(ConfigError, match="backbone"):
        ssd300(backbone="vgg16")
    assert "ssd300" in MODELS and "ssd-tiny" in MODELS


def test_loss_and_detect_methods_and_a_few_steps_learn():
    torch.manual_seed(2)
    model = ssd_tiny(num_classes=10, width=4)
    x, targets = tiny_batch()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        out = model(x)
        loss_l, loss_c = model.loss(out, targets)
        want = multibox.multibox_loss(*out, model.priors, targets)
        assert torch.allclose(loss_l, want[0]) and torch.allclose(loss_c, want[1])
        opt.zero_grad()
        (loss_l + loss_c).backward()
        opt.step()
        losses.append((loss_l + loss_c).item())
    assert losses[-1] < 0.5 * losses[0]
    model.eval()
    with torch.no_grad():
        out = model(x)
    dets = model.detect(out, top_k=5)
    assert len(dets) == 2 and all(len(d["scores"]) <= 5 for d in dets)
    ref = multibox.detect(*out, model.priors, top_k=5)
    assert all(torch.equal(a["labels"], b["labels"]) for a, b in zip(dets, ref))


# ---- ImageNet weights --------------------------------------------------------------------------

def test_backbone_weights_load_torchvision_files(tmp_path):
    torch.manual_seed(3)
    net = resnet18(num_classes=1000)  # torchvision names, with its fc
    path = tmp_path / "resnet18.pth"
    torch.save(net.state_dict(), path)
    model = ssd300(num_classes=20, backbone="resnet18", backbone_weights=str(path))
    own = model.backbone.body.state_dict()
    assert all(torch.equal(own[k], v) for k, v in net.state_dict().items() if not k.startswith("fc."))
    wrong = tmp_path / "other.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 3, 3), "layer9.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ConfigError, match="other.pth") as err, torch.device("meta"):
        ssd300(num_classes=20, backbone="resnet18", backbone_weights=str(wrong))
    for part in ("missing keys", "unexpected keys: layer9.weight", "conv1.weight (64, 3, 3, 3)"):
        assert part in str(err.value)
    with pytest.raises(ConfigError, match="missing.pth"), torch.device("meta"):
        ssd300(num_classes=20, backbone="resnet18", backbone_weights=str(tmp_path / "missing.pth"))


def test_mobilenetv2_weights_load(tmp_path):
    torch.manual_seed(4)
    net = mobilenetv2(num_classes=1000)
    path = tmp_path / "mobilenet_v2.pth"
    torch.save(net.state_dict(), path)
    model = ssd300(num_classes=20, backbone="mobilenetv2", backbone_weights=str(path))
    own = model.backbone.body.state_dict()
    for k, v in net.state_dict().items():
        if k in own:
            assert torch.equal(own[k], v)
    assert not any(k.startswith(("features.18", "classifier")) for k in own)
