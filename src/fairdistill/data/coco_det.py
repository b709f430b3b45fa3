"""COCO-style detection (``coco-det``): an instances json and a folder of images.

Format (reference dense.md §4): a json object with ``images`` (``{id, file_name, ...}``),
``annotations`` (``{id, image_id, category_id, bbox: [x, y, w, h], iscrowd}``; the box's
top-left corner and size in 0-based continuous pixels, floats) and ``categories``
(``{id, name}``, ids not contiguous: 1..90 for COCO's 80). Categories are numbered 1..C in
increasing id order (the box labels; 0 is the model's background), with their names as class
names; a split uses the categories of its own file (COCO's train and val files list the same 80).

Boxes become (x, y, x + w, y + h), clipped to the image (the decoded file's size, not the json's
``width``/``height``); a box with no area inside its image is dropped, and the count is logged.
``iscrowd`` boxes (a region of many objects) are dropped from training and kept in evaluation
splits with ``difficult=True``: VOC-style evaluation then neither rewards nor punishes a
detection matched to them and does not count them as objects to find, the analogue of
COCOeval ignoring crowd regions (COCOeval matches a detection to a crowd region by the part of
the detection inside it, where a difficult box matches by IoU, so the two can differ slightly).
Training images without a box left are dropped; evaluation splits keep every image of the json.

The json is read with ``json.load`` (data only, no code). ``file_name`` must be a relative path
inside the images folder. Image ids, as strings, are the data set's ``ids`` (group CSV keys).
Memory and normalisation as ``voc-det`` (uint8 images as stored, or ``max_size``; ImageNet mean
and std).
"""
from __future__ import annotations

import json
import math
from pathlib import Path, PurePosixPath
from typing import Annotated

import torch

from ..errors import DataError
from ..registry import Range
from .base import DATASETS
from .dense import DenseDataset, builds
from .split import check_val_fraction
from .voc_det import build_detection, read_groups


def _fail(source: str, where: str, what: str) -> DataError:
    return DataError(f"{source}: {where} {what}")


def _records(doc: dict, key: str, source: str) -> list:
    items = doc.get(key)
    if not isinstance(items, list):
        raise _fail(source, f"top-level {key!r}", f"is {'missing' if items is None else type(items).__name__}; "
                    f"expected a list (a COCO instances json has images, annotations and categories)")
    for k, item in enumerate(items):
        if not isinstance(item, dict):
            raise _fail(source, f"{key}[{k}]", f"is {type(item).__name__}; expected an object")
    return items


def _int_field(item: dict, field: str, source: str, where: str) -> int:
    value = item.get(field)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(source, where, f"has {field} {value!r}; expected an integer")
    return value


def parse_instances(doc, source: str):
    """Parse a COCO instances document (a dict from ``json.load``).

    Returns ``(image_ids, file_names, class_names, boxes, labels, crowd)``: per image in file
    order, float32 (K, 4) xyxy boxes, int64 (K,) labels in 1..C and bool (K,) iscrowd flags, in
    annotation order. Errors name ``source`` and the element.
    """
    if not isinstance(doc, dict):
        raise DataError(f"{source}: the top level is {type(doc).__name__}; expected a COCO instances object")
    images, annotations, categories = (_records(doc, k, source) for k in ("images", "annotations", "categories"))
    cat_ids = []
    for k, c in enumerate(categories):
        cid = _int_field(c, "id", source, f"categories[{k}]")
        if not isinstance(c.get("name"), str):
            raise _fail(source, f"categories[{k}] (id {cid})", f"has name {c.get('name')!r}; expected a string")
        cat_ids.append((cid, c["name"]))
    if not cat_ids:
        raise _fail(source, "'categories'", "is empty")
    if len({cid for cid, _ in cat_ids}) != len(cat_ids):
        raise _fail(source, "'categories'", "lists a category id twice")
    cat_ids.sort()
    label_of = {cid: k for k, (cid, _) in enumerate(cat_ids, start=1)}
    position: dict[int, int] = {}
    file_names = []
    for k, im in enumerate(images):
        iid = _int_field(im, "id", source, f"images[{k}]")
        name = im.get("file_name")
        parts = PurePosixPath(name.replace("\\", "/")).parts if isinstance(name, str) else ()
        if not parts or parts[0] == "/" or ".." in parts or ":" in parts[0]:
            raise _fail(source, f"images[{k}] (id {iid})", f"has file_name {name!r}; expected a relative path "
                        f"inside the images folder")
        if iid in position:
            raise _fail(source, f"images[{k}]", f"repeats image id {iid}")
        position[iid] = k
        file_names.append(name)
    per_image: list[list] = [[] for _ in images]
    for k, a in enumerate(annotations):
        where = f"annotations[{k}] (id {a.get('id')!r})"
        iid = _int_field(a, "image_id", source, where)
        cid = _int_field(a, "category_id", source, where)
        if iid not in position:
            raise _fail(source, where, f"refers to image_id {iid}, which is not in 'images'")
        if cid not in label_of:
            raise _fail(source, where, f"has category_id {cid}, which is not in 'categories'")
        bbox = a.get("bbox")
        if (not isinstance(bbox, list) or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)
                or bbox[2] < 0 or bbox[3] < 0):
            raise _fail(source, where, f"has bbox {bbox!r}; expected [x, y, width, height], 4 finite numbers "
                        f"with width, height >= 0")
        crowd = a.get("iscrowd", 0)
        if crowd not in (0, 1):
            raise _fail(source, where, f"has iscrowd {crowd!r}; expected 0 or 1")
        x, y, w, h = (float(v) for v in bbox)
        per_image[position[iid]].append(((x, y, x + w, y + h), label_of[cid], bool(crowd)))
    boxes = [torch.tensor([r[0] for r in rows], dtype=torch.float32).reshape(-1, 4) for rows in per_image]
    labels = [torch.tensor([r[1] for r in rows], dtype=torch.long) for rows in per_image]
    crowd = [torch.tensor([r[2] for r in rows], dtype=torch.bool) for rows in per_image]
    return [str(iid) for iid in position], file_names, [n for _, n in cat_ids], boxes, labels, crowd


def read_instances(path: Path):
    """``parse_instances`` of the json file at ``path``."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise DataError(f"coco-det: annotation file {path} not found; expected a COCO instances json "
                        f"(e.g. ROOT/annotations/instances_val2017.json)") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DataError(f"coco-det: cannot read {path} as json ({type(err).__name__}: {err})") from None
    return parse_instances(doc, str(path))


@DATASETS.register("coco-det")
@builds("detection")
def coco_det(*, root, split: str = "train", seed: int = 0,
             train_annotations: str = "annotations/instances_train2017.json", train_images: str = "train2017",
             test_annotations: str = "annotations/instances_val2017.json", test_images: str = "val2017",
             group_csv: str | None = None, max_size: Annotated[int, Range(ge=1)] | None = None,
             val_fraction: Annotated[float, Range(ge=0, lt=1)] = 0.0) -> DenseDataset:
    """COCO-style detection under ``root`` (module docstring).

    Options: ``train_annotations`` / ``test_annotations`` (instances json of the training and
    test splits, relative to ``root`` unless absolute; COCO 2017 train / val by default),
    ``train_images`` / ``test_images`` (their image folders), ``group_csv`` (CSV of image id ->
    group; None: one group), ``max_size`` (longer side at most this many pixels; None: as
    stored), ``val_fraction`` (stratified hold-out of the training split for "val"; 0). ``seed``
    does not change this data set.
    """
    check_val_fraction("coco-det", split, val_fraction)
    annotations, folder = ((test_annotations, test_images) if split == "test" else (train_annotations, train_images))
    base = Path(root)
    ids, files, class_names, boxes, labels, crowd = read_instances(base / annotations)
    if not ids:
        raise DataError(f"coco-det: {base / annotations} lists no images")
    groups, group_names = read_groups(group_csv, ids, "data.options.group_csv")
    return build_detection(
        source="coco-det", split=split, ids=ids, paths=[base / folder / f for f in files], boxes=boxes,
        labels=labels, difficult=crowd, trainable=[~c for c in crowd], groups=groups, group_names=group_names,
        val_fraction=val_fraction, max_size=max_size, class_names=class_names,
    )
