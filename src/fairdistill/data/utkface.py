"""UTKFace as in the MFD paper: age bin as the class, race as the group (reference ``mfd.md`` §2.2).

Layout: ``ROOT/UTKFace/*.jpg``, the "Aligned & Cropped Faces" named
``AGE_GENDER_RACE_DATETIME.jpg.chip.jpg``. Names that do not split into exactly four fields on
"_" (a few real files lack one) are skipped, with one warning giving their number; race 4
("Others") is dropped. Class = age bin (0: < 20, 1: 20-39, 2: >= 40); group = race (0 White,
1 Black, 2 Asian, 3 Indian).

The split is fixed, independent of ``seed``, as the official code: names in natural order,
shuffled by ``random.Random(1)``; walking that list backwards, the first ``test_per_cell``
images of every (race, age-bin) cell form the test set (100 x 4 x 3 = 1,200, balanced), the
rest the training set. ``val_fraction > 0`` holds out a stratified part of the training set
(``data/split.py``).

Images: the official code trains on Resize(256, 256) -> RandomCrop(176) -> flip and tests on
Resize(176, 176) (reference ``mfd.md`` §2.2). Test and val images are stored squashed to
``image_size`` (176), exactly the official test transform. ``resize=256`` stores the training
images squashed to 256 x 256 (the official Resize, done once with Pillow as torchvision does);
the batch pipeline's ``random`` 176 crop and flip (``data.crop``, ``data.flip``;
``data/augment.py``) then give the official training images pixel for pixel (with the same
Pillow), only from another random stream. Without ``resize`` the training images are stored
like the test images (176), for flips only, as before. Memory: about 20,800 training images x
3 x 176^2 bytes = 1.9 GB (4.1 GB at 256); ``cache=True`` keeps the decoded arrays in
``cache_dir`` (default ``ROOT/.fairdistill_cache``). Normalisation: ImageNet mean and std.
"""
from __future__ import annotations

import logging
import random
import re
from pathlib import Path

import torch

from ..errors import DataError
from .base import DATASETS, ImageDataset
from .images import IMAGENET_MEAN, IMAGENET_STD, cache_folder, check_size, first_few, load_images
from .split import check_val_fraction, split_positions

log = logging.getLogger(__name__)

FOLDER = "UTKFace"
RACES = ("White", "Black", "Asian", "Indian")
AGE_BINS = ("age<20", "age20-39", "age>=40")
OTHERS = 4
SPLIT_SEED = 1


def age_bin(age: int) -> int:
    """0 below 20, 1 from 20 to 39, 2 from 40 on."""
    return 0 if age < 20 else 1 if age < 40 else 2


def natural_key(name: str) -> tuple:
    """Sort key comparing digit runs as numbers ("9_..." before "10_..."), like natsort."""
    parts = re.split(r"(\d+)", name)
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), name


def parse_names(names: list[str]) -> tuple[list[str], list[int], list[int], int]:
    """``(kept names, age bins, races, skipped)``: names without exactly four "_" fields are
    skipped, race 4 dropped; a four-field name with a non-integer or invalid age or race is a
    DataError."""
    kept, bins, races, skipped, bad = [], [], [], 0, []
    for name in names:
        fields = name.split("_")
        if len(fields) != 4:
            skipped += 1
            continue
        try:
            age, race = int(fields[0]), int(fields[2])
        except ValueError:
            bad.append(name)
            continue
        if age < 0 or not 0 <= race <= OTHERS:
            bad.append(name)
            continue
        if race == OTHERS:
            continue
        kept.append(name)
        bins.append(age_bin(age))
        races.append(race)
    if bad:
        raise DataError(
            f"utkface: {len(bad)} file name(s) do not read as AGE_GENDER_RACE_DATETIME.jpg.chip.jpg "
            f"with an integer age >= 0 and race 0-4: {first_few(bad)}"
        )
    return kept, bins, races, skipped


def fixed_split(names: list[str], bins: list[int], races: list[int], test_per_cell: int):
    """Positions ``(train, test)`` into the natural-sorted lists, in the official order: shuffle
    with ``random.Random(1)``; test = the first ``test_per_cell`` of each (race, bin) cell met
    walking the shuffled list backwards (in that walk order); train = the rest, shuffled order."""
    order = sorted(range(len(names)), key=lambda i: natural_key(names[i]))
    random.Random(SPLIT_SEED).shuffle(order)
    taken: dict[tuple[int, int], int] = {}
    test = []
    for i in reversed(order):
        cell = (races[i], bins[i])
        taken[cell] = taken.get(cell, 0) + 1
        if taken[cell] <= test_per_cell:
            test.append(i)
    in_test = set(test)
    return [i for i in order if i not in in_test], test


@DATASETS.register("utkface")
def utkface(*, root, split="train", seed=0, image_size=176, resize=None, test_per_cell=100,
            val_fraction=0.0, cache=False, cache_dir=None) -> ImageDataset:
    """UTKFace, 3 age bins x 4 races (see the module docstring).

    Options: ``image_size`` (side of test/val images and, by default, of training images;
    176), ``resize`` (side the training images are stored at, None = ``image_size``; 256 for
    the official Resize(256) + RandomCrop(176)),
    ``test_per_cell`` (test images per (race, age-bin) cell; 100), ``val_fraction`` (stratified
    hold-out of the training set for "val"; 0), ``cache`` / ``cache_dir`` (keep the decoded
    images on disk). ``seed`` does not change this data set.
    """
    check_val_fraction("utkface", split, val_fraction)
    image_size = check_size("utkface.image_size", image_size)
    train_side = image_size if resize is None else check_size("utkface.resize", resize)
    test_per_cell = check_size("utkface.test_per_cell", test_per_cell)
    folder = Path(root) / FOLDER
    if not folder.is_dir():
        raise DataError(
            f"utkface: folder {folder} not found; expected ROOT/{FOLDER}/*.jpg with names like "
            f"AGE_GENDER_RACE_DATETIME.jpg.chip.jpg (the 'Aligned & Cropped Faces' set), ROOT = {root}"
        )
    names, bins, races, skipped = parse_names([p.name for p in folder.iterdir() if p.name.endswith(".jpg")])
    if skipped:
        log.warning("utkface: skipped %d file name(s) without exactly four '_'-separated fields", skipped)
    counts = torch.zeros(len(RACES), len(AGE_BINS), dtype=torch.long)
    for r, b in zip(races, bins):
        counts[r, b] += 1
    short = [f"{RACES[r]}/{AGE_BINS[b]}: {int(counts[r, b])}" for r in range(len(RACES))
             for b in range(len(AGE_BINS)) if counts[r, b] <= test_per_cell]
    if short:
        raise DataError(
            f"utkface: every (race, age-bin) cell needs more than test_per_cell={test_per_cell} images "
            f"in {folder} to leave some for training; too few in {', '.join(short)}. "
            f"Check the folder or lower test_per_cell."
        )
    train, test = fixed_split(names, bins, races, test_per_cell)
    pick = test if split == "test" else train
    labels = torch.tensor([bins[i] for i in pick], dtype=torch.long)
    groups = torch.tensor([races[i] for i in pick], dtype=torch.long)
    keep = split_positions(labels, groups, len(AGE_BINS), split, val_fraction)
    if keep is not None:
        pick, labels, groups = [pick[i] for i in keep.tolist()], labels[keep], groups[keep]
    side = train_side if split == "train" else image_size
    images = load_images(folder, [names[i] for i in pick], side, name=f"utkface-{split}",
                         cache_dir=cache_folder(root, cache, cache_dir))
    return ImageDataset(
        images, labels, groups, len(AGE_BINS), len(RACES), name=f"utkface-{split}",
        mean=IMAGENET_MEAN, std=IMAGENET_STD, class_names=AGE_BINS, group_names=RACES,
    )
