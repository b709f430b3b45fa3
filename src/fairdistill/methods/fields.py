"""Fields of a model's :class:`~fairdistill.models.Features`, and views that let only some be read.

A term declares the teacher fields it reads (:meth:`fairdistill.methods.base.Term.teacher_fields`),
so the trainer knows what a teacher cache must hold (``engine/teacher_cache.py``); the objective
hands each declaring term a :class:`DeclaredFeatures` view of the teacher's features, so reading
an undeclared field raises :class:`~fairdistill.models.FeatureNotComputed` (naming the field and
the declaration) whether the features were computed or served from the cache, instead of a cache
silently lacking it.

Field names: ``"logits"``, ``"embedding"``, ``"stages.I"`` (``Features.stages[I]``),
``"extra.NAME.I"`` (entry I of the list ``Features.extra[NAME]``, e.g. ``"extra.block.2"``) and
``"extra.NAME"`` (a tensor entry). Indices are non-negative.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from ..models.base import FeatureNotComputed

__all__ = ["DeclaredFeatures", "check_field", "field_value", "stage_field"]

LOGITS, EMBEDDING = "logits", "embedding"


def stage_field(position: str, index: int) -> str:
    """The field of stage ``index`` of kind ``position`` (``methods.features.Position``):
    ``"stages.I"`` for ``"prerelu"``, ``"extra.block.I"`` for ``"block"``."""
    return f"stages.{index}" if position == "prerelu" else f"extra.block.{index}"


def _split(name: str) -> tuple:
    """("logits",), ("embedding",), ("stages", I), ("extra", NAME, I) or ("extra", NAME)."""
    if name in (LOGITS, EMBEDDING):
        return (name,)
    head, _, rest = name.partition(".")
    if head == "stages" and rest.isdigit():
        return ("stages", int(rest))
    if head == "extra" and rest:
        entry, dot, index = rest.rpartition(".")
        return ("extra", entry, int(index)) if dot and index.isdigit() else ("extra", rest)
    raise ValueError(f"{name!r} is not a Features field: expected logits, embedding, stages.I, extra.NAME.I or "
                     "extra.NAME")


def check_field(name: str) -> str:
    """``name`` if it is a field name (module docstring), else ValueError."""
    _split(name)
    return name


def field_value(features, name: str) -> torch.Tensor:
    """The tensor of field ``name`` in ``features``."""
    parts = _split(name)
    if parts[0] == LOGITS:
        return features.logits
    if parts[0] == EMBEDDING:
        return features.embedding
    if parts[0] == "stages":
        return features.stages[parts[1]]
    entry = features.extra[parts[1]]
    return entry[parts[2]] if len(parts) == 3 else entry


def _label(parts: tuple) -> str:
    if parts[0] in (LOGITS, EMBEDDING):
        return f"Features.{parts[0]}"
    if parts[0] == "stages":
        return f"Features.stages[{parts[1]}]"
    return f"Features.extra[{parts[1]!r}]" + (f"[{parts[2]}]" if len(parts) == 3 else "")


class _Refusal:
    """The error of a read outside the allowed fields: ``why`` completes "Features.X ..."."""

    def __init__(self, fields: frozenset[str], why: str):
        self.fields, self.why = fields, why

    def __call__(self, parts: tuple):
        allowed = ", ".join(sorted(self.fields)) or "none"
        raise FeatureNotComputed(f"{_label(parts)} of the teacher was read, {self.why} (allowed: {allowed})")


class _FieldList(Sequence):
    """A stage list of which only ``allowed`` indices may be read (its length is the model's)."""

    def __init__(self, items, prefix: tuple, allowed: frozenset[int], refuse: _Refusal):
        self._items, self._prefix, self._allowed, self._refuse = items, prefix, allowed, refuse

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index):
        n = len(self._items)
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(n))]
        i = index + n if index < 0 else index
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for {n} entries")
        if i not in self._allowed:
            self._refuse((*self._prefix, i))
        return self._items[i]


class _FieldDict(Mapping):
    """``Features.extra`` of which only the allowed entries (and list indices) may be read."""

    def __init__(self, extra: Mapping, allowed: dict, refuse: _Refusal):
        self._extra, self._allowed, self._refuse = extra, allowed, refuse

    def __getitem__(self, key):
        value = self._extra[key]
        allowed = self._allowed.get(key, frozenset())
        if isinstance(value, Sequence):
            return _FieldList(value, ("extra", key), frozenset(i for i in allowed if i is not None), self._refuse)
        if None not in allowed:
            self._refuse(("extra", key))
        return value

    def __iter__(self):
        return iter(self._extra)

    def __len__(self) -> int:
        return len(self._extra)


class DeclaredFeatures:
    """``features`` of which only ``fields`` may be read; any other field raises
    :class:`FeatureNotComputed` saying ``why`` it may not (e.g. "but the term does not declare it
    in teacher_fields()"). Lists keep their length, so stage counts can be compared."""

    __slots__ = ("_features", "_fields", "_stages", "_extra", "_refuse")

    def __init__(self, features, fields: Iterable[str], why: str):
        self._features = features
        self._fields = frozenset(fields)
        self._refuse = _Refusal(self._fields, why)
        self._stages: set[int] = set()
        self._extra: dict[str, set] = {}
        for name in self._fields:
            parts = _split(name)
            if parts[0] == "stages":
                self._stages.add(parts[1])
            elif parts[0] == "extra":
                self._extra.setdefault(parts[1], set()).add(parts[2] if len(parts) == 3 else None)

    @property
    def fields(self) -> frozenset[str]:
        return self._fields

    @property
    def logits(self):
        if LOGITS not in self._fields:
            self._refuse((LOGITS,))
        return self._features.logits

    @property
    def embedding(self):
        if EMBEDDING not in self._fields:
            self._refuse((EMBEDDING,))
        return self._features.embedding

    @property
    def stages(self) -> _FieldList:
        return _FieldList(self._features.stages, ("stages",), frozenset(self._stages), self._refuse)

    @property
    def extra(self) -> _FieldDict:
        return _FieldDict(self._features.extra, {k: frozenset(v) for k, v in self._extra.items()}, self._refuse)
