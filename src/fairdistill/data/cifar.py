"""CIFAR-10, CIFAR-100 and CIFAR-10S from the standard python pickle folders.

Layout under ``root``: ``cifar-10-batches-py/{data_batch_1..5, test_batch[, batches.meta]}`` and
``cifar-100-python/{train, test[, meta]}`` (the folders inside the official ``*-python.tar.gz``).
The files are Python-2 pickles, read with ``encoding="bytes"`` (so keys are ``bytes``).

CIFAR-10S (Wang et al. CVPR 2020; MFD protocol, reference ``mfd.md`` §2.1): each training image
is kept either gray (group 0) or colour (group 1). The 50k training images are shuffled with
``seed``; with skew ratio r and the n_c = 5000 images of class c in shuffled order, the first
``floor(n_c * r)`` are gray for a gray-majority class and the first ``n_c - floor(n_c * r)`` for the
others (MFD writes ``floor(50000 r) / 10``; equal whenever 50000 r is a multiple of 10). Gray is
the ITU-R 601 luma ``0.299 R + 0.587 G + 0.114 B`` (rounded half up, as PIL's ``convert("L")``)
copied to 3 channels. The test set holds every test image twice: all gray (group 0) first, then
all colour (group 1). No normalisation, as in MFD. Protocols:

- ``"mfd"`` (default): gray-majority classes 0-4, r = 0.8 (MFD's code default).
- ``"wang2020"``: gray-majority classes {airplane, bird, deer, frog, ship} = {0, 2, 4, 6, 8},
  colour-majority {automobile, cat, dog, horse, truck}, r = 0.95. The shuffle still uses ``seed``
  (Wang et al. fixed theirs with ``random.seed(42)``).
"""
from __future__ import annotations

import os
import pickle
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .base import DATASETS, ImageDataset
from .split import check_val_fraction, select_split

CIFAR_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)
"""OFD's CIFAR normalisation (reference ``ofd.md``), in [0, 1] units."""

CIFAR10_FOLDER, CIFAR10_TRAIN, CIFAR10_TEST = "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]
CIFAR100_FOLDER, CIFAR100_TRAIN, CIFAR100_TEST = "cifar-100-python", ["train"], ["test"]
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
GROUP_NAMES = ("gray", "color")
PROTOCOLS = {"mfd": ((0, 1, 2, 3, 4), 0.8), "wang2020": ((0, 2, 4, 6, 8), 0.95)}
"""CIFAR-10S protocol -> (gray-majority classes, default skew ratio)."""


def luma(images: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of uint8 RGB images (N, 3, H, W), rounded half up, copied to 3 channels."""
    rgb = images.to(torch.int32)
    y = (299 * rgb[:, 0] + 587 * rgb[:, 1] + 114 * rgb[:, 2] + 500) // 1000
    return y.to(torch.uint8).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def skewed_groups(labels: torch.Tensor, skew: float, gray_classes: Iterable[int], seed: int) -> torch.Tensor:
    """CIFAR-10S group of each training item: 0 = gray, 1 = colour (see the module docstring).

    Items are visited in a random order drawn from ``seed``; for class c with n_c items,
    ``k = floor(n_c * skew)`` of them are gray if c is in ``gray_classes``, ``n_c - k`` otherwise.
    """
    gray_classes = set(gray_classes)
    order = torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(int(seed)))
    groups = torch.ones(labels.numel(), dtype=torch.long)
    for c in labels.unique().tolist():
        members = order[labels[order] == c]
        k = int(np.floor(members.numel() * skew + 1e-9))
        groups[members[: k if c in gray_classes else members.numel() - k]] = 0
    return groups


def gray_and_colour(images: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """``images`` with those of group 0 replaced by their luma."""
    out = images.clone()
    gray = groups == 0
    out[gray] = luma(images[gray])
    return out


def both_versions(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The skewed sets' test protocol: every image gray (group 0) and then colour (group 1)."""
    n = labels.numel()
    return (
        torch.cat([luma(images), images]),
        torch.cat([labels, labels]),
        torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)]),
    )


def _expected(folder: str, files: Sequence[str]) -> str:
    return f"{folder}/ holding {', '.join(files)}"


def unpickle(path: str, what: str) -> dict:
    """Load one Python-2 CIFAR pickle with ``bytes`` keys; DataError naming the file otherwise."""
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except FileNotFoundError:
        raise DataError(f"{what}: missing file {path}") from None
    except Exception as e:  # any unpickling failure means the file is damaged
        raise DataError(
            f"{what}: cannot read {path}: the file is truncated or corrupt ({type(e).__name__}: {e}); "
            f"replace it with a fresh copy from the official python archive"
        ) from None
    if not isinstance(obj, dict):
        raise DataError(f"{what}: {path} holds a {type(obj).__name__}, expected a dict of CIFAR arrays")
    return obj


def load_batches(root: str, folder: str, files: Sequence[str], label_key: bytes, what: str, all_files: Sequence[str]):
    """Images (N, 3, 32, 32) uint8 and labels of the pickles ``files`` in ``root/folder``."""
    base = os.path.join(root, folder)
    if not os.path.isdir(base):
        raise DataError(
            f"{what}: data folder {base} not found; expected {_expected(folder, all_files)} inside root "
            f"{root!r} (the folder of the official python archive, extracted as is)"
        )
    images, labels = [], []
    for name in files:
        path = os.path.join(base, name)
        if not os.path.isfile(path):
            raise DataError(f"{what}: missing file {path}; expected {_expected(folder, all_files)} inside root {root!r}")
        batch = unpickle(path, what)
        if b"data" not in batch or label_key not in batch:
            found = ", ".join(repr(k) for k in batch)
            raise DataError(f"{what}: {path} lacks key {b'data'!r} or {label_key!r} (found {found}); is it a CIFAR file of this data set?")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        y = np.asarray(batch[label_key], dtype=np.int64).reshape(-1)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != y.size:
            raise DataError(
                f"{what}: {path} holds data of shape {data.shape} and {y.size} labels; expected (N, 3072) with N labels"
            )
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        labels.append(torch.from_numpy(y))
    return torch.cat(images), torch.cat(labels)


def label_names(root: str, folder: str, meta: str, key: bytes, count: int) -> list[str] | None:
    """Class names from the optional meta pickle, or None when it is absent or unusable."""
    path = os.path.join(root, folder, meta)
    if not os.path.isfile(path):
        return None
    names = unpickle(path, folder).get(key)
    if not isinstance(names, (list, tuple)) or len(names) != count:
        return None
    return [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]


def _split_files(split: str, train: list[str], test: list[str]) -> list[str]:
    return test if split == "test" else train


@DATASETS.register("cifar10")
def cifar10(*, root: str, split: str, seed: int, val_fraction: float = 0.0) -> ImageDataset:
    """CIFAR-10 (10 classes, one group), normalised with OFD's CIFAR mean/std.

    ``val_fraction``: share of each class held out of "train" as "val" (``split.py``).
    """
    check_val_fraction("cifar10", split, val_fraction)
    all_files = CIFAR10_TRAIN + CIFAR10_TEST
    x, y = load_batches(root, CIFAR10_FOLDER, _split_files(split, CIFAR10_TRAIN, CIFAR10_TEST), b"labels", "cifar10", all_files)
    names = label_names(root, CIFAR10_FOLDER, "batches.meta", b"label_names", 10) or CIFAR10_CLASSES
    ds = ImageDataset(x, y, torch.zeros_like(y), 10, 1, name="cifar10", mean=CIFAR_MEAN, std=CIFAR_STD, class_names=names)
    return ds if split == "test" else select_split(ds, split, val_fraction)


@DATASETS.register("cifar100")
def cifar100(*, root: str, split: str, seed: int, label: str = "fine", val_fraction: float = 0.0) -> ImageDataset:
    """CIFAR-100 with ``label="fine"`` (100 classes) or ``"coarse"`` (20 superclasses), one group,
    normalised with OFD's CIFAR mean/std.

    ``val_fraction``: share of each class held out of "train" as "val" (``split.py``).
    """
    if label not in ("fine", "coarse"):
        raise ConfigError(f"cifar100: label must be 'fine' or 'coarse', got {label!r}")
    check_val_fraction("cifar100", split, val_fraction)
    count = 100 if label == "fine" else 20
    key = f"{label}_labels".encode()
    all_files = CIFAR100_TRAIN + CIFAR100_TEST
    x, y = load_batches(root, CIFAR100_FOLDER, _split_files(split, CIFAR100_TRAIN, CIFAR100_TEST), key, "cifar100", all_files)
    names = label_names(root, CIFAR100_FOLDER, "meta", f"{label}_label_names".encode(), count)
    ds = ImageDataset(x, y, torch.zeros_like(y), count, 1, name="cifar100", mean=CIFAR_MEAN, std=CIFAR_STD, class_names=names)
    return ds if split == "test" else select_split(ds, split, val_fraction)


def check_skew(name: str, skew: float) -> float:
    if not 0.0 <= float(skew) <= 1.0:
        raise ConfigError(f"{name}: skew must be a ratio in [0, 1], got {skew!r}")
    return float(skew)


@DATASETS.register("cifar10s")
def cifar10s(
    *, root: str, split: str, seed: int, protocol: str = "mfd", skew: float | None = None, val_fraction: float = 0.0
) -> ImageDataset:
    """CIFAR-10S: CIFAR-10 with a class-dependent gray/colour skew (module docstring).

    ``protocol``: "mfd" or "wang2020" (class split and default skew). ``skew``: the ratio r, None
    for the protocol's (0.8 / 0.95). ``seed``: the shuffle that decides which training images are
    gray. ``val_fraction``: share of each (group, class) cell held out of "train" as "val".
    """
    if protocol not in PROTOCOLS:
        raise ConfigError(f"cifar10s: protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    gray_classes, default_skew = PROTOCOLS[protocol]
    skew = check_skew("cifar10s", default_skew if skew is None else skew)
    check_val_fraction("cifar10s", split, val_fraction)
    all_files = CIFAR10_TRAIN + CIFAR10_TEST
    x, y = load_batches(root, CIFAR10_FOLDER, _split_files(split, CIFAR10_TRAIN, CIFAR10_TEST), b"labels", "cifar10s", all_files)
    names = label_names(root, CIFAR10_FOLDER, "batches.meta", b"label_names", 10) or CIFAR10_CLASSES
    if split == "test":
        x, y, g = both_versions(x, y)
        return ImageDataset(x, y, g, 10, 2, name="cifar10s", class_names=names, group_names=GROUP_NAMES)
    g = skewed_groups(y, skew, gray_classes, seed)
    ds = ImageDataset(gray_and_colour(x, g), y, g, 10, 2, name="cifar10s", class_names=names, group_names=GROUP_NAMES)
    return select_split(ds, split, val_fraction)
