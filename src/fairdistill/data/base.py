"""The data contract: in-memory images with a class label and a group per item."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import DataError
from ..registry import Registry

DATASETS: Registry = Registry("data set")
"""Data set builders: ``builder(root=..., split=..., seed=..., **options) -> ImageDataset``."""


class ImageDataset:
    """Images held as uint8 (N, C, H, W) with 1-D int64 ``labels`` and ``groups``.

    Items are ``(image, label, group)``. ``mean``/``std`` (per channel, in [0, 1] units) are the
    normalisation the batch pipeline applies after scaling to [0, 1]; None means no
    normalisation. A data set without a sensitive attribute has ``groups`` all zero.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        groups: torch.Tensor,
        num_classes: int,
        num_groups: int,
        *,
        name: str,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        class_names: Sequence[str] | None = None,
        group_names: Sequence[str] | None = None,
    ):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise DataError(f"{name}: images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        groups = torch.as_tensor(groups, dtype=torch.long).reshape(-1)
        n = images.shape[0]
        if labels.numel() != n or groups.numel() != n:
            raise DataError(f"{name}: {n} images but {labels.numel()} labels and {groups.numel()} groups")
        for what, values, count in (("label", labels, num_classes), ("group", groups, num_groups)):
            if n and (values.min() < 0 or values.max() >= count):
                bad = values[(values < 0) | (values >= count)][0].item()
                raise DataError(f"{name}: {what} {bad} is outside the valid range 0..{count - 1}")
        self.images, self.labels, self.groups = images, labels, groups
        self.num_classes, self.num_groups = int(num_classes), int(num_groups)
        self.name = name
        self.mean = tuple(mean) if mean is not None else None
        self.std = tuple(std) if std is not None else None
        self.class_names = list(class_names) if class_names else [str(c) for c in range(num_classes)]
        self.group_names = list(group_names) if group_names else [str(g) for g in range(num_groups)]

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i]), int(self.groups[i])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def cell_counts(self) -> torch.Tensor:
        """Number of items per (group, class): a (num_groups, num_classes) int64 tensor."""
        cells = self.groups * self.num_classes + self.labels
        return torch.bincount(cells, minlength=self.num_groups * self.num_classes).view(
            self.num_groups, self.num_classes
        )

    def subset(self, index: torch.Tensor, name: str | None = None) -> "ImageDataset":
        return ImageDataset(
            self.images[index], self.labels[index], self.groups[index], self.num_classes, self.num_groups,
            name=name or self.name, mean=self.mean, std=self.std,
            class_names=self.class_names, group_names=self.group_names,
        )
