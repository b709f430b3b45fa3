"""The run directory (DESIGN.md contract 5): every file written atomically, nothing finished lost.

    config.yaml     the resolved configuration
    checkpoint.pt   the last completed epoch (model, objective, optimizers, history)
    metrics.jsonl   one JSON line per completed epoch
    result.json     written once at the end: the run is finished and is never overwritten
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

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

    def read_result(self) -> dict:
        if not self.finished:
            raise RunDirError(f"{self.path} holds no finished run (no result.json)")
        return json.loads(self.result.read_text())

    def save_checkpoint(self, state: dict) -> None:
        atomic_write(self.checkpoint, lambda f: torch.save(state, f))

    def load_checkpoint(self, map_location="cpu") -> dict:
        """Load the checkpoint safely (``weights_only=True``: no code runs while loading)."""
        try:
            return torch.load(self.checkpoint, map_location=map_location, weights_only=True)
        except FileNotFoundError:
            raise RunDirError(f"{self.path}: no checkpoint.pt") from None
        except Exception as e:  # a truncated or foreign file
            raise RunDirError(f"{self.checkpoint}: cannot be read as a fairdistill checkpoint ({e})") from None

    def write_metrics(self, history: list[dict]) -> None:
        write_text(self.metrics, "".join(json.dumps(r, allow_nan=True) + "\n" for r in history))

    def read_metrics(self) -> list[dict]:
        if not self.metrics.is_file():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]
