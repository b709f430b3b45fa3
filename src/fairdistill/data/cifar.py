"""CIFAR-10, CIFAR-100 and CIFAR-10S from the standard python pickle folders.

Layout under ``root``: ``cifar-10-batches-py/{data_batch_1..5, test_batch[, batches.meta]}`` and
``cifar-100-python/{train, test[, meta]}`` (the folders inside the official ``*-python.tar.gz``).
The files are Python-2 pickles, read with ``encoding="bytes"`` (so keys are ``bytes``) by an
unpickler that admits only numpy's array rebuilding (``CifarUnpickler``): a crafted file cannot
run code.

CIFAR-10S (Wang et al. CVPR 2020) as the official MFD code builds it (reference ``mfd.md`` §2.1;
``data_handler/cifar10.py``, ``CIFAR10(shuffle=True, seed)`` and ``CIFAR_10S._make_skewed``):
each training image is kept either gray (group 0) or colour (group 1). With N = 50000 training
images, skew ratio r and K = ``int((N * r) // 10)``, the images are walked in the order
``np.random.seed(seed); np.random.shuffle(np.arange(N))``; the first K met of each gray-majority
class are gray, the first ``N // 10 - K`` of each other class are gray, the rest colour (r = 0.8:
4000 / 1000 gray per class). ``cifar10s_groups`` reproduces that assignment exactly for every
seed; the items keep the file order (the official code stores them in the shuffled order). Gray
is PIL's ``convert("L")`` (``luma``) copied to 3 channels. The test set holds every test image
twice: all gray (group 0) first, then all colour (group 1), in file order (the official code
shuffles the test set too; order does not change any metric). No normalisation, as in MFD.
Protocols:

- ``"mfd"`` (default): gray-majority classes 0-4, r = 0.8 (MFD's code default).
- ``"wang2020"``: gray-majority classes {airplane, bird, deer, frog, ship} = {0, 2, 4, 6, 8},
  colour-majority {automobile, cat, dog, horse, truck}, r = 0.95. The shuffle and counts are
  MFD's (Wang et al. sampled theirs with ``random.seed(42)``).
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


PIL_LUMA_WEIGHTS = (19595, 38470, 7471)
"""PIL's ITU-R 601 weights (0.299, 0.587, 0.114) in units of 2^-16 (Pillow ``Convert.c``, ``L24``)."""


def luma(images: torch.Tensor) -> torch.Tensor:
    """PIL's ``Image.convert("L")`` of uint8 RGB images (N, 3, H, W), copied to 3 channels.

    Pillow computes ``(19595 R + 38470 G + 7471 B + 0x8000) >> 16`` (``Convert.c``: ``rgb2l``,
    ``L24``): the ITU-R 601 luma in 16-bit fixed point, rounded half up. It is at most 0.501 from
    ``0.299 R + 0.587 G + 0.114 B`` but one level off that value rounded on 9,040 of the 2^24
    RGB triples; MFD's gray images are PIL's.
    """
    n, _, h, w = images.shape
    rgb = images.reshape(n, 3, h * w)
    wr, wg, wb = PIL_LUMA_WEIGHTS
    y = rgb[:, 0].to(torch.int32).mul_(wr)
    y.add_(rgb[:, 1].to(torch.int32), alpha=wg).add_(rgb[:, 2].to(torch.int32), alpha=wb)
    y.add_(0x8000).bitwise_right_shift_(16)
    return y.to(torch.uint8).view(n, 1, h, w).expand(-1, 3, -1, -1).contiguous()


def gray_first(labels: torch.Tensor, order: torch.Tensor, n_gray: Sequence[int]) -> torch.Tensor:
    """Group of each item (0 = gray, 1 = colour) when, walking the items in ``order``, the first
    ``n_gray[c]`` met of class c are gray (all of them if the class has fewer; none for a label
    outside ``0..len(n_gray) - 1``, which the data set's own check then reports)."""
    order = np.asarray(order, dtype=np.int64)
    walked = np.asarray(labels, dtype=np.int64)[order]
    groups = np.ones(walked.size, dtype=np.int64)
    for c in np.unique(walked).tolist():
        if 0 <= c < len(n_gray):
            groups[order[walked == c][: n_gray[c]]] = 0
    return torch.from_numpy(groups)


def check_legacy_seed(name: str, seed: int) -> int:
    """``seed`` as an int that ``np.random.seed`` accepts (0 to 2**32 - 1), else ConfigError."""
    if isinstance(seed, bool) or int(seed) != seed or not 0 <= int(seed) < 2**32:
        raise ConfigError(
            f"{name}: seed must be an integer from 0 to 2**32 - 1 (it seeds numpy's legacy shuffle, "
            f"as the official code does), got {seed!r}"
        )
    return int(seed)


def mfd_order(n: int, seed: int) -> torch.Tensor:
    """The official CIFAR10(shuffle=True) order: ``np.random.seed(seed)`` then
    ``np.random.shuffle(np.arange(n))``, drawn from a private ``np.random.RandomState(seed)``
    (the same stream; the global numpy state is left alone). NumPy freezes RandomState's streams
    (NEP 19), so the order is the same on every numpy version."""
    index = np.arange(n, dtype=np.int64)
    np.random.RandomState(check_legacy_seed("cifar10s", seed)).shuffle(index)
    return torch.from_numpy(index)


def cifar10s_groups(
    labels: torch.Tensor, skew: float, gray_classes: Iterable[int], seed: int, num_classes: int = 10
) -> torch.Tensor:
    """CIFAR-10S group of each training item (0 = gray, 1 = colour), as MFD's ``_make_skewed``.

    With N items, ``K = int((N * skew) // num_classes)`` (the official expression, N = 50000),
    walking ``mfd_order(N, seed)``: the first K met of a class in ``gray_classes`` and the first
    ``N // num_classes - K`` of any other class are gray.
    """
    n = labels.numel()
    major = int((n * skew) // num_classes)
    minor = n // num_classes - major
    gray_classes = set(gray_classes)
    n_gray = [major if c in gray_classes else minor for c in range(num_classes)]
    return gray_first(labels, mfd_order(n, seed), n_gray)


def skewed_groups(labels: torch.Tensor, skew: float, gray_classes: Iterable[int], seed: int) -> torch.Tensor:
    """digits-s's own CIFAR-10S-style assignment (its classes differ in size; not MFD's order).

    Items are walked in ``torch.randperm`` order from ``seed``; for class c with n_c items,
    ``k = floor(n_c * skew)`` of them are gray if c is in ``gray_classes``, ``n_c - k`` otherwise.
    """
    gray_classes = set(gray_classes)
    order = torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(int(seed)))
    n_gray = []
    for c, n_c in enumerate(torch.bincount(labels).tolist()):
        k = int(np.floor(n_c * skew + 1e-9))
        n_gray.append(k if c in gray_classes else n_c - k)
    return gray_first(labels, order, n_gray)


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


CIFAR_PICKLE_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"),  # numpy's array rebuilder, as the real files name it
    ("numpy._core.multiarray", "_reconstruct"),  # the same under numpy >= 2 (a re-saved file)
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
})
"""The only globals a CIFAR python pickle may name. The real files are Python-2 pickles of dicts
of strings, numbers, lists and uint8 numpy arrays; an array is rebuilt as
``_reconstruct(ndarray, (0,), b"b")`` followed by its state (shape, ``dtype("u1", 0, 1)``, raw
bytes), so these three are all they name (the second entry is the same function under the name
numpy 2 writes, for a file re-saved at protocol 2 to 4)."""


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle named a global outside ``CIFAR_PICKLE_GLOBALS``."""

    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.qualified = f"{module}.{name}"


class CifarUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` (``encoding="bytes"``) that resolves only ``CIFAR_PICKLE_GLOBALS``.

    Besides building str, bytes, numbers, tuples, lists, sets and dicts itself, a pickle can only
    call what it names as a global (REDUCE, NEWOBJ, INST and OBJ call it, BUILD calls its
    ``__setstate__``; every way of naming one, GLOBAL, STACK_GLOBAL and the copyreg EXT codes,
    goes through ``find_class``). Refusing every other global before it is imported rejects a
    crafted file before any of its code runs.
    """

    def __init__(self, file):
        super().__init__(file, encoding="bytes")

    def find_class(self, module: str, name: str):
        if (module, name) not in CIFAR_PICKLE_GLOBALS:
            raise RefusedGlobal(module, name)
        return super().find_class(module, name)


def unpickle(path: str, what: str) -> dict:
    """Load one Python-2 CIFAR pickle with ``bytes`` keys (``CifarUnpickler``).

    DataError naming the file when it is missing, damaged, not a dict, or names a global the
    real files never name (refused before it is imported or called).
    """
    try:
        with open(path, "rb") as f:
            obj = CifarUnpickler(f).load()
    except FileNotFoundError:
        raise DataError(f"{what}: missing file {path}") from None
    except RefusedGlobal as e:
        raise DataError(
            f"{what}: refused to load {path}: it names the Python global {e.qualified}, which a real CIFAR "
            f"python file never does (they name only {', '.join(sorted('.'.join(g) for g in CIFAR_PICKLE_GLOBALS))}); "
            f"it could run code, so it was neither imported nor called. Replace the file with a fresh copy "
            f"from the official python archive"
        ) from None
    except Exception as e:  # any other unpickling failure means the file is damaged
        raise DataError(
            f"{what}: cannot read {path}: the file is truncated or corrupt ({type(e).__name__}: {e}); "
            f"replace it with a fresh copy from the official python archive"
        ) from None
    if not isinstance(obj, dict):
        raise DataError(f"{what}: {path} holds a {type(obj).__name__}, expected a dict of CIFAR arrays")
    return obj


def _integer_labels(value, path: str, key: bytes, what: str) -> np.ndarray:
    """``value`` (a file's label list) as a 1-D int64 array, else DataError naming the file and key."""
    try:
        y = np.asarray(value)
    except (TypeError, ValueError):  # e.g. a ragged list
        y = None
    if y is not None and y.size == 0:
        y = y.astype(np.int64)
    if y is None or y.ndim != 1 or y.dtype.kind not in "iu":
        found = f"{y.dtype} values of shape {y.shape}" if y is not None else "a ragged list"
        raise DataError(f"{what}: {path}: {key!r} holds {found}; expected a list of integer labels")
    return y.astype(np.int64)


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
        data, y = batch[b"data"], _integer_labels(batch[label_key], path, label_key, what)
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.shape == (y.size, 3 * 32 * 32)):
            found = f"{data.dtype} data of shape {data.shape}" if isinstance(data, np.ndarray) else f"a {type(data).__name__}"
            raise DataError(
                f"{what}: {path} holds {found} and {y.size} labels; expected uint8 data of shape (N, 3072) with N labels"
            )
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(y)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


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
    for the protocol's (0.8 / 0.95). ``seed``: the official numpy shuffle (``mfd_order``) that
    decides which training images are gray, 0 to 2**32 - 1. ``val_fraction``: share of each (group, class) cell held out of "train" as "val".
    """
    if protocol not in PROTOCOLS:
        raise ConfigError(f"cifar10s: protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    gray_classes, default_skew = PROTOCOLS[protocol]
    skew = check_skew("cifar10s", default_skew if skew is None else skew)
    check_val_fraction("cifar10s", split, val_fraction)
    if split != "test":
        check_legacy_seed("cifar10s", seed)
    all_files = CIFAR10_TRAIN + CIFAR10_TEST
    x, y = load_batches(root, CIFAR10_FOLDER, _split_files(split, CIFAR10_TRAIN, CIFAR10_TEST), b"labels", "cifar10s", all_files)
    names = label_names(root, CIFAR10_FOLDER, "batches.meta", b"label_names", 10) or CIFAR10_CLASSES
    if split == "test":
        x, y, g = both_versions(x, y)
        return ImageDataset(x, y, g, 10, 2, name="cifar10s", class_names=names, group_names=GROUP_NAMES)
    g = cifar10s_groups(y, skew, gray_classes, seed)
    ds = ImageDataset(gray_and_colour(x, g), y, g, 10, 2, name="cifar10s", class_names=names, group_names=GROUP_NAMES)
    return select_split(ds, split, val_fraction)
