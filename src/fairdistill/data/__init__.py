"""Data sets (items ``(image, label, group)``), samplers and the on-device batch pipeline."""
from __future__ import annotations

from ..errors import ConfigError
from ..registry import check_options
from . import (  # noqa: F401  (register builders)
    celeba, cifar, coco_det, digits, digits_dense, imagecsv, imagefolder, utkface, voc_det, voc_seg,
)
from .base import DATASETS, ImageDataset
from .loader import BatchLoader

__all__ = ["DATASETS", "ImageDataset", "BatchLoader", "build_dataset"]

SPLITS = ("train", "val", "test")


def build_dataset(name: str, root: str = "data", split: str = "train", seed: int = 0, key: str = "data", **options) -> ImageDataset:
    """Build data set ``name`` from ``root`` for ``split`` ("train", "val" or "test").

    ``seed`` drives any seed-dependent construction (e.g. CIFAR-10S's gray/colour assignment);
    ``options`` are the builder's keyword options. Unknown names or options raise a ConfigError
    naming ``key``.
    """
    if split not in SPLITS:
        raise ConfigError(f"{key}: split must be one of {', '.join(SPLITS)}, got {split!r}")
    builder = DATASETS.get(name, key=f"{key}.name")
    options = check_options(builder, options, f"{key}.options")
    return builder(root=root, split=split, seed=seed, **options)
