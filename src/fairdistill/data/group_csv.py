"""A sensitive attribute for data sets that have none built in: a CSV of image id -> group.

Format: a UTF-8 text file (a byte-order mark is allowed) with a header row; one column holds the
image id (default name ``id``) and one the group (default name ``group``); other columns are
ignored. Ids are compared after stripping surrounding whitespace and must match the data set's
ids exactly (VOC: ``2007_000032``, no extension). Group values may be any strings; the group
names are the distinct values of the *whole file* sorted (numerically when every value is an
integer, else as strings), so every split of a data set read with the same file gets the same
group numbering, and group k is ``names[k]``. A file listing more ids than a split needs is
fine; an id of the split missing from the file, an empty value or an id listed twice with
different groups is a DataError naming it.
"""
from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import ConfigError, DataError
from .images import first_few


def _sorted_names(values: set[str]) -> list[str]:
    """Distinct group values, numerically sorted when all are integers, else as strings."""
    try:
        return sorted(values, key=lambda v: (int(v), v))
    except ValueError:
        return sorted(values)


def read_group_csv(
    path, ids: Sequence[str], key: str = "data.options.group_csv", *,
    id_column: str = "id", group_column: str = "group",
) -> tuple[torch.Tensor, list[str]]:
    """``(groups, group_names)`` for ``ids`` from the CSV at ``path`` (module docstring).

    ``groups`` is an int64 tensor aligned with ``ids`` in ``0..len(group_names)-1``. ``key``
    is the config key named in error messages; ``id_column``/``group_column`` the header names
    of the two columns used.
    """
    if not isinstance(path, (str, Path)) or not str(path):
        raise ConfigError(f"{key} must be the path of a CSV file (image id -> group), got {path!r}")
    for what, name in (("id_column", id_column), ("group_column", group_column)):
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{key}: {what} must be a non-empty column name, got {name!r}")
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise DataError(f"{key}: group file {path} not found; expected a CSV with columns "
                        f"{id_column!r} and {group_column!r}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{key}: cannot read the group file {path} ({type(err).__name__}: {err}); "
                        f"expected a UTF-8 CSV") from None
    if not rows:
        raise DataError(f"{key}: group file {path} is empty; expected a header row with columns "
                        f"{id_column!r} and {group_column!r}, then one row per image")
    header = [h.strip() for h in rows[0]]
    missing = [c for c in (id_column, group_column) if c not in header]
    if missing:
        raise DataError(f"{key}: the header of {path} lacks column(s) {', '.join(map(repr, missing))} "
                        f"(found {', '.join(map(repr, header))}); name the columns with the options "
                        f"id_column / group_column")
    i_id, i_group = header.index(id_column), header.index(group_column)
    table: dict[str, str] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue  # blank line
        if len(row) <= max(i_id, i_group):
            raise DataError(f"{key}: {path} line {line} has {len(row)} field(s), fewer than the header's {len(header)}")
        image_id, group = row[i_id].strip(), row[i_group].strip()
        if not image_id or not group:
            raise DataError(f"{key}: {path} line {line} has an empty {id_column if not image_id else group_column!r}")
        if table.setdefault(image_id, group) != group:
            raise DataError(f"{key}: {path} gives image {image_id!r} two groups, {table[image_id]!r} and {group!r}")
    if not table:
        raise DataError(f"{key}: group file {path} has a header but no rows")
    names = _sorted_names(set(table.values()))
    absent = [i for i in ids if str(i).strip() not in table]
    if absent:
        raise DataError(f"{key}: {len(absent)} image id(s) of the data set are missing from {path}: "
                        f"{first_few(absent)}; every image needs a group")
    index = {n: k for k, n in enumerate(names)}
    groups = torch.tensor([index[table[str(i).strip()]] for i in ids], dtype=torch.long)
    return groups, names
