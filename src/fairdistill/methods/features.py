"""Pairing student and teacher features: which positions, and matching sizes.

Shared by the feature-distillation terms (OFD, AB, AT, NST, FitNets, FT):

* ``position`` (:data:`Position`) chooses the kind of stage feature: ``"prerelu"`` =
  ``Features.stages`` (the pre-ReLU stage ends, OFD §3.2) or ``"block"`` =
  ``Features.extra["block"]`` (the ordinary stage outputs, where the earlier methods distil;
  OFD supplement Table 1 compares both).
* ``positions`` (:data:`Positions`) chooses which stages: ``"all"``, ``"last"`` or stage
  indices (negative indices count from the end).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal, Union

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..models.base import Features
from ..registry import Range

Position = Literal["block", "prerelu"]
"""The kind of stage feature a term reads (see the module docstring)."""
Positions = Union[Literal["all", "last"], int, Annotated[list[int], Range(ge=1)]]
"""Which stages: "all", "last", one stage index or a non-empty list of them."""


def resolve_positions(spec: str | int | list[int], num_stages: int, key: str) -> list[int]:
    """Stage indices (ascending, non-negative) that ``spec`` (a :data:`Positions` value) names
    among ``num_stages`` stages."""
    if spec == "all":
        return list(range(num_stages))
    if spec == "last":
        return [num_stages - 1]
    spec = [spec] if isinstance(spec, int) else list(spec)
    if not spec:
        raise ConfigError(f"{key}: expected 'all', 'last' or a non-empty list of stage indices, got [].")
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


def stage_features(features: Features, position: str, key: str) -> Sequence[torch.Tensor]:
    """The stage features of kind ``position`` ("prerelu" or "block") from ``features``, as the
    features hold them (a view of declared fields lets only those be read: ``methods.fields``)."""
    if position == "prerelu":
        return features.stages
    block = features.extra.get("block")
    if block is None:
        raise ConfigError(
            f"{key}: position 'block' needs the model to expose its stage outputs as "
            "Features.extra['block'], and this model does not; use position: prerelu."
        )
    return block


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
