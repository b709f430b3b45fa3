"""The run directory (DESIGN.md contract 5): every file written atomically, nothing finished lost.

    config.yaml     the resolved configuration
    checkpoint.pt   the last completed epoch (format: ``engine/checkpoint.py``)
    metrics.jsonl   one JSON line per completed epoch
    result.json     written once at the end: the run is finished and is never overwritten
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .config import RunConfig, from_dict, safe_load
from .errors import RunDirError


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: Path, write) -> None:
    """Write through ``write(file)`` into a temporary file, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, allow_nan=True) + "\n")


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.config = self.path / "config.yaml"
        self.checkpoint = self.path / "checkpoint.pt"
        self.metrics = self.path / "metrics.jsonl"
        self.result = self.path / "result.json"

    @property
    def finished(self) -> bool:
        return self.result.is_file()

    @property
    def started(self) -> bool:
        return self.config.is_file() or self.checkpoint.is_file()

    def read_config(self) -> RunConfig:
        """The run's saved (resolved) configuration."""
        if not self.config.is_file():
            raise RunDirError(f"{self.path}: not a run directory (no config.yaml)")
        return from_dict(RunConfig, safe_load(self.config.read_text()), key="")

    def read_result(self) -> dict:
        if not self.finished:
            raise RunDirError(f"{self.path} holds no finished run (no result.json)")
        return json.loads(self.result.read_text())

    def write_metrics(self, history: list[dict]) -> None:
        write_text(self.metrics, "".join(json.dumps(r, allow_nan=True) + "\n" for r in history))
