"""SSD detectors (Liu et al. 2016) with OFD's distillation points: SSD300 and ``ssd-tiny``.

SSD300 has ssd.pytorch's VOC geometry (``models.priors.SSD300_VOC``: maps 38/19/10/5/3/1, 8732
priors) on an ImageNet backbone of the zoo (reference/dense.md §2-3):

* ResNet-18/34/50/101/152 (``models.resnet_imagenet``, OFD's pre-ReLU layer ends): a 300x300
  input gives layer1..layer4 at 75/38/19/10; the heads read ReLU(layer2), ReLU(layer3), ReLU(layer4).
* MobileNetV2 (``models.mobilenetv2``, output stride 32): positions at 75/38/19/10 (the expansion
  BNs of features 4, 7, 14 and the 320-ch output); the heads read ReLU6 of the 192-ch (38) and
  576-ch (19) expansions and the linear 320-ch output (10).

Three extra layers follow the backbone, with ssd.pytorch's conv9-conv11 geometry: 10 -> 5 (3x3
stride 2, pad 1), 5 -> 3 and 3 -> 1 (3x3, pad 0), each a 1x1 reduce and the 3x3 conv. With
``extras_bn`` every conv is followed by a BN before its ReLU, so the OFD margin of an extra layer
comes from Eq. 4; without, the convs have biases and ``stage_bns`` is None there (the margin is
then estimated from training batches, OFD supplement A). No L2Norm layer: the backbone maps are
BN outputs. Heads: per source map a 3x3 conv to A*4 offsets and one to A*(C+1) scores.

``ssd-tiny`` is the embedded-data detector (dense.md §5): a 64x64 input, three stride-2
conv-BN-ReLU stages (32, 16, 8), two extra layers (4, 2), heads on the 8/4/2 maps, 336 priors.

Every model's OFD positions (``Features.stages``): each backbone stage end, then each extra
layer's pre-ReLU output (its second BN output). ``embedding``: the deepest source map (the ReLU
of the last extra layer: (B, 256, 1, 1) for SSD300). ``extra["sources"]``: the maps the heads read.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..ops import multibox
from .base import MODELS, FeatureModel, Features, kaiming_init
from .priors import SSD300_VOC, PriorConfig, prior_boxes
from . import resnet_imagenet

EXTRAS_SSD300 = ((256, 512, 2, 1), (128, 256, 1, 0), (128, 256, 1, 0))
"""(reduce channels, output channels, stride, padding) of SSD300's extra layers."""

TINY_PRIORS = PriorConfig(
    image_size=64, feature_maps=(8, 4, 2), steps=(8, 16, 32),
    min_sizes=(12.8, 19.2, 28.8), max_sizes=(19.2, 28.8, 38.4), aspect_ratios=((2,), (2,), (2,)),
)
"""ssd-tiny's priors: scales 0.2/0.3/0.45/0.6 of the 64-px canvas, ratios 2 and 1/2 (336 boxes)."""

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
BACKBONES = RESNETS + ("mobilenetv2",)


class ExtraLayer(nn.Module):
    """1x1 reduce conv -> [BN] -> ReLU -> 3x3 conv (stride, padding) -> [BN]; output pre-ReLU."""

    def __init__(self, inp: int, mid: int, out: int, stride: int, padding: int, bn: bool = True):
        super().__init__()
        self.reduce = nn.Conv2d(inp, mid, 1, bias=not bn)
        self.bn1 = nn.BatchNorm2d(mid) if bn else nn.Identity()
        self.conv = nn.Conv2d(mid, out, 3, stride, padding, bias=not bn)
        self.bn2 = nn.BatchNorm2d(out) if bn else nn.Identity()
        self.out_channels = out

    @property
    def last_bn(self) -> nn.BatchNorm2d | None:
        return self.bn2 if isinstance(self.bn2, nn.BatchNorm2d) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv(F.relu(self.bn1(self.reduce(x)))))


class ResNetTrunk(nn.Module):
    """An ImageNet ResNet without ``fc`` (parameter names torchvision's, under ``body.``)."""

    IGNORED_KEYS = ("fc.",)

    def __init__(self, name: str):
        super().__init__()
        self.body = getattr(resnet_imagenet, name)(num_classes=1)
        self.body.fc = None
        self.stage_channels = list(self.body.stage_channels)
        self.source_channels = self.stage_channels[1:]

    def stage_bns(self) -> list[nn.Module | None]:
        return self.body.stage_bns()

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        b = self.body
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        stages = []
        for layer in b.layers():
            x = layer(x)  # the next block applies relu(x) out of place: x stays pre-ReLU
            stages.append(x)
        return stages, [F.relu(s) for s in stages[1:]]


class MobileNetV2Trunk(nn.Module):
    """MobileNetV2 ``features[0..17]`` at output stride 32 (torchvision names, under ``body.``)."""

    def __init__(self):
        super().__init__()
        from .mobilenetv2 import MobileNetV2Backbone

        self.body = MobileNetV2Backbone(output_stride=32)
        self.IGNORED_KEYS = self.body.IGNORED_KEYS
        self.stage_channels = list(self.body.stage_channels)
        self.source_channels = self.stage_channels[1:]

    def stage_bns(self) -> list[nn.Module | None]:
        return list(self.body.stage_bns())

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        out = self.body.forward_stages(x, collect=True)
        return out.stages, out.block[1:]  # ReLU6 of positions 2, 3 and the linear 320-ch output


class TinyTrunk(nn.Module):
    """Three stages of [3x3 stride-2 conv-BN-ReLU, 3x3 conv-BN-ReLU, 3x3 conv-BN] at widths w, 2w,
    4w; each stage ends pre-ReLU (its last BN). A 64x64 input gives 32, 16 and 8; the heads read ReLU(stage 3)."""

    IGNORED_KEYS: tuple[str, ...] = ()

    def __init__(self, width: int):
        super().__init__()
        widths = [width, 2 * width, 4 * width]
        stages, inp = [], 3
        for w in widths:
            stages.append(nn.Sequential(
                nn.Conv2d(inp, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
                nn.Conv2d(w, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
                nn.Conv2d(w, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w),
            ))
            inp = w
        self.stages = nn.ModuleList(stages)
        self.stage_channels = widths
        self.source_channels = widths[-1:]

    def stage_bns(self) -> list[nn.Module | None]:
        return [s[-1] for s in self.stages]

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        stages = []
        for stage in self.stages:
            x = stage(x if not stages else F.relu(x))
            stages.append(x)
        return stages, [F.relu(stages[-1])]


class SSD(FeatureModel):
    """Single-shot detector: a backbone trunk, extra layers and 3x3 loc/conf heads.

    ``forward(x)`` -> (loc (B, P, 4) encoded offsets, conf (B, P, C + 1) raw scores), P the
    number of priors (buffer ``priors``, (P, 4) normalised cx, cy, w, h, not saved in the state
    dict) and class 0 background. ``forward_features`` returns the same two tensors as
    ``logits``. Inputs must have the priors' ``image_size`` (ConfigError otherwise).
    Init: extra layers kaiming (fan_out, ReLU) with BN 1/0; heads Xavier-uniform, zero bias
    (ssd.pytorch's ``weights_init``); the trunk keeps its own init.
    """

    def __init__(self, trunk: nn.Module, extras: tuple[tuple[int, int, int, int], ...], priors: PriorConfig,
                 num_classes: int, extras_bn: bool = True, name: str = "ssd"):
        super().__init__()
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ConfigError(f"{name}: num_classes must be the number of foreground classes (>= 1), got {num_classes!r}.")
        self.name, self.num_classes, self.prior_config = name, num_classes, priors
        self.backbone = trunk
        layers, inp = [], trunk.source_channels[-1]
        for mid, out, stride, pad in extras:
            layers.append(ExtraLayer(inp, mid, out, stride, pad, bn=extras_bn))
            inp = out
        self.extras = nn.ModuleList(layers)
        kaiming_init(self.extras)
        sources = list(trunk.source_channels) + [e.out_channels for e in layers]
        if len(sources) != len(priors.feature_maps):
            raise ConfigError(f"{name}: {len(sources)} source maps but the prior config has {len(priors.feature_maps)}.")
        boxes = priors.boxes_per_location()
        self.loc = nn.ModuleList(nn.Conv2d(c, a * 4, 3, padding=1) for c, a in zip(sources, boxes))
        self.conf = nn.ModuleList(nn.Conv2d(c, a * (num_classes + 1), 3, padding=1) for c, a in zip(sources, boxes))
        for head in (*self.loc, *self.conf):
            nn.init.xavier_uniform_(head.weight)
            nn.init.zeros_(head.bias)
        self.register_buffer("priors", prior_boxes(priors), persistent=False)
        self.stage_channels = list(trunk.stage_channels) + [e.out_channels for e in layers]
        self.source_channels = sources

    @property
    def image_size(self) -> int:
        """The side of the square inputs the detector takes (its priors' geometry)."""
        return self.prior_config.image_size

    def stage_bns(self) -> list[nn.Module | None]:
        return list(self.backbone.stage_bns()) + [e.last_bn for e in self.extras]

    def forward_features(self, x: torch.Tensor) -> Features:
        size = self.prior_config.image_size
        if tuple(x.shape[-2:]) != (size, size):
            raise ConfigError(f"{self.name}: expects {size}x{size} inputs, got {tuple(x.shape[-2:])}; "
                              f"resize the images to {size}x{size}.")
        stages, sources = self.backbone(x)
        stages, sources = list(stages), list(sources)
        y = sources[-1]
        for extra in self.extras:
            pre = extra(y)
            stages.append(pre)
            y = F.relu(pre)  # out of place: ``pre`` is an OFD position
            sources.append(y)
        sizes = [tuple(s.shape[-2:]) for s in sources]
        if sizes != [(f, f) for f in self.prior_config.feature_maps]:
            raise ConfigError(f"{self.name}: the source maps are {sizes} but the prior config expects sides "
                              f"{list(self.prior_config.feature_maps)}; fix the prior config or the extra layers.")
        b, c1 = x.shape[0], self.num_classes + 1
        loc = torch.cat([h(s).permute(0, 2, 3, 1).reshape(b, -1) for h, s in zip(self.loc, sources)], 1)
        conf = torch.cat([h(s).permute(0, 2, 3, 1).reshape(b, -1) for h, s in zip(self.conf, sources)], 1)
        outputs = (loc.view(b, -1, 4), conf.view(b, -1, c1))
        return Features(logits=outputs, stages=stages, embedding=sources[-1], extra={"sources": sources})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_features(x).logits

    def detect(self, outputs: tuple[torch.Tensor, torch.Tensor], **options) -> list[dict[str, torch.Tensor]]:
        """``ops.multibox.detect`` of ``forward``'s outputs with this model's priors (same options)."""
        loc, conf = outputs
        return multibox.detect(loc, conf, self.priors, **options)

    def loss(self, outputs: tuple[torch.Tensor, torch.Tensor], targets, **options) -> tuple[torch.Tensor, torch.Tensor]:
        """``ops.multibox.multibox_loss`` (localisation, confidence) with this model's priors."""
        loc, conf = outputs
        return multibox.multibox_loss(loc, conf, self.priors, targets, **options)


def _trunk(backbone: str, backbone_weights: str | None) -> nn.Module:
    if backbone in RESNETS:
        trunk = ResNetTrunk(backbone)
    elif backbone == "mobilenetv2":
        trunk = MobileNetV2Trunk()
    else:
        raise ConfigError(f"model option backbone: unknown value {backbone!r}; expected one of {', '.join(BACKBONES)}.")
    if backbone_weights is not None:
        from .weights import load_backbone_weights

        load_backbone_weights(trunk.body, backbone_weights, ignore=trunk.IGNORED_KEYS)
    return trunk


@MODELS.register("ssd300")
def ssd300(num_classes: int = 20, backbone: str = "resnet50", extras_bn: bool = True,
           backbone_weights: str | None = None) -> SSD:
    """SSD300 (VOC geometry, 8732 priors) for ``num_classes`` foreground classes.

    backbone:         ``resnet50`` (the teacher), ``resnet18`` (a student), ``resnet34``,
                      ``resnet101``, ``resnet152`` or ``mobilenetv2`` (a student).
    extras_bn:        BN before every ReLU of the extra layers (their OFD margins from Eq. 4);
                      False gives biased convs without BN (margins estimated from batches).
    backbone_weights: a local torchvision-format ImageNet state dict for the backbone (read with
                      ``torch.load(weights_only=True)``; ``fc.`` / ``classifier.`` keys ignored).
    Positions: 7 (4 backbone + 3 extra), at 75/38/19/10/5/3/1 for every backbone. Parameters
    with 20 classes: 31.66M (ResNet-50), 15.48M (ResNet-18), 6.30M (MobileNetV2). The backbone
    expects what its ImageNet weights were trained on (RGB normalised by the ImageNet mean/std).
    """
    return SSD(_trunk(backbone, backbone_weights), EXTRAS_SSD300, SSD300_VOC, num_classes, extras_bn, "ssd300")


@MODELS.register("ssd-tiny")
def ssd_tiny(num_classes: int = 10, width: int = 16, extras_bn: bool = True) -> SSD:
    """The embedded-data SSD for 64x64 canvases (``TINY_PRIORS``, 336 priors).

    width: channels of the first stage (stages w, 2w, 4w; extra layers reduce to 2w, output 4w).
           With 10 classes: width 16 has 266,116 parameters, width 8 92,956 (2.9x fewer) and
           width 6 62,226 (4.3x fewer); the heads grow only linearly in the width.
    Positions: 5 (3 stages at 32/16/8 + 2 extra layers at 4/2), all pre-ReLU BN outputs.
    """
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ConfigError(f"model option width: expected a positive integer, got {width!r}.")
    extras = ((2 * width, 4 * width, 2, 1), (2 * width, 4 * width, 2, 1))
    return SSD(TinyTrunk(width), extras, TINY_PRIORS, num_classes, extras_bn, "ssd-tiny")
