"""DeepLabV3+ segmentation models with OFD's six distillation positions (reference/dense.md §1).

``forward(x)`` returns logits (B, num_classes, H, W) at the input's resolution (bilinear,
align_corners=True). ``forward_features(x)`` returns ``Features`` with

- ``logits``: the same tensor as ``forward`` (but see ``aspp_dropout_on_features``);
- ``stages``: the six pre-ReLU positions of dense.md §1.2, in this order: the four backbone stage
  outputs (layer1..layer4; MobileNetV2: expansions of features[4], [7], [14] and the 320-ch
  output), the ASPP projection ``aspp.bn1`` output, and the decoder's ``last_conv[5]`` output
  (the 2nd 3x3 conv + BN, before its ReLU, Dropout(0.1) and the classifier);
- ``embedding``: ReLU of position 6, the decoder's last 256-ch feature (B, 256, H/4, W/4), before
  Dropout(0.1);
- ``extra["block"]``: the post-activation version of each position (ReLU; ReLU6 for MobileNetV2
  positions 1-3; MobileNetV2 position 4 has no activation and is repeated as is).

``stage_bns()`` gives the six margin BNs (layerK[-1].bn3 / bn2 or the MobileNetV2 BNs,
``aspp.bn1``, ``decoder.last_conv[5]``), ``stage_channels`` and ``stage_strides`` the channels and
strides of the six positions. Parameter names are ``backbone.*`` (torchvision's names inside),
``aspp.*`` and ``decoder.*``, as the official code: the official learning-rate groups are
``backbone.`` (1x) and ``aspp.`` + ``decoder.`` (10x).

Train with at least 2 images per BatchNorm: the image-pooling branch's BN sees one value per
channel and image, so batch 1 in train mode is an error (as in the official code).
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..errors import ConfigError
from .base import MODELS, FeatureModel, Features
from .deeplab_head import ASPP, ASPP_RATES, Decoder, upsample
from .mobilenetv2 import MobileNetV2Backbone
from .weights import load_backbone_weights
from .resnet_dilated import DilatedResNet, check_output_stride, dilated_resnet18, dilated_resnet101
from .resnet_imagenet import BasicBlock

TINY_RATES = (1, 2, 3, 4)


class DeepLabV3Plus(FeatureModel):
    """A backbone (``forward_stages``, ``stage_bns``, ``stage_channels``, ``stage_strides``,
    ``low_channels``, ``out_channels``, ``output_stride``) + ASPP + decoder.

    channels: the ASPP and decoder width (256 officially); low_proj: the decoder's low-level
    projection (48). rates: the four ASPP rates. dropouts: (ASPP, decoder 1st, decoder 2nd),
    officially (0.5, 0.5, 0.1).
    aspp_dropout_on_features: True applies the ASPP Dropout(0.5) on the ``forward_features`` path
    too. False reproduces the official distilled student: its ``extract_feature`` path skips that
    dropout while ``forward`` (baseline training, evaluation) applies it, so ``Features.logits``
    are then computed without it (they differ from ``forward`` only in train mode).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, rates: tuple[int, ...], channels: int = 256,
                 low_proj: int = 48, dropouts: tuple[float, float, float] = (0.5, 0.5, 0.1),
                 aspp_dropout_on_features: bool = True):
        super().__init__()
        self.backbone = backbone
        self.aspp = ASPP(backbone.out_channels, channels, rates, dropouts[0])
        self.decoder = Decoder(backbone.low_channels, num_classes, channels, low_proj, dropouts[1:])
        self.aspp_dropout_on_features = bool(aspp_dropout_on_features)
        self.num_classes = num_classes
        self.stage_channels = list(backbone.stage_channels) + [channels, channels]
        self.stage_strides = list(backbone.stage_strides) + [backbone.output_stride, backbone.stage_strides[0]]

    def stage_bns(self) -> list[nn.Module | None]:
        return list(self.backbone.stage_bns()) + [self.aspp.bn1, self.decoder.last_conv[5]]

    def _run(self, x: torch.Tensor, aspp_dropout: bool, collect: bool) -> Features:
        out = self.backbone.forward_stages(x, collect)
        aspp_pre, aspp_act = self.aspp.project(out.high)
        head_in = self.aspp.dropout(aspp_act) if aspp_dropout else aspp_act
        dec_pre, emb, logits = self.decoder(head_in, out.low)
        logits = upsample(logits, x.shape[-2:])
        extra = {"block": out.block + [aspp_act, emb]} if collect else {}
        return Features(logits=logits, stages=out.stages + [aspp_pre, dec_pre], embedding=emb, extra=extra)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, aspp_dropout=True, collect=False).logits

    def forward_features(self, x: torch.Tensor) -> Features:
        return self._run(x, aspp_dropout=self.aspp_dropout_on_features, collect=True)


def check_bool(value, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"model option {key}: expected true or false, got {value!r}.")
    return value


def official(make_backbone, num_classes: int, output_stride: int, aspp_dropout_on_features: bool,
             backbone_weights: str | None) -> DeepLabV3Plus:
    """An official-size model (256-ch head, rates of ``output_stride``), options checked first."""
    os_ = check_output_stride(output_stride)
    flag = check_bool(aspp_dropout_on_features, "aspp_dropout_on_features")
    backbone = make_backbone(os_)
    if backbone_weights is not None:
        load_backbone_weights(backbone, backbone_weights, backbone.IGNORED_KEYS)
    return DeepLabV3Plus(backbone, num_classes, ASPP_RATES[os_], aspp_dropout_on_features=flag)


@MODELS.register("deeplabv3plus-resnet101")
def deeplabv3plus_resnet101(num_classes: int = 21, output_stride: Literal[16, 8] = 16,
                            aspp_dropout_on_features: bool = True,
                            backbone_weights: str | None = None) -> DeepLabV3Plus:
    """OFD's segmentation teacher: DeepLabV3+ on ResNet-101, layer4 multi-grid (dilations 2/4/8
    at output stride 16); 59.34M parameters with 21 classes. Positions: 256/512/1024/2048/256/256
    channels at strides 4/8/16/16/16/4 (OS 8: 4/8/8/8/8/4).

    output_stride: 16 or 8 (ASPP rates 1/6/12/18 or 1/12/24/36).
    aspp_dropout_on_features: see ``DeepLabV3Plus``.
    backbone_weights: a torchvision ``resnet101`` ImageNet state dict file (``fc`` ignored).
    """
    return official(dilated_resnet101, num_classes, output_stride, aspp_dropout_on_features, backbone_weights)


@MODELS.register("deeplabv3plus-resnet18")
def deeplabv3plus_resnet18(num_classes: int = 21, output_stride: Literal[16, 8] = 16,
                           aspp_dropout_on_features: bool = True,
                           backbone_weights: str | None = None) -> DeepLabV3Plus:
    """OFD's student A: DeepLabV3+ on ResNet-18, layer4 dilation 2 (no multi-grid); 16.61M
    parameters with 21 classes. Positions: 64/128/256/512/256/256 channels, strides as R101.
    Options as ``deeplabv3plus-resnet101`` (weights: a torchvision ``resnet18`` state dict)."""
    return official(dilated_resnet18, num_classes, output_stride, aspp_dropout_on_features, backbone_weights)


@MODELS.register("deeplabv3plus-mobilenetv2")
def deeplabv3plus_mobilenetv2(num_classes: int = 21, output_stride: Literal[16, 8] = 16,
                              aspp_dropout_on_features: bool = True,
                              backbone_weights: str | None = None) -> DeepLabV3Plus:
    """OFD's student B: DeepLabV3+ on MobileNetV2 (width 1.0, ``features[0..17]``, low-level
    feature ``features[0:4]``, 24 ch); 5.82M parameters with 21 classes. Positions:
    144/192/576/320/256/256 channels at strides 4/8/16/16/16/4 (OS 8: 4/8/8/8/8/4).
    Options as ``deeplabv3plus-resnet101`` (weights: a torchvision ``mobilenet_v2`` state dict;
    ``features.18`` and ``classifier`` ignored)."""
    return official(MobileNetV2Backbone, num_classes, output_stride, aspp_dropout_on_features, backbone_weights)


@MODELS.register("deeplabv3plus-tiny")
def deeplabv3plus_tiny(num_classes: int = 11, width: int = 16, dropout: bool = True,
                       aspp_dropout_on_features: bool = True) -> DeepLabV3Plus:
    """A small DeepLabV3+ for 64x64 images (the embedded ``digits-s-seg``), with the same kinds
    of positions as the official models. With w = ``width``:

    - backbone: 3x3/2 conv (w) - BN - ReLU stem, then one ReLU-relocated basic block per layer:
      layer1 w ch, stride 4; layer2 2w, stride 8; layer3 4w, stride 8, dilation 2; layer4 4w,
      stride 8, dilation 4 (output stride 8: an 8x8 map at 64 px);
    - ASPP with 4w channels, rates 1/2/3/4 (the official 6/12/18 over a 33-px map are 0.18/0.36/0.55
      of its side; 2/3/4 are about the same fractions of 8 px), decoder with a w-channel
      low-level projection and two 3x3 convs of 4w;
    - positions: w/2w/4w/4w/4w/4w channels at strides 4/8/8/8/8/4; margin BNs layerK[0].bn2 (with
      shortcut, approximate), aspp.bn1 and decoder.last_conv[5] (exact).

    width: 16 for a teacher, 8 for a student (375,899 / 94,771 parameters with 11 classes).
    dropout: True keeps the official dropouts (0.5 after the ASPP, 0.5 and 0.1 in the decoder);
    False sets all three to 0.
    aspp_dropout_on_features: see ``DeepLabV3Plus``.
    """
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        raise ConfigError(f"model option width: expected a positive integer, got {width!r}.")
    w = width
    backbone = DilatedResNet(BasicBlock, [1, 1, 1, 1], strides=[2, 2, 1, 1], dilations=[1, 1, 2, 4],
                             widths=(w, 2 * w, 4 * w, 4 * w), stem="small")
    rates = (0.5, 0.5, 0.1) if check_bool(dropout, "dropout") else (0.0, 0.0, 0.0)
    return DeepLabV3Plus(backbone, num_classes, TINY_RATES, channels=4 * w, low_proj=w, dropouts=rates,
                         aspp_dropout_on_features=check_bool(aspp_dropout_on_features, "aspp_dropout_on_features"))
