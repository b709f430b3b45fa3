"""Factor Transfer (Kim, Park & Kwak, "Paraphrasing Complex Network", NeurIPS 2018).

Stage 1 (term ``ft-paraphraser``): a paraphraser (conv auto-encoder, rate k) learns to
reconstruct the teacher's last-stage feature. Stage 2 (term ``ft``): a translator maps the
student's last-stage feature to a factor that must match the frozen paraphraser's code:
L_FT = || F_s/||F_s||_2 - F_t/||F_t||_2 ||_1 per sample (FT Eq. 3, p = 1), taken as a mean
over elements as in the official code (``nn.L1Loss``); config weight beta = 500.
"""
from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..registry import Range
from .base import TERMS, SetupContext, Term, TermInput
from .features import Position, match_spatial, stage_features
from .fields import stage_field

__all__ = ["FT", "FTParaphraser", "Paraphraser", "Translator", "factor", "factor_channels", "factor_loss"]

SLOPE = 0.1
"""LeakyReLU negative slope of the official paraphraser and translator."""


def factor(x: torch.Tensor) -> torch.Tensor:
    """The factor as compared: flattened per sample and L2-normalised (official ``utils.FT``)."""
    return F.normalize(x.flatten(1), dim=1)


def factor_loss(student_factor: torch.Tensor, teacher_factor: torch.Tensor) -> torch.Tensor:
    """mean |factor(F_s) - factor(F_t)| over batch and elements (FT Eq. 3, official reduction)."""
    if student_factor.shape != teacher_factor.shape:
        raise ValueError(
            f"factor_loss: student {tuple(student_factor.shape)} and teacher {tuple(teacher_factor.shape)} "
            "differ in shape"
        )
    return (factor(student_factor) - factor(teacher_factor)).abs().mean()


def _conv_block(cin: int, cout: int, transposed: bool = False) -> list[nn.Module]:
    conv = nn.ConvTranspose2d if transposed else nn.Conv2d
    return [conv(cin, cout, kernel_size=3, stride=1, padding=1), nn.LeakyReLU(SLOPE)]


def factor_channels(channels: int, rate: float) -> int:
    """k * C channels of the factor (at least one), as the official ``int(C * k)``."""
    return max(1, int(channels * rate))


class Paraphraser(nn.Module):
    """Encoder 3x3 convs C->C->kC->kC and decoder 3x3 transposed convs kC->kC->C->C, each
    followed by LeakyReLU(0.1), no BN (official ``FeatureProjection.py``)."""

    def __init__(self, channels: int, rate: float = 0.5):
        super().__init__()
        self.factor_channels = factor_channels(channels, rate)
        c, k = channels, self.factor_channels
        self.encoder = nn.Sequential(*_conv_block(c, c), *_conv_block(c, k), *_conv_block(k, k))
        self.decoder = nn.Sequential(
            *_conv_block(k, k, True), *_conv_block(k, c, True), *_conv_block(c, c, True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class Translator(nn.Sequential):
    """3x3 convs C_s->C_s->kC_t->kC_t, each followed by LeakyReLU(0.1) (official FT)."""

    def __init__(self, channels: int, factor_channels: int):
        c, k = channels, factor_channels
        super().__init__(*_conv_block(c, c), *_conv_block(c, k), *_conv_block(k, k))


@TERMS.register("ft-paraphraser")
class FTParaphraser(Term):
    """FT stage 1: mean |P(F_t) - F_t| for the teacher's last-stage feature F_t (official
    ``train_Paraphraser.py`` uses ``nn.L1Loss``). Trains only the paraphraser: run it in a
    stage with CE weight 0 whose trained parameters are this term's.

    Options:
      rate: paraphrase rate k (default 0.5).
      position: "block" (default, the last group output as the official code) or "prerelu".
    """

    def __init__(self, rate: Annotated[float, Range(gt=0)] = 0.5, position: Position = "block"):
        super().__init__()
        self.rate, self.position = rate, position
        self.paraphraser: Paraphraser | None = None
        self.last = 0  # index of the last stage (set up)

    def teacher_feature(self, features) -> torch.Tensor:
        return stage_features(features, self.position, "ft-paraphraser")[-1].detach()

    def setup(self, ctx: SetupContext) -> None:
        self.last = len(stage_features(ctx.teacher_features, self.position, "ft-paraphraser")) - 1
        channels = self.teacher_feature(ctx.teacher_features).shape[1]
        self.paraphraser = Paraphraser(channels, self.rate).to(ctx.device)

    def teacher_fields(self) -> tuple[str, ...]:
        return (stage_field(self.position, self.last),)

    def forward(self, inp: TermInput) -> torch.Tensor:
        t = self.teacher_feature(inp.teacher)
        return (self.paraphraser(t) - t).abs().mean()


@TERMS.register("ft")
class FT(Term):
    """FT stage 2: :func:`factor_loss`(translator(F_s), encoder(F_t)) (unweighted; beta = 500).

    Options:
      paraphraser: name of the ``ft-paraphraser`` term (default: the only one configured).
    The stage position (block/prerelu) is the paraphraser's. The paraphraser is frozen here:
    its code is computed without gradient, and it is not a sub-module of this term (so it is
    not trained with it). Where student and teacher spatial sizes differ, the larger factor is
    adaptive-average-pooled to the smaller.
    """

    def __init__(self, paraphraser: str | None = None):
        super().__init__()
        self.paraphraser_name = paraphraser
        self.translator: Translator | None = None
        self._source: tuple[FTParaphraser, ...] = ()

    def _find(self, terms: dict) -> FTParaphraser:
        if self.paraphraser_name is None:
            found = [t for t in terms.values() if isinstance(t, FTParaphraser)]
            if len(found) != 1:
                raise ConfigError(
                    f"ft.paraphraser: {len(found)} ft-paraphraser terms are configured; configure exactly one "
                    "or name it with this option."
                )
            return found[0]
        term = terms.get(self.paraphraser_name)
        if not isinstance(term, FTParaphraser):
            names = [n for n, t in terms.items() if isinstance(t, FTParaphraser)]
            raise ConfigError(
                f"ft.paraphraser: {self.paraphraser_name!r} is not a configured ft-paraphraser term "
                f"(ft-paraphraser terms: {', '.join(names) or 'none'})."
            )
        return term

    def setup(self, ctx: SetupContext) -> None:
        source = self._find(ctx.terms)
        self._source = (source,)
        t_channels = source.teacher_feature(ctx.teacher_features).shape[1]
        s = stage_features(ctx.student_features, source.position, "ft")[-1]
        self.translator = Translator(s.shape[1], factor_channels(t_channels, source.rate)).to(ctx.device)

    def teacher_fields(self) -> tuple[str, ...]:
        return self._source[0].teacher_fields()

    def forward(self, inp: TermInput) -> torch.Tensor:
        source = self._source[0]
        with torch.no_grad():
            f_t = source.paraphraser.encoder(source.teacher_feature(inp.teacher))
        s = stage_features(inp.student, source.position, "ft")[-1]
        return factor_loss(*match_spatial(self.translator(s), f_t))
