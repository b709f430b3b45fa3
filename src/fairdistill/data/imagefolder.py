"""A class-per-folder image set in the ImageNet layout, held in memory; groups from a CSV.

Layout: ``ROOT/train/CLASS/*`` and ``ROOT/val/CLASS/*`` (image files with the usual
extensions). Class names are the sorted folder names of ``train``; "test" reads ``val`` (as
ImageNet's validation set serves as its test set) and "val" is a stratified hold-out of
``train`` when ``val_fraction > 0`` (``data/split.py``). Every group is 0, unless
``group_csv`` names a CSV of image path -> sensitive attribute (``data/group_csv.py``): its
``id_column`` (default ``id``) holds the path relative to ROOT (``train/CLASS/FILE``,
``val/CLASS/FILE``) and ``group_column`` (default ``group``) the attribute, or a list of
columns whose combinations are the groups (intersectional, named ``"v1/v2"``, as ``imagecsv``).
Group numbering comes from the whole file, so both splits agree; every image of the split
must be listed.

Images: "test" and "val" get torchvision's ImageNet evaluation transform, decoded once: shorter
side to ``resize`` (256), then the centre ``image_size`` (224) square (Resize(256) +
CenterCrop(224), exactly, with Pillow). Training images are stored as the centre S x S square
of the image resized to shorter side S = ``train_size`` (default ``resize``). Nothing crops
them here: the batch pipeline does, on the device (``data/augment.py``); the OFD ImageNet
recipe is ``data.crop`` random_resized 224 + ``data.flip`` (RandomResizedCrop(224) + flip,
reference ``ofd.md`` §1.8), whose boxes are then drawn inside that square.

What this changes against the official RandomResizedCrop of the full JPEG (one stored size per
data set is what keeps the images in memory): (1) field of view: the margins of the longer
side are never seen (a quarter of the width of a 4:3 photo), and a box's area fraction is
relative to the square; (2) resolution: boxes are resampled from S pixels per side, not from
the original (a typical 500 x 375 ImageNet photo has 375: at S = 256 a box has 0.68 times the
official source pixels per side; ``train_size=384`` keeps them at 2.25 times the memory);
(3) the resampling is bilinear without Pillow's antialiasing (``data/augment.py``). A centre
square rather than a squash of the whole image keeps every box's aspect ratio true and the
training view the one the evaluation transform crops from.

Memory: 3 x 256^2 bytes = 197 kB per training image, 3 x 224^2 = 151 kB per test image. This
loader is for small ImageFolder sets (e.g. 10k images = 2 GB); ImageNet's 1.28 M training
images would need about 250 GB and do not fit in memory this way. ``cache=True`` keeps the
decoded arrays in ``cache_dir`` (default ``ROOT/.fairdistill_cache``). Normalisation: ImageNet
mean and std.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import torch

from ..errors import ConfigError, DataError
from .base import DATASETS, ImageDataset
from .imagecsv import attribute_groups, read_rows
from .images import IMAGENET_MEAN, IMAGENET_STD, cache_folder, check_size, first_few, load_images
from .split import check_val_fraction, split_positions

EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def scan(folder: Path) -> dict[str, list[str]]:
    """Class folder name -> sorted image file names (extension matched case-insensitively)."""
    return {
        d.name: sorted(f.name for f in d.iterdir() if f.is_file() and f.suffix.lower() in EXTENSIONS)
        for d in sorted(folder.iterdir()) if d.is_dir()
    }


@DATASETS.register("imagefolder")
def imagefolder(*, root, split="train", seed=0, image_size=224, resize=256, train_size=None, val_fraction=0.0,
                cache=False, cache_dir=None, group_csv: Union[str, None] = None, id_column: str = "id",
                group_column: Union[str, list[str]] = "group") -> ImageDataset:
    """ImageFolder set under ``root`` (see the module docstring).

    Options: ``image_size`` (side of evaluation images; 224), ``resize`` (shorter side before
    the evaluation crop; 256, >= ``image_size``), ``train_size`` (side of the stored training
    squares; None = ``resize``),
    ``val_fraction`` (stratified hold-out of ``train`` for "val"; 0), ``cache`` / ``cache_dir``,
    ``group_csv`` / ``id_column`` / ``group_column`` (groups from a CSV, module docstring).
    ``seed`` does not change this data set.
    """
    check_val_fraction("imagefolder", split, val_fraction)
    image_size = check_size("imagefolder.image_size", image_size)
    resize = check_size("imagefolder.resize", resize)
    train_size = resize if train_size is None else check_size("imagefolder.train_size", train_size)
    if resize < image_size:
        raise ConfigError(f"imagefolder.resize ({resize}) must be >= imagefolder.image_size ({image_size})")
    layout = f"expected ROOT/train/CLASS/*.jpg and ROOT/val/CLASS/*.jpg (ImageNet layout), ROOT = {root}"
    train_dir = Path(root) / "train"
    if not train_dir.is_dir():
        raise DataError(f"imagefolder: {train_dir} not found; {layout}")
    classes = scan(train_dir)
    if not classes:
        raise DataError(f"imagefolder: {train_dir} has no class folders; {layout}")
    empty = [c for c, files in classes.items() if not files]
    if empty:
        raise DataError(f"imagefolder: class folder(s) without images in {train_dir}: {first_few(empty)} "
                        f"(extensions read: {', '.join(EXTENSIONS)})")
    class_names = list(classes)
    folder = train_dir
    if split == "test":
        folder = Path(root) / "val"
        if not folder.is_dir():
            raise DataError(f"imagefolder: {folder} not found; {layout}")
        classes = scan(folder)
        unknown = [c for c in classes if c not in class_names]
        if unknown:
            raise DataError(f"imagefolder: class folder(s) in {folder} missing from {train_dir}: {first_few(unknown)}")
        if not any(classes.values()):
            raise DataError(f"imagefolder: no images in the class folders of {folder}; {layout}")
    files = [f"{c}/{f}" for c, names in classes.items() for f in names]
    labels = torch.tensor([class_names.index(c) for c, names in classes.items() for _ in names], dtype=torch.long)
    groups, group_names = torch.zeros_like(labels), None
    if group_csv is not None:
        groups, group_names = csv_groups(group_csv, [f"{folder.name}/{f}" for f in files], id_column, group_column)
    keep = split_positions(labels, groups, len(class_names), split, val_fraction)
    if keep is not None:
        files, labels, groups = [files[i] for i in keep.tolist()], labels[keep], groups[keep]
    side, crop = (train_size, train_size) if split == "train" else (resize, image_size)
    images = load_images(folder, files, side, crop, name=f"imagefolder-{split}",
                         cache_dir=cache_folder(root, cache, cache_dir))
    return ImageDataset(
        images, labels, groups, len(class_names), len(group_names or [0]), name=f"imagefolder-{split}",
        mean=IMAGENET_MEAN, std=IMAGENET_STD, class_names=class_names, group_names=group_names,
    )


def csv_groups(path, ids: list[str], id_column: str, group_column: str | list[str]) -> tuple[torch.Tensor, list[str]]:
    """Groups of the images ``ids`` (paths relative to ROOT) from the CSV at ``path``."""
    key = "data.options.group_csv"
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{key} must be the path of a CSV file (image path -> group), got {path!r}")
    columns = [group_column] if isinstance(group_column, str) else list(group_column)
    if not columns or len(set(columns)) != len(columns):
        raise ConfigError(f"data.options.group_column: expected a column or a non-empty list of distinct columns, "
                          f"got {group_column!r}")
    listed = read_rows(Path(path), [id_column, *columns], key, options="id_column and group_column")
    (table,), names = attribute_groups([(Path(path), listed)], columns, id_column, key)
    absent = [i for i in ids if i not in table]
    if absent:
        raise DataError(f"{key}: {len(absent)} image(s) of the data set are missing from {path}: {first_few(absent)}; "
                        f"every image needs a group (ids are paths relative to ROOT, e.g. {ids[0]!r})")
    return torch.tensor([table[i] for i in ids], dtype=torch.long), names
