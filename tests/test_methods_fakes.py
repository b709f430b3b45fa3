"""Tiny feature models and term harness shared by the feature-distillation term tests.

Kept independent of the model zoo: a stack of conv stages, each conv -> (BN) -> pre-ReLU stage
feature -> ReLU (the block output), then global pooling (the embedding) and a linear head.
"""
from __future__ import annotations

import torch
from torch import nn

from fairdistill.methods.base import SetupContext, TermInput
from fairdistill.models.base import FeatureModel, Features


class TinyNet(FeatureModel):
    """Stages of 3x3 convs; stage 0 has stride ``first_stride``, later stages stride 2."""

    def __init__(self, channels=(4, 8), num_classes=3, bn=True, first_stride=1, in_channels=3):
        super().__init__()
        self.stage_channels = list(channels)
        convs, bns = [], []
        cin = in_channels
        for k, c in enumerate(channels):
            convs.append(nn.Conv2d(cin, c, 3, stride=first_stride if k == 0 else 2, padding=1, bias=not bn))
            bns.append(nn.BatchNorm2d(c) if bn else nn.Identity())
            cin = c
        self.convs, self.bns = nn.ModuleList(convs), nn.ModuleList(bns)
        self.has_bn = bn
        self.fc = nn.Linear(cin, num_classes)

    def forward_features(self, x: torch.Tensor) -> Features:
        stages, blocks = [], []
        for conv, bn in zip(self.convs, self.bns):
            pre = bn(conv(x))
            x = torch.relu(pre)
            stages.append(pre)
            blocks.append(x)
        emb = x.mean((2, 3))
        return Features(logits=self.fc(emb), stages=stages, embedding=emb, extra={"block": blocks})

    def stage_bns(self):
        return list(self.bns) if self.has_bn else [None] * len(self.bns)


def randomize_bns(model: nn.Module, seed: int = 0) -> None:
    """Give every BN non-trivial affine parameters and running statistics."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.num_features, generator=gen))
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.5)
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)


def make_ctx(student, teacher, x, terms=None, batches=None) -> SetupContext:
    """A setup context as the trainer builds it: eval-mode dry forward of ``x``."""
    student.eval()
    if teacher is not None:
        teacher.eval()
    with torch.no_grad():
        sf = student.forward_features(x)
        tf = teacher.forward_features(x) if teacher is not None else None
    return SetupContext(
        teacher=teacher, student_features=sf, teacher_features=tf,
        num_classes=3, num_groups=2, device=x.device, train_batches=batches, terms=terms or {},
    )


def make_input(student, teacher, x, y=None, teacher_grad=False) -> TermInput:
    """A training-step input: student with autograd, teacher under no_grad unless asked."""
    y = torch.zeros(x.shape[0], dtype=torch.long) if y is None else y
    sf = student.forward_features(x)
    with torch.set_grad_enabled(teacher_grad):
        tf = teacher.forward_features(x)
    return TermInput(x=x, y=y, g=torch.zeros_like(y), student=sf, teacher=tf)


def grads_of(module: nn.Module) -> list:
    return [p.grad for p in module.parameters()]
