"""Pascal VOC detection (``voc-det``): VOCdevkit folders, XML boxes with ``difficult`` flags.

Layout (reference dense.md §4): ``ROOT/VOC2007/``, ``ROOT/VOC2012/``, ... (``ROOT/VOCdevkit/VOC*``
is found too), each with ``Annotations/<id>.xml``, ``JPEGImages/<id>.jpg`` and
``ImageSets/Main/{train,val,trainval,test}.txt`` (one id per line). The default protocol is
the SSD300 one (VOC07+12): train on VOC2007 trainval + VOC2012 trainval (16,551 images), test on
VOC2007 test (4,952), 20 classes in the standard order (``VOC_CLASSES``), box labels 1..20.

Boxes: the XML corners are 1-based inclusive pixels (integers in VOC, floats in some sets); they
are converted once to continuous coordinates (x1 - 1, y1 - 1, x2, y2), in which pixel j covers
[j, j + 1) and a box's width is x2 - x1 (``fairdistill.ops.boxes``), and clipped to the image
(the decoded JPEG's size; ``<size>`` in the XML is not used).

``difficult``: evaluation splits ("test", and "val") keep every box with its flag, as VOC's
evaluation ignores difficult boxes (neither true nor false positives, not in npos). Training
drops difficult boxes by default (``keep_difficult=False``), as the SSD300 recipe does
(ssd.pytorch's ``VOCAnnotationTransform(keep_difficult=False)``); a training image left without
any box is dropped (it has nothing to match), and the count is logged. A missing
``<difficult>`` element reads as 0.

XML is read with the standard library's expat parser, refusing any document type declaration,
entity declaration or external entity (``parse_xml``): VOC files have none, and refusing them is
what ``defusedxml``'s ``forbid_dtd=True`` does, so a file a user hands in cannot expand entities
("billion laughs") or make the parser read other files or URLs. defusedxml is not a dependency;
this one rule, applied here, covers the attacks it guards against for these files.

Memory: images are kept as decoded, uint8, one (3, H_i, W_i) tensor each; VOC07+12 trainval
is about 16,551 x 3 x 500 x 375 bytes = 9.3 GB, the VOC2007 test set 2.8 GB. ``max_size``
stores each image with its longer side at most that many pixels (boxes scaled alike).
Normalisation: ImageNet mean and std. Groups: ``group_csv`` (image id -> group,
``data/group_csv.py``; ids are the VOC ids, e.g. ``000005`` or ``2008_000008``), else all 0.
"""
from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated
from xml.parsers import expat

import numpy as np
import torch

from ..errors import ConfigError, DataError
from ..registry import Range
from .base import DATASETS
from .dense import DenseDataset, builds
from .group_csv import read_group_csv
from .images import IMAGENET_MEAN, IMAGENET_STD, first_few, pil, read_errors
from .split import check_val_fraction, split_positions

log = logging.getLogger(__name__)

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)
DEFAULT_TRAIN_SETS = (("VOC2007", "trainval"), ("VOC2012", "trainval"))
DEFAULT_TEST_SETS = (("VOC2007", "test"),)
CORNERS = ("xmin", "ymin", "xmax", "ymax")


# --------------------------------------------------------------------------- safe XML
class _Refused(Exception):
    pass


def parse_xml(data: bytes, source: str) -> ET.Element:
    """The root element of XML ``data``; a DataError naming ``source`` when it is not
    well-formed or holds a document type declaration, an entity declaration or an external
    entity (module docstring)."""
    builder = ET.TreeBuilder()
    parser = expat.ParserCreate()

    def refuse(what):
        def handler(*_):
            raise _Refused(what)
        return handler

    parser.StartDoctypeDeclHandler = refuse("a document type declaration (<!DOCTYPE ...>)")
    parser.EntityDeclHandler = refuse("an entity declaration (<!ENTITY ...>)")
    parser.UnparsedEntityDeclHandler = refuse("an unparsed entity declaration")
    parser.ExternalEntityRefHandler = refuse("an external entity reference")
    parser.StartElementHandler = builder.start
    parser.EndElementHandler = builder.end
    parser.CharacterDataHandler = builder.data
    parser.buffer_text = True
    try:
        parser.Parse(data, True)
    except _Refused as err:
        raise DataError(f"{source}: holds {err}, which annotation files do not need; it is refused so "
                        f"that a file cannot expand entities or read other files") from None
    except expat.ExpatError as err:
        raise DataError(f"{source}: not well-formed XML ({err})") from None
    return builder.close()


# --------------------------------------------------------------------------- annotations
def parse_annotation(data: bytes, source: str, class_index: dict[str, int]):
    """``(boxes, labels, difficult)`` of one VOC annotation: float32 (K, 4) continuous
    (x1 - 1, y1 - 1, x2, y2), int64 (K,) in 1..C (``class_index`` maps lower-case names to
    them) and bool (K,), for the ``<object>`` children of ``<annotation>`` in file order.
    Errors name ``source``, the object and the element."""
    root = parse_xml(data, source)
    if root.tag != "annotation":
        raise DataError(f"{source}: the root element is <{root.tag}>; expected <annotation>")
    boxes, labels, difficult = [], [], []
    for k, obj in enumerate(root.findall("object"), start=1):
        name = (obj.findtext("name") or "").strip().lower()
        where = f"{source}: <object> {k} (<name>{name}</name>)"
        if name not in class_index:
            raise DataError(f"{where}: unknown class name; expected one of {', '.join(class_index)}")
        flag = (obj.findtext("difficult") or "0").strip()
        if flag not in ("0", "1"):
            raise DataError(f"{where}: <difficult> is {flag!r}; expected 0 or 1")
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise DataError(f"{where}: has no <bndbox>")
        corners = []
        for tag in CORNERS:
            text = bndbox.findtext(tag)
            try:
                corners.append(float(text))
            except (TypeError, ValueError):
                got = "is missing" if text is None else f"is {text.strip()!r}"
                raise DataError(f"{where}: <bndbox><{tag}> {got}; expected a number") from None
        x1, y1, x2, y2 = corners
        if not all(np.isfinite(corners)) or x2 < x1 or y2 < y1:
            raise DataError(f"{where}: <bndbox> ({x1:g}, {y1:g}, {x2:g}, {y2:g}) is not a box; expected "
                            f"1-based inclusive corners with xmin <= xmax and ymin <= ymax")
        boxes.append((x1 - 1.0, y1 - 1.0, x2, y2))
        labels.append(class_index[name])
        difficult.append(flag == "1")
    return (torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(labels, dtype=torch.long),
            torch.tensor(difficult, dtype=torch.bool))


# --------------------------------------------------------------------------- images (also coco-det)
def decode_images(paths: Sequence[Path], *, name: str, max_size: int | None = None,
                  workers: int | None = None) -> tuple[list[torch.Tensor], list[tuple[float, float]]]:
    """Decode ``paths`` as RGB into uint8 (3, H_i, W_i) tensors, in a thread pool (Pillow
    releases the GIL); with ``max_size`` an image whose longer side exceeds it is resized
    (bilinear, Pillow's antialiasing) to a longer side of ``max_size``, aspect kept.

    Returns the images and per image the (x, y) factor its boxes must be scaled by (1.0 when
    kept as is). EXIF orientation is not applied: annotations refer to the stored pixels.
    Missing or unreadable files give one DataError naming the first few.
    """
    images: list[torch.Tensor | None] = [None] * len(paths)
    scales: list[tuple[float, float]] = [(1.0, 1.0)] * len(paths)

    def work(i: int) -> str | None:
        try:
            with pil().open(paths[i]) as im:
                im = im.convert("RGB")
                w, h = im.size
                if max_size is not None and max(w, h) > max_size:
                    s = max_size / max(w, h)
                    nw, nh = max(1, round(w * s)), max(1, round(h * s))
                    im = im.resize((nw, nh), pil().BILINEAR)
                    scales[i] = (nw / w, nh / h)
                images[i] = torch.from_numpy(np.asarray(im).transpose(2, 0, 1).copy())
        except read_errors() as err:
            return f"{paths[i]} ({type(err).__name__}: {err})"
        return None

    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        failed = [msg for msg in pool.map(work, range(len(paths))) if msg is not None]
    if failed:
        raise DataError(f"{name}: {len(failed)} image file(s) could not be read: {first_few(failed)}")
    return images, scales


def fit_boxes(images, boxes, scales, keep_masks, *, name: str, ids: Sequence[str]):
    """Scale each image's boxes by its decode factor, clip them to the image, and return, per
    image, the positions of the boxes kept: those selected by ``keep_masks`` that still have a
    positive width and height. Boxes lost to clipping (lying outside their image) are logged."""
    fitted, kept, outside = [], [], []
    for i, (im, b, (sx, sy), m) in enumerate(zip(images, boxes, scales, keep_masks)):
        h, w = im.shape[1:]
        b = (b * b.new_tensor([sx, sy, sx, sy])).clamp_(min=0.0)
        b = torch.minimum(b, b.new_tensor([w, h, w, h], dtype=b.dtype))
        ok = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
        if not bool(ok.all()):
            outside.append(ids[i])
        fitted.append(b)
        kept.append(torch.nonzero(ok & m).flatten())
    if outside:
        log.warning("%s: %d image(s) have boxes outside the image, which were dropped: %s",
                    name, len(outside), first_few(outside))
    return fitted, kept


def check_sets(value, key: str) -> list[tuple[str, str]]:
    """``value`` as a list of (folder, image set) pairs of strings, or a ConfigError."""
    pairs = []
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{key}: expected a non-empty list of [folder, image set] pairs such as "
                          f"[[VOC2007, trainval], [VOC2012, trainval]], got {value!r}")
    for item in value:
        if (not isinstance(item, (list, tuple)) or len(item) != 2
                or not all(isinstance(s, str) and s and "/" not in s and "\\" not in s and s not in (".", "..")
                           for s in item)):
            raise ConfigError(f"{key}: {item!r} is not a [folder, image set] pair of names such as [VOC2007, test]")
        pairs.append((item[0], item[1]))
    return pairs


def devkit_folder(root) -> Path:
    """``root``, or ``root/VOCdevkit`` when the VOC folders are one level down there."""
    root = Path(root)
    inner = root / "VOCdevkit"
    if inner.is_dir() and not any(p.name.startswith("VOC") and p.is_dir() and p != inner for p in root.iterdir()):
        return inner
    return root


def read_ids(devkit: Path, folder: str, image_set: str) -> list[str]:
    """The ids of ``devkit/folder/ImageSets/Main/image_set.txt`` (first field of each line)."""
    path = devkit / folder / "ImageSets" / "Main" / f"{image_set}.txt"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"voc-det: image list {path} not found; expected ROOT/{folder}/ImageSets/Main/"
                        f"{image_set}.txt under ROOT = {devkit} (a VOCdevkit folder)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"voc-det: cannot read the image list {path} ({type(err).__name__}: {err})") from None
    ids = [line.split()[0] for line in lines if line.strip()]
    if not ids:
        raise DataError(f"voc-det: image list {path} is empty")
    return ids


def read_annotations(devkit: Path, sets: Sequence[tuple[str, str]]):
    """``(ids, folders, boxes, labels, difficult)`` of every image of ``sets``, in list order."""
    class_index = {c: k for k, c in enumerate(VOC_CLASSES, start=1)}
    ids, folders, boxes, labels, difficult = [], [], [], [], []
    seen: dict[str, str] = {}
    for folder, image_set in sets:
        for image_id in read_ids(devkit, folder, image_set):
            where = f"{folder}/{image_set}"
            if image_id in seen:
                raise DataError(f"voc-det: image {image_id!r} is listed twice, in {seen[image_id]} and {where}; "
                                f"the training or test sets must not overlap")
            seen[image_id] = where
            path = devkit / folder / "Annotations" / f"{image_id}.xml"
            try:
                data = path.read_bytes()
            except OSError as err:
                raise DataError(f"voc-det: annotation {path} of {where} cannot be read "
                                f"({type(err).__name__}: {err})") from None
            b, y, d = parse_annotation(data, str(path), class_index)
            ids.append(image_id)
            folders.append(folder)
            boxes.append(b)
            labels.append(y)
            difficult.append(d)
    return ids, folders, boxes, labels, difficult


def build_detection(*, source: str, split: str, ids, paths, boxes, labels, difficult, trainable, groups,
                    group_names, val_fraction: float, max_size: int | None, class_names):
    """Assemble the DenseDataset of ``split`` from per-image annotations (shared with coco-det).

    ``trainable`` (per image, bool (K,)): the boxes a training split keeps; evaluation splits
    keep all with their ``difficult`` flags. ``groups`` (N,) and ``group_names`` (None: one
    group) come from ``read_groups``. "train"/"val" are the stratified hold-out of
    ``data/split.py`` over the groups (positions computed before any image is decoded); a
    training image left without boxes is dropped.
    """
    num_groups = len(group_names) if group_names is not None else 1
    keep = split_positions(torch.zeros(len(ids), dtype=torch.long), groups, 1, split, val_fraction)
    pick = list(range(len(ids))) if keep is None else keep.tolist()
    name = f"{source}-{split}"
    images, scales = decode_images([paths[i] for i in pick], name=name, max_size=max_size)
    masks = [trainable[i] if split == "train" else torch.ones_like(trainable[i]) for i in pick]
    fitted, kept = fit_boxes(images, [boxes[i] for i in pick], scales, masks, name=name, ids=[ids[i] for i in pick])
    rows = [j for j in range(len(pick)) if split != "train" or kept[j].numel()]
    if len(rows) < len(pick):
        log.info("%s: %d training image(s) without a box to train on were dropped", name, len(pick) - len(rows))
    sel = [pick[j] for j in rows]
    return DenseDataset(
        [images[j] for j in rows], groups[sel], len(class_names), num_groups, task="detection", name=name,
        boxes=[fitted[j][kept[j]] for j in rows], box_labels=[labels[pick[j]][kept[j]] for j in rows],
        difficult=[difficult[pick[j]][kept[j]] for j in rows], mean=IMAGENET_MEAN, std=IMAGENET_STD,
        class_names=class_names, group_names=group_names, ids=[ids[i] for i in sel],
    )


def read_groups(group_csv: str | None, ids: Sequence[str], key: str):
    """``(groups, group_names)`` from ``group_csv`` (``read_group_csv``), or all 0 and None (one group)."""
    if group_csv is None:
        return torch.zeros(len(ids), dtype=torch.long), None
    return read_group_csv(group_csv, ids, key)


@DATASETS.register("voc-det")
@builds("detection")
def voc_det(*, root, split: str = "train", seed: int = 0, train_sets: list[list[str]] | None = None,
            test_sets: list[list[str]] | None = None, keep_difficult: bool = False, group_csv: str | None = None,
            max_size: Annotated[int, Range(ge=1)] | None = None,
            val_fraction: Annotated[float, Range(ge=0, lt=1)] = 0.0) -> DenseDataset:
    """Pascal VOC detection under the VOCdevkit folder ``root`` (module docstring).

    Options: ``train_sets`` (list of [folder, image set] pairs; None = [[VOC2007, trainval],
    [VOC2012, trainval]]), ``test_sets`` (None = [[VOC2007, test]]), ``keep_difficult`` (keep
    difficult boxes, flagged, in training; False, the SSD practice), ``group_csv`` (CSV of image
    id -> group; None: one group), ``max_size`` (longer side at most this many pixels; None:
    as stored), ``val_fraction`` (stratified hold-out of the training sets for "val"; 0).
    ``seed`` does not change this data set.
    """
    check_val_fraction("voc-det", split, val_fraction)
    train = check_sets(DEFAULT_TRAIN_SETS if train_sets is None else train_sets, "data.options.train_sets")
    test = check_sets(DEFAULT_TEST_SETS if test_sets is None else test_sets, "data.options.test_sets")
    devkit = devkit_folder(root)
    if not devkit.is_dir():
        raise DataError(f"voc-det: folder {devkit} not found; expected ROOT/VOC2007/... (a VOCdevkit folder), "
                        f"ROOT = {root}")
    ids, folders, boxes, labels, difficult = read_annotations(devkit, test if split == "test" else train)
    groups, group_names = read_groups(group_csv, ids, "data.options.group_csv")
    trainable = [torch.ones_like(d) if keep_difficult else ~d for d in difficult]
    paths = [devkit / f / "JPEGImages" / f"{i}.jpg" for f, i in zip(folders, ids)]
    return build_detection(
        source="voc-det", split=split, ids=ids, paths=paths, boxes=boxes, labels=labels, difficult=difficult,
        trainable=trainable, groups=groups, group_names=group_names, val_fraction=val_fraction,
        max_size=max_size, class_names=VOC_CLASSES,
    )
