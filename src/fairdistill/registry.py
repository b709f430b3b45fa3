"""One small generic registry (models, data sets, terms, tasks) and one checker of values.

Every user-facing value is checked by :func:`coerce` against a type annotation: ``int``,
``float`` (ints widen, NaN and infinities are refused), ``bool``, ``str``, ``list[X]``,
``dict``, ``X | None``, ``Literal[...]`` (a choice) and ``Annotated[X, Range(...)]`` (a
number with bounds). :func:`check_options` applies it to the keyword options of a builder or a
term class from its signature, so a typo or a wrong type names the config key and the valid
choices before anything runs.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Generic, Iterator, Literal, TypeVar, Union

from .errors import ConfigError

T = TypeVar("T")

__all__ = ["Range", "Registry", "check_choice", "check_number", "check_options", "coerce", "from_dict", "suggest"]


def suggest(name: str, choices) -> str:
    """A ' Did you mean ...?' hint for ``name`` among ``choices``, or ''."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


class Registry(Generic[T]):
    """Maps names to builders; ``get`` fails with the valid choices and the nearest match.

    A registered class gets the attribute ``type_name`` (its registry name), which error
    messages of its options use.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None):
        """Register ``obj`` under ``name``; usable as a decorator when ``obj`` is omitted."""

        def add(o: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = o
            if isinstance(o, type):
                o.type_name = name
            return o

        return add if obj is None else add(obj)

    def get(self, name: str, key: str | None = None) -> T:
        if name not in self._items:
            where = f"{key}: " if key else ""
            raise ConfigError(
                f"{where}unknown {self.kind} {name!r}.{suggest(name, self._items)} "
                f"Valid choices: {', '.join(sorted(self._items))}."
            )
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))


# ----------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Range:
    """Bounds of a number, for ``Annotated[float, Range(gt=0)]`` (of the length for a list,
    mapping or string: ``Annotated[list[int], Range(ge=1)]`` is a non-empty list); None means
    unbounded."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def describe(self) -> str:
        parts = [f"{op} {v:g}" for op, v in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt)) if v is not None]
        return " and ".join(parts)

    def holds(self, v: float) -> bool:
        return ((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))


def check_choice(value: Any, choices, key: str):
    """``value`` when it is one of ``choices``, else a ConfigError naming ``key``."""
    choices = tuple(choices)
    if isinstance(value, bool) or value not in choices:
        raise ConfigError(f"{key}: {value!r} is not valid.{suggest(value, choices)} "
                          f"Valid choices: {', '.join(map(str, choices))}.")
    return value


def check_number(value: Any, key: str, *, integer: bool = False, **bounds) -> float | int:
    """``value`` as a finite number (an int when ``integer``) within ``Range(**bounds)``."""
    return coerce(value, Annotated[int if integer else float, Range(**bounds)], key)


def type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is Annotated:
        base, *meta = typing.get_args(tp)
        rng = [m.describe() for m in meta if isinstance(m, Range)]
        return f"{type_name(base)}{' ' + rng[0] if rng else ''}"
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp, key: str):
    """``value`` checked against annotation ``tp`` (see the module docstring), or a ConfigError
    naming ``key``, the expected type and the value."""
    if tp is Any or tp is inspect.Parameter.empty:
        return value
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, *meta = typing.get_args(tp)
        out = coerce(value, base, key)
        for m in meta:
            if not isinstance(m, Range) or out is None:
                continue
            sized = isinstance(out, (list, dict, str))
            if not m.holds(len(out) if sized else out):
                raise ConfigError(f"{key}: {'length ' if sized else ''}must be {m.describe()}, got {value!r}")
        return out
    if origin is Literal:
        return check_choice(value, typing.get_args(tp), key)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{key}: expected {type_name(tp)}, got {type(value).__name__} {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, key)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected float, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected int, got {type(value).__name__} {value!r}")
    check = origin or tp
    if isinstance(check, type) and not isinstance(value, check):
        raise ConfigError(f"{key}: expected {type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin is list and typing.get_args(tp):
        (item,) = typing.get_args(tp)
        return [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    return value


def from_dict(cls, data: Any, key: str = ""):
    """Build dataclass ``cls`` from a mapping, checking every key and (by annotation) every value."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{key or 'config'}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        full = f"{key}.{k}" if key else str(k)
        if k not in fields:
            raise ConfigError(f"{full}: unknown key.{suggest(k, fields)} Valid keys: {', '.join(sorted(fields))}.")
        kwargs[k] = coerce(v, hints[k], full)
    return cls(**kwargs)


def check_options(fn: Callable, options: dict, key: str, reserved: dict[str, str] | None = None) -> dict:
    """The keyword ``options`` of ``fn`` (a function or a class's ``__init__``) checked by name
    and by annotation; returns them coerced (e.g. ints widened to floats).

    ``reserved`` maps option names that ``fn`` takes but a config must not set to the key to use
    instead (e.g. ``{"seed": "seed"}`` for data-set builders).
    """
    params = inspect.signature(fn).parameters
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception:  # an annotation that cannot be resolved: check names only
        hints = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    valid = [n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and n != "self"]
    reserved = reserved or {}
    shown = [n for n in valid if n not in reserved]
    out = {}
    for k, v in options.items():
        if k in reserved:
            raise ConfigError(f"{key}.{k}: set by the run; use {reserved[k]} instead")
        if k not in valid:
            if takes_any:
                out[k] = v
                continue
            raise ConfigError(f"{key}.{k}: unknown option.{suggest(k, shown)} Valid options: {', '.join(shown) or 'none'}.")
        out[k] = coerce(v, hints.get(k, Any), f"{key}.{k}")
    return out
