"""CelebA as in the MFD paper: one binary attribute as the class, another as the group
(reference ``mfd.md`` §2.3).

Layout: ``ROOT/celeba/img_align_celeba/*.jpg``, ``ROOT/celeba/list_attr_celeba.txt`` (a count
line, a header of attribute names, then rows ``NAME v1 ... v40`` of -1/1 separated by runs of
spaces) and ``ROOT/celeba/list_eval_partition.txt`` (rows ``NAME 0|1|2``: train/val/test).
Values map -1 -> 0, 1 -> 1. Defaults: class ``Attractive``, group ``Male`` (0 female, 1 male).

Splits follow the official partition: "train" = 0, "val" = 1 (unused by the paper, kept as it
is), "test" = 2 balanced over the four (group, label) cells by keeping, in file order, the first
``min cell count`` images of each cell. ``val_fraction > 0`` instead makes "val" a stratified
hold-out of partition 0 (``data/split.py``), removed from "train".

Images: "val" and "test" are Resize((image_size, image_size)), squashing the 178 x 218 aligned
faces, as the official test transform (176). The official training transform is
RandomResizedCrop(176) (scale (0.08, 1), ratio (3/4, 4/3)) of the original image, then a flip:
``train_size="original"`` stores the training images unresized (3 x 218 x 178) so that the
batch pipeline's ``random_resized`` crop (``data/augment.py``) draws the official boxes on the
original pixels; its resampling is bilinear without Pillow's antialiasing (it differs only for
boxes with a side longer than 176, shrunk by at most 218 / 176 = 1.24). The default
``train_size=None`` stores them like the test images (squashed to ``image_size``, for flips
only); an integer squashes them to that side. Memory: 3 x 176^2 bytes = 93 kB per image, so
all 162,770 training images take 15.1 GB (18.9 GB at the original 178 x 218); ``max_train``
keeps a fixed random subset (the same for every ``seed``, in file order) to fit smaller
machines. ``cache=True`` keeps the decoded arrays in ``cache_dir``
(default ``ROOT/.fairdistill_cache``). Normalisation: ImageNet mean and std.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataError
from ..registry import suggest
from .base import DATASETS, ImageDataset
from .images import IMAGENET_MEAN, IMAGENET_STD, cache_folder, check_size, first_few, load_images
from .split import check_val_fraction, holdout_index

FOLDER = "celeba"
IMAGES = "img_align_celeba"
ATTRIBUTES = "list_attr_celeba.txt"
PARTITION = "list_eval_partition.txt"
PARTS = {"train": 0, "val": 1, "test": 2}
SUBSET_SEED = 0
"""Seed of the fixed permutation ``max_train`` draws its subset from."""


def _rows(path: Path) -> list[str]:
    try:
        return [line for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"celeba: cannot read {path}: {err}") from err


def read_attributes(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """``(image names, attribute names, values)`` of ``list_attr_celeba.txt``; values int8 in {-1, 1}."""
    lines = _rows(path)
    layout = "a count line, a header of attribute names, then rows 'NAME v1 ... vK' of -1/1"
    if len(lines) < 2 or not lines[0].strip().isdigit():
        raise DataError(f"celeba: {path} does not start with a count line; expected {layout}")
    count, header, rows = int(lines[0]), lines[1].split(), lines[2:]
    if len(rows) != count:
        raise DataError(f"celeba: {path} says {count} images on its first line but has {len(rows)} rows")
    if count == 0:
        raise DataError(f"celeba: {path} lists no images")
    split_rows = [row.split(None, 1) for row in rows]
    names = [r[0] for r in split_rows]
    fields = [r[1] if len(r) > 1 else "" for r in split_rows]
    try:
        values = np.loadtxt(fields, dtype=np.int8, ndmin=2)
        ok = values.shape == (count, len(header)) and bool(np.isin(values, (-1, 1)).all())
    except ValueError:
        ok = False
    if not ok:
        bad = [f"line {i + 3} ({names[i]})" for i, f in enumerate(fields)
               if len(f.split()) != len(header) or any(v not in ("-1", "1") for v in f.split())]
        raise DataError(
            f"celeba: {path}: rows must hold a name and {len(header)} values -1 or 1 "
            f"(one per header name); bad rows: {first_few(bad)}"
        )
    if len(set(names)) != len(names):
        raise DataError(f"celeba: {path} lists some image names more than once")
    return names, header, values


def read_partition(path: Path) -> dict[str, int]:
    """Image name -> partition (0 train, 1 val, 2 test) from ``list_eval_partition.txt``."""
    out, bad = {}, []
    for i, row in enumerate(_rows(path)):
        fields = row.split()
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            bad.append(f"line {i + 1}")
            continue
        out[fields[0]] = int(fields[1])
    if bad:
        raise DataError(f"celeba: {path}: rows must be 'NAME 0|1|2'; bad rows: {first_few(bad)}")
    return out


def _attribute(key: str, value, header: list[str]) -> int:
    if value not in header:
        raise ConfigError(
            f"celeba.{key}: unknown attribute {value!r}.{suggest(value, header)} Valid attributes: {', '.join(header)}."
        )
    return header.index(value)


def balanced_test_index(labels: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Positions keeping, in order, the first ``min cell count`` items of each (group, label)
    cell of a binary-label, binary-group set (the official balanced CelebA test set)."""
    cells = groups * 2 + labels
    counts = torch.bincount(cells, minlength=4)
    if counts.min() == 0:
        raise DataError(f"celeba: the test partition has an empty (group, label) cell; counts {counts.tolist()}")
    rank = torch.zeros_like(cells)
    for c in range(4):
        where = cells == c
        rank[where] = torch.arange(int(where.sum()))
    return torch.nonzero(rank < counts.min()).squeeze(1)


@DATASETS.register("celeba")
def celeba(*, root, split="train", seed=0, target="Attractive", group="Male", image_size=176,
           train_size=None, max_train=None, val_fraction=0.0, cache=False, cache_dir=None) -> ImageDataset:
    """CelebA, binary ``target`` x binary ``group`` attribute (see the module docstring).

    Options: ``target`` (class attribute; "Attractive"), ``group`` (sensitive attribute;
    "Male"), ``image_size`` (side of the squashed val/test images; 176), ``train_size`` (how
    the training images are stored: None = like the test images, an integer = squashed to that
    side, "original" = unresized, for the official RandomResizedCrop), ``max_train`` (keep at
    most this many training images; None = all), ``val_fraction`` (0: "val" is partition 1; > 0: stratified hold-out of the training
    images), ``cache`` / ``cache_dir``. ``seed`` does not change this data set.
    """
    if split != "val" or val_fraction:
        check_val_fraction("celeba", split, val_fraction)
    image_size = check_size("celeba.image_size", image_size)
    if train_size is None:
        train_side = image_size
    elif train_size == "original":
        train_side = None
    elif isinstance(train_size, int) and not isinstance(train_size, bool) and train_size >= 1:
        train_side = train_size
    else:
        raise ConfigError(f"celeba.train_size must be a positive integer (pixels), 'original' or null, got {train_size!r}")
    if max_train is not None:
        max_train = check_size("celeba.max_train", max_train)
    if target == group:
        raise ConfigError(f"celeba: target and group are both {target!r}; choose two different attributes")
    base = Path(root) / FOLDER
    layout = (f"expected {base}/{IMAGES}/*.jpg, {base}/{ATTRIBUTES} and {base}/{PARTITION} "
              f"(the aligned CelebA images and annotation files), ROOT = {root}")
    for path in (base / IMAGES, base / ATTRIBUTES, base / PARTITION):
        if not path.exists():
            raise DataError(f"celeba: {path} not found; {layout}")
    names, header, values = read_attributes(base / ATTRIBUTES)
    y_col, g_col = _attribute("target", target, header), _attribute("group", group, header)
    partition = read_partition(base / PARTITION)
    unlisted = [n for n in names if n not in partition]
    if unlisted or len(partition) != len(names):
        listed = set(names)
        extra = [n for n in partition if n not in listed]
        raise DataError(
            f"celeba: {ATTRIBUTES} and {PARTITION} list different images "
            f"({len(names)} vs {len(partition)} rows); only in {ATTRIBUTES}: {first_few(unlisted) or 'none'}; "
            f"only in {PARTITION}: {first_few(extra) or 'none'}"
        )
    part = torch.tensor([partition[n] for n in names])
    labels_all = torch.from_numpy((values[:, y_col].astype(np.int64) + 1) // 2)
    groups_all = torch.from_numpy((values[:, g_col].astype(np.int64) + 1) // 2)
    hold_out = split in ("train", "val") and bool(val_fraction)
    from_train = split == "train" or hold_out
    pick = torch.nonzero(part == (0 if from_train else PARTS[split])).squeeze(1)
    if from_train and max_train is not None and len(pick) > max_train:
        subset = torch.randperm(len(pick), generator=torch.Generator().manual_seed(SUBSET_SEED))[:max_train]
        pick = pick[torch.sort(subset).values]
    if hold_out:
        keep_train, keep_val = holdout_index(labels_all[pick], groups_all[pick], 2, val_fraction)
        pick = pick[keep_train if split == "train" else keep_val]
    if split == "test":
        pick = pick[balanced_test_index(labels_all[pick], groups_all[pick])]
    files = [names[i] for i in pick.tolist()]
    present = {p.name for p in (base / IMAGES).iterdir()}
    missing = [f for f in files if f not in present]
    if missing:
        raise DataError(f"celeba: {len(missing)} annotated image(s) are not in {base / IMAGES}: {first_few(missing)}")
    images = load_images(base / IMAGES, files, train_side if split == "train" else image_size, name=f"celeba-{split}",
                         cache_dir=cache_folder(root, cache, cache_dir))
    return ImageDataset(
        images, labels_all[pick], groups_all[pick], 2, 2, name=f"celeba-{split}",
        mean=IMAGENET_MEAN, std=IMAGENET_STD,
        class_names=[f"not {target}", target], group_names=[f"not {group}", group],
    )
