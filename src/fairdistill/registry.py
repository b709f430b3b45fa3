"""One small generic registry, used for models, data sets and methods."""
from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from .errors import ConfigError

T = TypeVar("T")


def suggest(name: str, choices) -> str:
    """A ' Did you mean ...?' hint for ``name`` among ``choices``, or ''."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


class Registry(Generic[T]):
    """Maps names to builders; ``get`` fails with the valid choices and the nearest match."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None):
        """Register ``obj`` under ``name``; usable as a decorator when ``obj`` is omitted."""

        def add(o: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = o
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


def check_kwargs(fn: Callable, kwargs: dict, key: str) -> None:
    """Fail with a ConfigError naming ``key`` when ``kwargs`` holds a name ``fn`` does not take."""
    import inspect

    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = [n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    for k in kwargs:
        if k not in valid:
            raise ConfigError(
                f"{key}.{k}: unknown option.{suggest(k, valid)} Valid options: {', '.join(valid) or 'none'}."
            )
