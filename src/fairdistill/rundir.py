"""The run directory (DESIGN.md contract 5): every file written atomically, nothing finished lost,
one writer at a time.

    config.yaml     the resolved configuration
    checkpoint.pt   the last completed epoch (format: ``engine/checkpoint.py``)
    metrics.jsonl   one JSON line per completed epoch
    result.json     written once at the end: the run is finished and is never overwritten
    run.lock        while a process writes the run: its OS lock (``runlock.py``: :class:`RunLock`)

A write that fails for an ordinary reason (disk full, read-only or permission-denied folder, a
path component that is a file) raises a :class:`RunDirError` naming the file and saying what
to do; the file it was replacing is left as it was.
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path

from .config import RESUMABLE, RunConfig, apply_overrides, from_dict, parse_override, safe_load, to_dict, validate
from .plugins import with_plugins
from .errors import ConfigError, RunDirError
from .runlock import LOCK, LockHolder, RunLock, busy_error, lock_holder  # noqa: F401 (the lock's public names)
from .write_errors import RUN_FILES, write_error  # noqa: F401 (write_error is part of this module's interface)

_UMASK = os.umask(0)
os.umask(_UMASK)

_TEMP = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}$")  # what tempfile.mkstemp(prefix=".NAME.") makes


# ----------------------------------------------------------------------------- atomic writes


class _Recording:
    """A file wrapper that remembers the OSError of a failed write (``torch.save`` wraps it in
    an opaque RuntimeError; the original says "no space left on device")."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        try:
            self.f.flush()
        except OSError as e:
            self.error = e
            raise


def atomic_write(path: Path, write) -> None:
    """Write through ``write(file)`` into a temporary ``.NAME.xxxxxxxx`` beside ``path``, then
    rename it over ``path``: readers see the old file or the new one, never a part.

    On any failure the temporary is removed and ``path`` is untouched; an OSError (also one that
    ``write`` wrapped in another exception) becomes a RunDirError saying what to do.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except OSError as e:
        raise write_error(path, e) from None
    rec = None
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            rec = _Recording(f)
            write(rec)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise write_error(path, e) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        if rec is not None and rec.error is not None:
            raise write_error(path, rec.error) from None
        raise


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, allow_nan=True) + "\n")


def read_json(path: Path, what: str = "") -> dict:
    """A JSON object from ``path``; a RunDirError saying the file is damaged when it is not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise RunDirError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise RunDirError(f"{path} is damaged ({what or 'not valid JSON'}: {e})") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{path} is damaged (expected a JSON object, found {type(data).__name__})")
    return data


# ----------------------------------------------------------------------------- the run directory


HEADLINE = {"classification": "accuracy", "segmentation": "miou", "detection": "map"}
"""Task (``result.json``'s ``task``; classification when absent, as in runs made before the
task layer) -> the headline metric that a finished run's ``final`` must hold, in [0, 1]."""


class RunDir:
    """A run directory: its files, its state (started, finished, being written) and its lock."""

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

    def lock(self) -> RunLock:
        """The writer's lock of this folder (see :class:`RunLock`), not yet acquired."""
        return RunLock(self.path)

    def writer(self) -> LockHolder | None:
        """The process writing this run now (it holds the lock), or None."""
        return lock_holder(self.path)

    def check_no_writer(self) -> None:
        """Refuse at once (before anything is built) when another process writes this run."""
        holder = self.writer()
        if holder is not None:
            raise busy_error(self.path, holder)

    def lower_lr_command(self, cfg: RunConfig, stage_index: int, lr: float) -> str:
        """The sentence after a non-finite loss: the command that trains this run again from its
        saved config with a ten times lower learning rate, in a new folder beside this one."""
        stages = cfg.stages
        key = f"stages.{stage_index}.optim.lr" if stage_index < len(stages) and "lr" in (stages[stage_index].optim or {}) \
            else "optim.lr"
        new = f"{lr / 10:g}"
        return (f"To train it again with a lower learning rate in a new folder: fairdistill train {self.config} "
                f"{key}={new} out={self.path.parent / f'{self.path.name}-lr{new}'}")

    def check_writable(self) -> None:
        """Refuse, writing nothing, a folder that cannot be created or written: a path component
        that is a file, or a read-only or permission-denied parent."""
        p = self.path
        if p.exists() and not p.is_dir():
            raise RunDirError(f"out: {p} is a file, not a folder; choose another out=DIR")
        existing = next((q for q in [p, *p.parents] if q.exists()), Path("."))
        if not existing.is_dir():
            raise RunDirError(f"out: {p} lies under {existing}, which is a file; choose another out=DIR")
        if existing.is_dir() and not os.access(existing, os.W_OK | os.X_OK):
            ro = "on a read-only file system" if _read_only(existing) else "not writable"
            raise RunDirError(f"out: {existing} is {ro}, so {p} cannot be written; choose another out=DIR")

    def remove_temporaries(self) -> list[Path]:
        """Remove the ``.NAME.xxxxxxxx`` temporaries that interrupted atomic writes of the run's
        files left behind; call it only while holding the lock (a writer's live temporary would
        go too). Returns the removed paths."""
        removed = []
        if not self.path.is_dir():
            return removed
        for p in self.path.iterdir():
            m = _TEMP.match(p.name)
            if m and m["name"] in RUN_FILES and p.is_file() and not p.is_symlink():
                try:
                    p.unlink()
                    removed.append(p)
                except OSError:
                    pass
        return removed

    def read_config(self) -> RunConfig:
        """The run's saved (resolved) configuration."""
        if not self.config.is_file():
            raise RunDirError(f"{self.path}: not a run directory (no config.yaml)")
        try:
            data = safe_load(self.config.read_text())
        except Exception as e:  # YAML or decoding errors: the file is damaged
            raise RunDirError(f"{self.config} is damaged ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise RunDirError(f"{self.config} is damaged (expected a mapping of keys)")
        try:
            cfg = from_dict(RunConfig, data, key="")
        except ConfigError as e:
            raise RunDirError(f"{self.config} is damaged or from another version ({e})") from None
        return with_plugins(cfg)  # the modules that register its models, data sets or terms

    def resume_config(self, overrides=()) -> RunConfig:
        """The saved config of this run, to continue it here: ``out`` is this folder, and
        ``overrides`` (``key=value``) may set only the keys that may change on resume
        (:data:`fairdistill.config.RESUMABLE`)."""
        saved = self.read_config()
        for text in overrides:
            key = parse_override(text)[0]
            if key[0] not in RESUMABLE:
                raise ConfigError(
                    f"{'.'.join(key)}: cannot change when resuming {self.path} (only {', '.join(RESUMABLE)} may); "
                    f"to train with another value, start a new run: fairdistill train {self.config} {text} out=NEW_DIR")
        data = apply_overrides(to_dict(saved), list(overrides))
        data["out"] = str(self.path)
        cfg = from_dict(RunConfig, data)
        validate(cfg)
        return cfg

    def read_result(self) -> dict:
        """The run's ``result.json``; a RunDirError when there is none or it is damaged."""
        if not self.finished:
            raise RunDirError(f"{self.path} holds no finished run (no result.json)")
        result = read_json(self.result)
        final = result.get("final")
        head = HEADLINE.get(result.get("task", "classification"))
        bad = "no 'final' metrics" if not isinstance(final, dict) else \
            f"unknown task {result.get('task')!r}" if head is None else next(
                (f"final {k} is {final.get(k)!r}" for k in (head, "deo_a", "deo_m")
                 if not (isinstance(final.get(k), (int, float)) and not isinstance(final.get(k), bool))), None)
        if bad is None and not 0.0 <= final[head] <= 1.0 and not math.isnan(final[head]):
            bad = f"final {head} {final[head]!r} is outside [0, 1]"
        if bad:
            raise RunDirError(f"{self.result} is damaged ({bad}); remove it and run `fairdistill train --resume "
                              f"{self.path}` to write it again from the checkpoint")
        return result

    def write_metrics(self, history: list[dict]) -> None:
        write_text(self.metrics, "".join(json.dumps(r, allow_nan=True) + "\n" for r in history))


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (AttributeError, OSError):
        return False
