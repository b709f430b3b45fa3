"""``imagecsv``: images listed in a CSV with a class label and sensitive attributes per row.

Files (UTF-8, a header row; a byte-order mark and blank lines are allowed; other columns are
ignored): either one ``csv`` whose ``split_column`` (default ``split``) says ``train`` or
``test`` per row, or one file per split, ``train_csv`` and ``test_csv``. A validation split is
held out of ``train`` with ``val_fraction`` (stratified by (group, label) cell, ``data/split.py``),
as for every data set. Relative paths: the CSV files are relative to ``data.root``; the images
to ``image_root`` (default ``data.root``; relative to it when relative itself). Absolute paths
are taken as they are.

Columns: ``path_column`` (default ``path``): the image file, each listed once per file;
``label_column`` (``label``): the class, any strings, with class names the distinct values of
all the files sorted (numerically when every value is an integer), so every split numbers the
classes alike; ``group``: the column of the sensitive attribute, or a list of columns whose
combinations are the groups (intersectional groups, e.g. ``[race, gender]``): the groups are
the combinations present in the files, ordered by the columns' sorted values, named
``"v1/v2"``; None (default): one group. Values are mapped with ``read_group_csv``
(``data/group_csv.py``), whose errors name the file and line of an empty value.

Images: decoded and cached like the face data sets (``data/images.py``): squashed to
``image_size`` x ``image_size`` (64; ``Resize((s, s))`` with Pillow), training images stored at
``resize`` (None = ``image_size``; larger for a random crop on the device), or kept at their own
size with ``image_size: null`` (every file then has the first file's size); ``cache`` /
``cache_dir`` keep the decoded arrays. Normalisation: ImageNet mean and std.
"""
from __future__ import annotations

import csv as csv_module
from pathlib import Path
from typing import Union

import torch

from ..errors import ConfigError, DataError
from .base import DATASETS, ImageDataset
from .group_csv import _sorted_names, read_group_csv
from .images import IMAGENET_MEAN, IMAGENET_STD, cache_folder, check_size, load_images
from .split import check_val_fraction, split_positions

SPLIT_VALUES = ("train", "test")


def read_rows(path: Path, columns: list[str], key: str,
              options: str = "path_column, label_column, group and split_column") -> list[str]:
    """The image paths (column ``columns[0]``) of the CSV at ``path`` in file order, after
    checking that its header has ``columns`` and that no path is empty or listed twice;
    ``options`` names the data options that choose the columns, for the error message."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv_module.reader(f))
    except FileNotFoundError:
        raise DataError(f"{key}: CSV file {path} not found (relative paths are relative to data.root)") from None
    except (OSError, UnicodeDecodeError, csv_module.Error) as err:
        raise DataError(f"{key}: cannot read {path} ({type(err).__name__}: {err}); expected a UTF-8 CSV") from None
    header = [h.strip() for h in rows[0]] if rows else []
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(f"{key}: the header of {path} lacks column(s) {', '.join(map(repr, missing))} (found "
                        f"{', '.join(map(repr, header)) or 'no header'}); name the columns with the data options "
                        f"{options}")
    i = header.index(columns[0])
    seen: dict[str, int] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= i or not row[i].strip():
            raise DataError(f"{key}: {path} line {line} has no image path in column {columns[0]!r}")
        p = row[i].strip()
        if p in seen:
            raise DataError(f"{key}: {path} lists image {p!r} twice (lines {seen[p]} and {line})")
        seen[p] = line
    if not seen:
        raise DataError(f"{key}: {path} has a header but no rows")
    return list(seen)


def _mapped(files: list[tuple[Path, list[str]]], column: str, id_column: str, key: str):
    """Per file, the value indices of ``column`` in the names shared by all ``files``; and the names."""
    per_file = [read_group_csv(p, ids, key, id_column=id_column, group_column=column) for p, ids in files]
    names = _sorted_names(set().union(*(set(n) for _, n in per_file)))
    index = {n: k for k, n in enumerate(names)}
    out = [torch.tensor([index[n[v]] for v in values.tolist()], dtype=torch.long) for values, n in per_file]
    return out, names


def attribute_groups(files: list[tuple[Path, list[str]]], columns: list[str], id_column: str,
                     key: str) -> tuple[list[dict[str, int]], list[str]]:
    """Per file, image id -> group, the groups being the combinations of the ``columns`` values
    present in all ``files`` (ordered by each column's sorted values); and the group names
    (the values joined by "/")."""
    parts = [_mapped(files, c, id_column, key) for c in columns]
    rows = [list(zip(*(p[0][f].tolist() for p in parts))) for f in range(len(files))]
    combos = sorted({c for file_rows in rows for c in file_rows})
    index = {c: k for k, c in enumerate(combos)}
    tables = [{i: index[c] for i, c in zip(ids, file_rows)} for (_, ids), file_rows in zip(files, rows)]
    return tables, ["/".join(parts[k][1][v] for k, v in enumerate(c)) for c in combos]


@DATASETS.register("imagecsv")
def imagecsv(*, root, split="train", seed=0, csv: Union[str, None] = None, train_csv: Union[str, None] = None,
             test_csv: Union[str, None] = None, path_column: str = "path", label_column: str = "label",
             group: Union[str, list[str], None] = None, split_column: str = "split",
             image_root: Union[str, None] = None, image_size: Union[int, None] = 64, resize: Union[int, None] = None,
             val_fraction: float = 0.0, cache: bool = False, cache_dir: Union[str, None] = None) -> ImageDataset:
    """Images, labels and groups from CSV files (see the module docstring). ``seed`` does not
    change this data set."""
    name = f"imagecsv-{split}"
    check_val_fraction("imagecsv", split, val_fraction)
    if csv is not None and (train_csv is not None or test_csv is not None):
        raise ConfigError("data.options: give csv (one file with a split column) or train_csv and test_csv, not both")
    if csv is None and (train_csv is None or test_csv is None):
        raise ConfigError("data.options: imagecsv needs csv (one file with a split column) or both train_csv and "
                          "test_csv (one file per split)")
    groups_cols = [] if group is None else [group] if isinstance(group, str) else list(group)
    if isinstance(group, list) and (not group or len(set(group)) != len(group)):
        raise ConfigError(f"data.options.group: expected a column name or a non-empty list of distinct columns, got {group!r}")
    if resize is not None and image_size is None:
        raise ConfigError("data.options.resize: needs image_size (images kept at their own size are not resized)")
    if image_size is not None:
        image_size = check_size("imagecsv.image_size", image_size)
    train_side = image_size if resize is None else check_size("imagecsv.resize", resize)
    columns = [path_column, label_column, *groups_cols]
    if csv is not None:
        path = Path(root) / csv
        ids = read_rows(path, [*columns, split_column], "data.options.csv")
        (where,), split_names = _mapped([(path, ids)], split_column, path_column, "data.options.csv")
        odd = [n for n in split_names if n not in SPLIT_VALUES]
        if odd:
            raise DataError(f"data.options.csv: column {split_column!r} of {path} holds {', '.join(map(repr, odd))}; "
                            f"expected {' or '.join(SPLIT_VALUES)} (a validation split comes from val_fraction)")
        files = [(path, [i for i, w in zip(ids, where.tolist()) if split_names[w] == s]) for s in SPLIT_VALUES]
        keys = ["data.options.csv"] * 2
    else:
        files = []
        keys = ["data.options.train_csv", "data.options.test_csv"]
        for option, file in zip(keys, (train_csv, test_csv)):
            files.append((Path(root) / file, read_rows(Path(root) / file, columns, option)))
    for (path, ids), s, key in zip(files, SPLIT_VALUES, keys):
        if not ids:
            raise DataError(f"{key}: {path} has no {s} rows")
    labels, class_names = _mapped(files, label_column, path_column, keys[0])
    pick = 1 if split == "test" else 0
    image_ids, y = files[pick][1], labels[pick]
    g, group_names = torch.zeros_like(y), ["all"]
    if groups_cols:
        tables, group_names = attribute_groups(files, groups_cols, path_column, keys[0])
        g = torch.tensor([tables[pick][i] for i in image_ids], dtype=torch.long)
    keep = split_positions(y, g, len(class_names), split, val_fraction)
    if keep is not None:
        image_ids, y, g = [image_ids[i] for i in keep.tolist()], y[keep], g[keep]
    base = Path(root) / image_root if image_root is not None else Path(root)
    images = load_images(base, image_ids, train_side if split == "train" else image_size, name=name,
                         cache_dir=cache_folder(root, cache, cache_dir))
    return ImageDataset(images, y, g, len(class_names), len(group_names), name=name, mean=IMAGENET_MEAN,
                        std=IMAGENET_STD, class_names=class_names, group_names=group_names)
