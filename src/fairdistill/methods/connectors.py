"""Pairing student and teacher features: which positions, matching sizes, and the connector.

Shared by the feature-distillation terms (OFD, AB, AT, NST, FitNets, FT):

* ``position`` chooses the kind of stage feature: ``"prerelu"`` = ``Features.stages`` (the
  pre-ReLU stage ends, OFD §3.2) or ``"block"`` = ``Features.extra["block"]`` (the ordinary stage
  outputs, where the earlier methods distil; OFD supplement Table 1 compares both).
* ``positions`` chooses which stages: ``"all"``, ``"last"`` or a list of stage indices
  (negative indices count from the end).
* :class:`Connector` is OFD's student transform (§3.3): 1x1 conv without bias, then BN.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models.base import Features
from ..registry import suggest

POSITIONS = ("block", "prerelu")


def check_choice(value, choices: tuple[str, ...], key: str) -> str:
    """``value`` if it is one of ``choices``, else a ConfigError naming ``key``."""
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(
            f"{key}: expected one of {', '.join(repr(c) for c in choices)}, got {value!r}."
            f"{suggest(value, choices)}"
        )
    return value


def check_positions(spec, key: str) -> str | list[int]:
    """Validate a ``positions`` option (``"all"``, ``"last"`` or a non-empty list of ints)."""
    if isinstance(spec, str):
        return check_choice(spec, ("all", "last"), key)
    if isinstance(spec, int) and not isinstance(spec, bool):
        return [spec]
    if (
        isinstance(spec, (list, tuple))
        and spec
        and all(isinstance(i, int) and not isinstance(i, bool) for i in spec)
    ):
        return list(spec)
    raise ConfigError(f"{key}: expected 'all', 'last' or a non-empty list of stage indices, got {spec!r}.")


def resolve_positions(spec: str | list[int], num_stages: int, key: str) -> list[int]:
    """Stage indices (ascending, non-negative) that ``spec`` names among ``num_stages`` stages."""
    if spec == "all":
        return list(range(num_stages))
    if spec == "last":
        return [num_stages - 1]
    out = []
    for i in spec:
        if not -num_stages <= i < num_stages:
            raise ConfigError(
                f"{key}: stage index {i} is out of range; the models have {num_stages} stages "
                f"(valid indices 0..{num_stages - 1}, or negative from the end)."
            )
        out.append(i % num_stages)
    if len(set(out)) != len(out):
        raise ConfigError(f"{key}: stage indices {spec} name the same stage twice.")
    return sorted(out)


def stage_features(features: Features, position: str, key: str) -> list[torch.Tensor]:
    """The stage features of kind ``position`` ("prerelu" or "block") from ``features``."""
    if position == "prerelu":
        return list(features.stages)
    block = features.extra.get("block")
    if block is None:
        raise ConfigError(
            f"{key}: position 'block' needs the model to expose its stage outputs as "
            "Features.extra['block'], and this model does not; use position: prerelu."
        )
    return list(block)


def paired_stages(student: Features, teacher: Features, position: str, key: str):
    """Student and teacher stage lists of kind ``position``; fails when their counts differ."""
    s = stage_features(student, position, key)
    t = stage_features(teacher, position, key)
    if len(s) != len(t):
        raise ConfigError(
            f"{key}: the student has {len(s)} stages and the teacher {len(t)}; stage-wise "
            "distillation pairs stage i with stage i, so pick models with as many stages."
        )
    return s, t


def check_same_spatial(s: torch.Tensor, t: torch.Tensor, index: int, key: str) -> None:
    """Fail with a ConfigError when stage ``index`` differs in spatial size between the models."""
    if s.shape[2:] != t.shape[2:]:
        raise ConfigError(
            f"{key}: at stage {index} the student feature is {tuple(s.shape[2:])} and the "
            f"teacher's {tuple(t.shape[2:])}; this method compares them element by element, so "
            "the spatial sizes must match (choose other positions or models)."
        )


def match_spatial(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive-average-pool whichever map is larger down to the smaller size (RepDistiller)."""
    if s.dim() < 3 or s.shape[2:] == t.shape[2:]:
        return s, t
    size = tuple(min(a, b) for a, b in zip(s.shape[2:], t.shape[2:]))
    if s.shape[2:] != size:
        s = F.adaptive_avg_pool2d(s, size)
    if t.shape[2:] != size:
        t = F.adaptive_avg_pool2d(t, size)
    return s, t


class Connector(nn.Sequential):
    """OFD's student transform r (§3.3): Conv1x1(C_s -> C_t, no bias) + BatchNorm, no ReLU.

    Initialisation as the official code: conv weights ~ N(0, sqrt(2 / (k*k*C_t))), BN weight 1
    and bias 0.
    """

    def __init__(self, s_channels: int, t_channels: int):
        conv = nn.Conv2d(s_channels, t_channels, kernel_size=1, bias=False)
        bn = nn.BatchNorm2d(t_channels)
        k = conv.kernel_size[0] * conv.kernel_size[1]
        nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (k * t_channels)))
        nn.init.ones_(bn.weight)
        nn.init.zeros_(bn.bias)
        super().__init__(conv, bn)
