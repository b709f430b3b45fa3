"""Speed defaults resolved per device and model family, by measurement: ``channels_last: auto``.

Memory layout. On the CPU (oneDNN) a channels-last (NHWC) training step is faster than NCHW for
every zoo family measured but the tiny DeepLab; NCHW's max-pool alone is 7.4x slower. Measured
with ``benchmarks/bench_layout.py`` (one plain SGD step, one thread, CPU time, interleaved
rounds, this project's 2-core machine), channels-last / NCHW: MFD CNN 0.86 (32x32, batch 128),
WRN-16-2 0.81, ResNet-20 0.81, PyramidNet-20 0.68 (32x32, batch 64), ResNet-18 0.91,
MobileNetV2 0.78, MobileNet 0.82, ShuffleNetV2 0.87 (112x112, batch 8), SSD-tiny 0.85;
DeepLabV3+-tiny 1.07 (64x64, batch 8): stays NCHW. On CUDA ``auto`` keeps NCHW (fp32 convolutions
gain little from NHWC; with ``amp`` it pays on tensor cores: set ``channels_last: true``).
A run's layout is its student's (the teacher and the terms follow it, and ``eval`` rebuilds the
run in it); students from outside the zoo (import paths, torchvision, timm) keep NCHW under ``auto``.

What the layout changes besides speed: convolutions sum in another order, so the two layouts of a
run differ by float rounding (each is reproducible). The MFD CNN's dropout draws its mask in the
tensor's logical order (``models.cifar_cnn.OrderedDropout``), so both layouts drop the same units.
"""
from __future__ import annotations

import torch
from torch import nn

LAYOUT_FAMILIES = frozenset({
    "cifar_cnn", "wrn", "resnet_cifar", "pyramidnet", "resnet_imagenet", "mobilenetv2", "mobilenet", "shufflenet", "ssd",
})
"""Zoo modules (``fairdistill.models.<family>``) whose models train faster channels-last on the CPU."""
ZOO = "fairdistill.models."


def family_of(model: nn.Module) -> str | None:
    """The zoo family (module of ``fairdistill.models``) that defines ``model``'s class, or None
    for a model from outside the zoo (or adapted by module paths)."""
    module = type(model).__module__
    return module[len(ZOO):] if module.startswith(ZOO) else None


def resolve_channels_last(setting: bool | str, device: torch.device | str, models) -> bool:
    """The layout of a run: ``setting`` true or false as given; ``auto``: channels-last on the
    CPU when every model in ``models`` (None entries skipped: no teacher) belongs to
    :data:`LAYOUT_FAMILIES`, NCHW otherwise (other devices, other models)."""
    if setting != "auto":
        return bool(setting)
    present = [m for m in models if m is not None]
    return torch.device(device).type == "cpu" and bool(present) and \
        all(family_of(m) in LAYOUT_FAMILIES for m in present)
