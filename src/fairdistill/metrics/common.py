"""Pieces shared by every fairness metric: between-group gaps per class and input checks.

Every gap in fairdistill follows the DEO of the MFD paper (Jung et al., CVPR 2021, Sec. 5):
for a per-(group, class) rate r[g, c], gap_c = max_g r[g, c] - min_g r[g, c] over the groups
where r[g, c] is defined; a class with fewer than two such groups has no gap (NaN) and is left
out of the summaries ``*_a`` = mean_c gap_c and ``*_m`` = max_c gap_c (NaN when no class has one).
"""
from __future__ import annotations

import math

import torch

from ..errors import DataError

NAN = float("nan")


def class_gaps(rate: torch.Tensor, defined: torch.Tensor) -> torch.Tensor:
    """gap_c = max_g - min_g of ``rate`` (groups x classes) over the groups where ``defined``.

    Returns a float64 tensor of shape (classes,), NaN for a class defined in fewer than 2 groups.
    """
    rate = rate.double()
    hi = torch.where(defined, rate, torch.full_like(rate, -math.inf)).amax(dim=0)
    lo = torch.where(defined, rate, torch.full_like(rate, math.inf)).amin(dim=0)
    return torch.where(defined.sum(dim=0) >= 2, hi - lo, torch.full_like(hi, NAN))


def mean_max(gaps: torch.Tensor) -> tuple[float, float]:
    """(mean, max) over the non-NaN entries of ``gaps``; (NaN, NaN) when there is none."""
    kept = gaps[~torch.isnan(gaps)]
    if kept.numel() == 0:
        return NAN, NAN
    return kept.mean().item(), kept.max().item()


def ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den in float64, NaN where den == 0."""
    num, den = num.double(), den.double()
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.full_like(den, NAN))


def excluded_cells(count: torch.Tensor) -> list[list[int]]:
    """[group, class] pairs whose count is 0, in row-major order: the cells left out of the gaps."""
    return [[int(g), int(c)] for g, c in torch.nonzero(count == 0).tolist()]


def check_range(t: torch.Tensor, n: int, what: str, size_name: str) -> None:
    """Raise DataError unless every entry of the integer tensor ``t`` is in [0, n)."""
    if t.numel() and bool(((t < 0) | (t >= n)).any()):
        lo, hi = int(t.min()), int(t.max())
        raise DataError(f"{what} must lie in [0, {n - 1}] ({size_name} = {n}) but range over [{lo}, {hi}]; "
                        f"check {size_name} against the data set and the model")


def as_index(t, what: str) -> torch.Tensor:
    """``t`` (tensor, array or list) as a 1-D int64 tensor; DataError for non-integer values."""
    t = torch.as_tensor(t)
    if (t.is_floating_point() or t.is_complex()) and t.numel():  # an empty list becomes float32
        raise DataError(f"{what} must be integers, got dtype {t.dtype}")
    return t.reshape(-1).long()
