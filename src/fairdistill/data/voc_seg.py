"""Pascal VOC 2012 semantic segmentation, with SBD or SegmentationClassAug for training.

``root`` is the ``VOC2012`` folder (reference ``dense.md`` §4): ``JPEGImages/<id>.jpg`` (RGB),
``SegmentationClass/<id>.png`` (palette PNGs whose indices are the classes: 0 background, 1-20
aeroplane ... tvmonitor, 255 void) and ``ImageSets/Segmentation/{train,val}.txt`` (one id per
line). Splits:

- "test": the VOC ``val`` list (1,449 images), the set the official code validates on;
- "train": the VOC ``train`` list (1,464 images), or with ``sbd_root`` the official training
  set: VOC train ∪ SBD train ∪ SBD val − VOC val, an id in both read from VOC (10,582 images
  with the real data; order: VOC train, then the new SBD train, then the new SBD val ids, as
  the official ``CombineDBs``), or with ``trainaug=True`` the DeepLab/mmseg list
  ``ImageSets/Segmentation/<aug_list>`` with masks ``SegmentationClassAug/<id>.png`` (mode-L
  PNGs of class indices), any VOC val id removed;
- "val": with ``val_fraction > 0``, a stratified hold-out of "train" (``data/split.py``; the
  cells are the groups, since VOC has no image-level label), taken before any decoding.

SBD (``sbd_root`` = ``benchmark_RELEASE/dataset``): ``img/<id>.jpg``, ``cls/<id>.mat`` read as
the official code does, ``scipy.io.loadmat(f)["GTcls"][0]["Segmentation"][0]`` (uint8, 0-20,
no void), lists ``train.txt`` / ``val.txt``. scipy is imported only here.

Groups: ``group_csv`` (image id -> group, ``data/group_csv.py``; columns ``id_column`` /
``group_column``), else one group. Images keep their size (a list of uint8 tensors on the CPU,
masks likewise), about 0.56 MB + 0.19 MB per image: 8 GB for the 10,582 training images,
1.1 GB for val. ``cache=True`` stores the decoded arrays in ``cache_dir`` (default
``ROOT/.fairdistill_cache``), keyed by the file list. Normalisation: ImageNet mean and std.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .base import DATASETS
from .dense import DenseDataset, builds
from .group_csv import read_group_csv
from .images import IMAGENET_MEAN, IMAGENET_STD, cache_folder, first_few, pil, read_errors, write_image_cache
from .split import check_val_fraction, split_positions

log = logging.getLogger(__name__)

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
LISTS = "ImageSets/Segmentation"
CACHE_FORMAT = 1


def read_list(path: Path, what: str) -> list[str]:
    """Ids of a list file, in order, repeats dropped, blank lines skipped; DataError if missing.

    A line is an id (``2007_000032``) or, as DeepLab's ``train_aug.txt``, an image path and a
    mask path, of which the first path's file stem is the id."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise DataError(f"voc-seg: {what} list {path} not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"voc-seg: cannot read the {what} list {path} ({err})") from None
    ids = []
    for line in lines:
        fields = line.split()
        if fields:
            ids.append(Path(fields[0]).stem if "/" in fields[0] or "." in fields[0] else fields[0])
    return list(dict.fromkeys(ids))


def read_png_mask(path: Path) -> np.ndarray:
    """Class indices of a palette (mode P) or grayscale (mode L) PNG, as ``np.array(Image.open(f))``."""
    with pil().open(path) as im:
        if im.mode not in ("P", "L"):
            raise ValueError(f"mode {im.mode}: expected a palette (P) or grayscale (L) PNG of class indices, "
                             f"not a colour-coded mask")
        return np.array(im)


def read_sbd_mask(path: Path) -> np.ndarray:
    """The ``GTcls.Segmentation`` array of an SBD ``cls/*.mat`` file, read as the official code."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DataError("voc-seg: reading SBD .mat masks needs scipy; install it (pip install scipy)") from None
    try:
        content = loadmat(str(path))
    except FileNotFoundError:
        raise
    except Exception as err:  # scipy's MatReadError and friends: a damaged or non-MATLAB file
        raise ValueError(f"not a readable MATLAB file ({type(err).__name__}: {err})") from None
    try:
        seg = content["GTcls"][0]["Segmentation"][0]
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise ValueError(f"no GTcls.Segmentation ({type(err).__name__}: {err})") from None
    return np.asarray(seg)


MASK_READERS = {"png": read_png_mask, "mat": read_sbd_mask}


def decode_pair(image_path: Path, mask_path: Path, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 (3, H, W) image, uint8 (H, W) mask); ValueError/OSError with the reason otherwise."""
    with pil().open(image_path) as im:
        rgb = np.asarray(im.convert("RGB"))
    mask = MASK_READERS[kind](mask_path)
    if mask.ndim != 2:
        raise ValueError(f"{mask_path}: mask of shape {mask.shape}, expected (H, W)")
    if mask.shape != rgb.shape[:2]:
        raise ValueError(f"{mask_path} is {mask.shape[1]}x{mask.shape[0]} but {image_path} is "
                         f"{rgb.shape[1]}x{rgb.shape[0]} (W x H)")
    if mask.dtype != np.uint8:
        if mask.min() < 0 or mask.max() > 255:
            raise ValueError(f"{mask_path}: mask values outside 0..255")
        mask = mask.astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))), torch.from_numpy(np.ascontiguousarray(mask))


def decode_all(items: Sequence[tuple[Path, Path, str]], name: str, workers: int | None = None):
    """Decode every (image, mask, kind) in a thread pool; one DataError naming the first failures."""

    def work(item):
        try:
            return decode_pair(*item), None
        except FileNotFoundError as err:
            return None, f"missing file {err.filename}"
        except read_errors() as err:
            return None, f"{item[0].name} / {item[1]} ({type(err).__name__}: {err})"

    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        results = list(pool.map(work, items))
    failed = [msg for _, msg in results if msg is not None]
    if failed:
        raise DataError(f"{name}: {len(failed)} image/mask pair(s) could not be read: {first_few(failed)}")
    return [r[0][0] for r in results], [r[0][1] for r in results]


def _cache_file(cache_dir: Path, name: str, items) -> Path:
    key = json.dumps({"format": CACHE_FORMAT, "items": [[str(Path(a).resolve()), str(Path(b).resolve()), k] for a, b, k in items]})
    return Path(cache_dir) / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt"


def load_pairs(items, name: str, cache_dir: Path | None):
    """Decoded images and masks of ``items``, through the cache file when ``cache_dir`` is set
    (flat uint8 buffers + shapes, written atomically; an unreadable cache is rebuilt)."""
    target = _cache_file(cache_dir, name, items) if cache_dir is not None else None
    if target is not None and target.exists():
        try:
            blob = torch.load(target, weights_only=True)
            shapes = blob["shapes"]
            if shapes.shape == (len(items), 2):
                sizes = (shapes[:, 0] * shapes[:, 1]).tolist()
                images = [t.view(3, h, w) for t, (h, w) in zip(blob["images"].split([3 * s for s in sizes]), shapes.tolist())]
                masks = [t.view(h, w) for t, (h, w) in zip(blob["masks"].split(sizes), shapes.tolist())]
                return images, masks
            log.warning("%s: cache %s holds unexpected data; decoding the images again", name, target)
        except (OSError, RuntimeError, EOFError, KeyError, pickle.UnpicklingError) as err:
            log.warning("%s: cache %s is unreadable (%s); decoding the images again", name, target, err)
    images, masks = decode_all(items, name)
    if target is not None:
        blob = {"shapes": torch.tensor([tuple(m.shape) for m in masks], dtype=torch.long).view(-1, 2),
                "images": torch.cat([i.reshape(-1) for i in images]) if images else torch.zeros(0, dtype=torch.uint8),
                "masks": torch.cat([m.reshape(-1) for m in masks]) if masks else torch.zeros(0, dtype=torch.uint8)}
        write_image_cache(target, blob, name)
    return images, masks


def combine_sbd(voc_train: Sequence[str], voc_val: Sequence[str], sbd_ids: Sequence[str]) -> list[tuple[str, str]]:
    """(id, source) of the official training set: VOC train, then SBD train + val ids not seen
    yet, minus VOC val; an id in VOC train is read from VOC (``CombineDBs``)."""
    excluded, seen, out = set(voc_val), set(), []
    for source, ids in (("voc", voc_train), ("sbd", sbd_ids)):
        for i in ids:
            if i not in seen and i not in excluded:
                seen.add(i)
                out.append((i, source))
    return out


def check_folder(path: Path, what: str, expected: str) -> Path:
    if not path.is_dir():
        raise DataError(f"voc-seg: {what} folder {path} not found; {expected}")
    return path


@DATASETS.register("voc-seg")
@builds("segmentation")
def voc_seg(*, root: str, split: str = "train", seed: int = 0, sbd_root: str | None = None, trainaug: bool = False,
            aug_list: str = "trainaug.txt", group_csv: str | None = None, id_column: str = "id",
            group_column: str = "group", val_fraction: float = 0.0, cache: bool = False,
            cache_dir: str | None = None) -> DenseDataset:
    """Pascal VOC 2012 segmentation (see the module docstring).

    Options: ``sbd_root`` (SBD's ``benchmark_RELEASE/dataset`` folder: train on the official
    VOC+SBD set), ``trainaug`` (train on ``SegmentationClassAug`` with the list ``aug_list``,
    default ``trainaug.txt``), ``group_csv`` / ``id_column`` / ``group_column`` (the group of
    each image), ``val_fraction`` (hold-out of "train" for "val"), ``cache`` / ``cache_dir``.
    ``seed`` does not change this data set.
    """
    check_val_fraction("voc-seg", split, val_fraction)
    if sbd_root is not None and trainaug:
        raise ConfigError("data.options: sbd_root and trainaug are two ways to build the same augmented "
                          "training set; set one of them")
    if not isinstance(trainaug, bool):
        raise ConfigError(f"data.options.trainaug must be true or false, got {trainaug!r}")
    root = Path(root)
    layout = ("expected the VOC2012 folder of VOCdevkit as data.root, holding JPEGImages/, SegmentationClass/ "
              f"and {LISTS}/{{train,val}}.txt")
    check_folder(root, "data root", layout)
    jpeg = check_folder(root / "JPEGImages", "JPEGImages", layout)
    voc_masks = root / "SegmentationClass"
    voc_val = read_list(root / LISTS / "val.txt", "VOC val")
    if split == "test":
        check_folder(voc_masks, "SegmentationClass", layout)
        entries = [(i, "voc") for i in voc_val]
    elif sbd_root is not None:
        check_folder(voc_masks, "SegmentationClass", layout)
        sbd = check_folder(Path(sbd_root), "SBD (data.options.sbd_root)",
                           "expected benchmark_RELEASE/dataset holding img/, cls/, train.txt and val.txt")
        sbd_ids = read_list(sbd / "train.txt", "SBD train") + read_list(sbd / "val.txt", "SBD val")
        entries = combine_sbd(read_list(root / LISTS / "train.txt", "VOC train"), voc_val, sbd_ids)
    elif trainaug:
        check_folder(root / "SegmentationClassAug", "SegmentationClassAug",
                     "expected ROOT/SegmentationClassAug/<id>.png (mode-L class-index PNGs) for trainaug=true")
        ids = read_list(root / LISTS / str(aug_list), "trainaug (data.options.aug_list)")
        val_set = set(voc_val)
        leaked = [i for i in ids if i in val_set]
        if leaked:
            log.warning("voc-seg: removed %d VOC val id(s) from %s (they are the test set)", len(leaked), aug_list)
        entries = [(i, "aug") for i in ids if i not in val_set]
    else:
        check_folder(voc_masks, "SegmentationClass", layout)
        entries = [(i, "voc") for i in read_list(root / LISTS / "train.txt", "VOC train")]
    if not entries:
        raise DataError(f"voc-seg: the {split} split of {root} has no images")
    ids = [i for i, _ in entries]
    if group_csv is not None:
        groups, group_names = read_group_csv(group_csv, ids, "data.options.group_csv",
                                             id_column=id_column, group_column=group_column)
    else:
        groups, group_names = torch.zeros(len(ids), dtype=torch.long), None
    keep = split_positions(torch.zeros(len(ids), dtype=torch.long), groups, 1, split, val_fraction)
    if keep is not None:
        entries, groups = [entries[i] for i in keep.tolist()], groups[keep]
        ids = [i for i, _ in entries]
    where = {"voc": (jpeg, voc_masks, ".png", "png"), "aug": (jpeg, root / "SegmentationClassAug", ".png", "png")}
    if sbd_root is not None:
        where["sbd"] = (Path(sbd_root) / "img", Path(sbd_root) / "cls", ".mat", "mat")
    items = [(where[s][0] / f"{i}.jpg", where[s][1] / f"{i}{where[s][2]}", where[s][3]) for i, s in entries]
    name = f"voc-seg-{split}"
    images, masks = load_pairs(items, name, cache_folder(root, cache, cache_dir))
    return DenseDataset(images, groups, len(VOC_CLASSES), len(group_names or [0]), task="segmentation", name=name,
                        masks=masks, mean=IMAGENET_MEAN, std=IMAGENET_STD, class_names=VOC_CLASSES,
                        group_names=group_names, ids=ids)
