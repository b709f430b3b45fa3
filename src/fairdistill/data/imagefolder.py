"""A class-per-folder image set in the ImageNet layout, held in memory; no sensitive attribute.

Layout: ``ROOT/train/CLASS/*`` and ``ROOT/val/CLASS/*`` (image files with the usual
extensions). Class names are the sorted folder names of ``train``; "test" reads ``val`` (as
ImageNet's validation set serves as its test set) and "val" is a stratified hold-out of
``train`` when ``val_fraction > 0`` (``data/split.py``). Every group is 0.

Images (torchvision's ImageNet evaluation transform): shorter side to ``resize`` (256), then
the centre ``image_size`` (224) square, for "test" and "val". Training images are stored as
the centre ``resize x resize`` square, so a batch pipeline that crops ``image_size`` without
padding can take random crops from them; the usual RandomResizedCrop needs the original
files and is not available with in-memory storage.

Memory: 3 x 256^2 bytes = 197 kB per training image, 3 x 224^2 = 151 kB per test image. This
loader is for small ImageFolder sets (e.g. 10k images = 2 GB); ImageNet's 1.28 M training
images would need about 250 GB and do not fit in memory this way. ``cache=True`` keeps the
decoded arrays in ``cache_dir`` (default ``ROOT/.fairdistill_cache``). Normalisation: ImageNet
mean and std.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError, DataError
from .base import DATASETS, ImageDataset
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
def imagefolder(*, root, split="train", seed=0, image_size=224, resize=256, val_fraction=0.0,
                cache=False, cache_dir=None) -> ImageDataset:
    """ImageFolder set under ``root`` (see the module docstring).

    Options: ``image_size`` (side of evaluation images; 224), ``resize`` (shorter side before
    cropping, and side of the stored training images; 256, >= ``image_size``),
    ``val_fraction`` (stratified hold-out of ``train`` for "val"; 0), ``cache`` / ``cache_dir``.
    ``seed`` does not change this data set.
    """
    check_val_fraction("imagefolder", split, val_fraction)
    image_size = check_size("imagefolder.image_size", image_size)
    resize = check_size("imagefolder.resize", resize)
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
    groups = torch.zeros_like(labels)
    keep = split_positions(labels, groups, len(class_names), split, val_fraction)
    if keep is not None:
        files, labels, groups = [files[i] for i in keep.tolist()], labels[keep], groups[keep]
    crop = resize if split == "train" else image_size
    images = load_images(folder, files, resize, crop, name=f"imagefolder-{split}",
                         cache_dir=cache_folder(root, cache, cache_dir))
    return ImageDataset(
        images, labels, groups, len(class_names), 1, name=f"imagefolder-{split}",
        mean=IMAGENET_MEAN, std=IMAGENET_STD, class_names=class_names,
    )
