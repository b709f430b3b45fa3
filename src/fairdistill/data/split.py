"""The explicit validation split every builder offers through its ``val_fraction`` option.

Neither paper holds out a validation set (MFD steps its scheduler on the test loss, reference
``mfd.md`` §2); here a validation part exists only when a user asks for it with
``val_fraction > 0``, and then it is carved from the training split:

- stratified by (group, label) cell: a cell of n training items gives
  ``round(val_fraction * n)`` of them to "val" (half rounds up), so every cell keeps its share;
- deterministic and independent of ``seed``: which items go is fixed by one permutation of the
  item positions drawn from a generator with the constant seed ``SPLIT_SEED``. Where a data set's
  groups depend on ``seed`` (CIFAR-10S, digits-s: the gray/colour assignment), the cells
  depend on it too, so the held-out images can change with ``seed``; their per-cell counts do not.

``split="val"`` with ``val_fraction == 0`` is an error, never an empty set.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError, DataError
from .base import ImageDataset

SPLIT_SEED = 20240101
"""Seed of the one permutation that decides which items of each cell are held out."""


def check_val_fraction(name: str, split: str, val_fraction: float) -> None:
    """Fail early, before any file is read, on a bad ``val_fraction`` or a "val" split without one."""
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ConfigError(f"{name}: val_fraction must be in [0, 1), got {val_fraction!r}")
    if split == "val" and float(val_fraction) == 0.0:
        raise DataError(
            f"{name}: split 'val' needs a held-out part of the training set; set the data set option "
            f"val_fraction to a value in (0, 1), e.g. val_fraction=0.1 (it is 0, so no validation split exists)"
        )


def holdout_index(
    labels: torch.Tensor, groups: torch.Tensor, num_classes: int, val_fraction: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions ``(train, val)`` of a stratified (group, label) hold-out; both sorted ascending."""
    n = labels.numel()
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    cells = (groups * num_classes + labels)[order]
    # rank of each item inside its cell, in permutation order
    by_cell = torch.argsort(cells, stable=True)
    sorted_cells = cells[by_cell]
    counts = torch.bincount(sorted_cells)
    starts = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.arange(n) - starts[sorted_cells]
    rank = torch.empty(n, dtype=torch.long)
    rank[by_cell] = rank_sorted
    take = torch.floor(counts.double() * float(val_fraction) + 0.5).long()
    held = rank < take[cells]
    val = torch.sort(order[held]).values
    train = torch.sort(order[~held]).values
    return train, val


def split_positions(labels: torch.Tensor, groups: torch.Tensor, num_classes: int, split: str, val_fraction: float):
    """Positions of the "train" or "val" part of a training list (``None``: keep all), for
    loaders that hold out items before decoding their images."""
    if split == "test" or not val_fraction:
        return None
    train, val = holdout_index(labels, groups, num_classes, val_fraction)
    return train if split == "train" else val


def select_split(full_train: ImageDataset, split: str, val_fraction: float) -> ImageDataset:
    """The "train" or "val" part of ``full_train`` (all of it for "train" when ``val_fraction == 0``)."""
    check_val_fraction(full_train.name, split, val_fraction)
    if split not in ("train", "val"):
        raise ValueError(f"select_split handles 'train' and 'val', got {split!r}")
    if val_fraction == 0.0:
        return full_train
    train, val = holdout_index(full_train.labels, full_train.groups, full_train.num_classes, val_fraction)
    return full_train.subset(train if split == "train" else val)
