"""Per-epoch scalars of a run for TensorBoard, a CSV file and Weights & Biases.

``metrics.jsonl`` is always written (``rundir.py``); the config key ``loggers`` (a list of
``tensorboard``, ``csv``, ``wandb``; default none) adds:

- ``tensorboard``: event files in the run directory (``tensorboard --logdir runs/`` shows every
  run); needs ``pip install 'fairdistill[tensorboard]'``. A resumed run purges the events from
  the resumed epoch on, so a killed run leaves no doubled curves.
- ``csv``: ``metrics.csv`` in the run directory, one row per epoch; its columns are the union of
  every epoch's scalars in first-seen order (a scalar missing in an epoch, e.g. test metrics
  between evaluations, is an empty cell), rewritten whole each epoch so that it always matches
  ``metrics.jsonl``.
- ``wandb``: a W&B run (project ``$WANDB_PROJECT``, default ``fairdistill``; entity
  ``$WANDB_ENTITY``) whose id is kept in ``RUN_DIR/wandb_id.txt`` so that ``--resume``
  continues it; files under ``RUN_DIR/wandb``. ``$WANDB_MODE`` decides the mode when set;
  otherwise the run is online only when an API key is configured and the W&B host answers
  within 2 s, else offline (upload later with ``wandb sync``). Needs ``pip install
  'fairdistill[wandb]'``.

The scalars of an epoch (:func:`scalars`) are ``lr``, every training loss part and the training
accuracy (``train/...``), and every number among the test and validation metrics
(``test/accuracy``, ``test/loss``, ``test/deo_a``, ``test/dp_m``, ``test/worst_group_accuracy``,
...); lists (per-class gaps, per-cell tables) stay in ``metrics.jsonl``. The step is the
epoch counted over all stages (``global_epoch``). Only rank 0 logs (the trainer opens loggers
in the main process only). A logger whose package is missing is a ConfigError naming the extra,
raised by :func:`check_loggers` before training starts.
"""
from __future__ import annotations

import csv
import importlib.util
import io
import math
import netrc
import os
import socket
import uuid
from pathlib import Path
from urllib.parse import urlparse

from .errors import ConfigError
from .rundir import write_text

LOGGERS = ("tensorboard", "csv", "wandb")
"""Valid names of the config key ``loggers``."""

REQUIRES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}
"""Logger -> (module it imports, pyproject extra that installs it)."""

LEADING = ("global_epoch", "stage", "epoch")
"""The first columns of ``metrics.csv``."""


def check_loggers(names: list[str]) -> None:
    """ConfigError for an unknown logger or one whose package is not installed (with the extra)."""
    for name in names:
        if name not in LOGGERS:
            raise ConfigError(f"loggers: unknown logger {name!r}; valid: {', '.join(LOGGERS)}")
        if name in REQUIRES:
            module, extra = REQUIRES[name]
            if importlib.util.find_spec(module) is None:
                raise ConfigError(f"loggers: {name} needs the {module} package, which is not installed: "
                                  f"pip install 'fairdistill[{extra}]' (or remove {name} from loggers)")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def scalars(record: dict) -> dict[str, float]:
    """The scalars of one ``metrics.jsonl`` record: ``lr`` and ``split/key`` for every number in
    its ``train``, ``test`` and ``val`` parts (NaN kept: an undefined metric), sorted by key
    within each split."""
    out = {}
    if _number(record.get("lr")):
        out["lr"] = float(record["lr"])
    for split in ("train", "test", "val"):
        part = record.get(split) or {}
        for k in sorted(part):
            if _number(part[k]):
                out[f"{split}/{k}"] = float(part[k])
    return out


def csv_text(history: list[dict]) -> str:
    """``metrics.csv`` of ``history`` (a list of ``metrics.jsonl`` records): :data:`LEADING`, then
    every scalar column in first-seen order; empty cells where an epoch lacks a column."""
    rows, columns = [], list(LEADING)
    for i, r in enumerate(history):
        row = {"global_epoch": r.get("global_epoch", i + 1), "stage": r.get("stage", ""), "epoch": r.get("epoch", "")}
        row.update(scalars(r))
        for k in row:
            if k not in columns:
                columns.append(k)
        rows.append(row)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (repr(v) if isinstance(v, float) and math.isfinite(v) else v) for k, v in row.items()})
    return buf.getvalue()


class CSVLogger:
    """``metrics.csv`` in ``run_dir``, rewritten atomically with the whole history each epoch."""

    def __init__(self, run_dir: Path, history: list[dict]):
        self.path = Path(run_dir) / "metrics.csv"
        self.history = list(history)
        if self.history:
            write_text(self.path, csv_text(self.history))

    def log(self, record: dict) -> None:
        self.history.append(record)
        write_text(self.path, csv_text(self.history))

    def close(self, failed: bool = False) -> None:
        pass


class TensorBoardLogger:
    """TensorBoard event files in ``run_dir`` (``torch.utils.tensorboard.SummaryWriter``).

    ``first_step`` (the first epoch this process logs): on a resumed run, events of earlier
    attempts at that step or later are purged, so the curves hold each epoch once.
    """

    def __init__(self, run_dir: Path, first_step: int, config_text: str = ""):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=first_step if first_step > 1 else None)
        if config_text and first_step <= 1:
            self.writer.add_text("config", "```\n" + config_text + "```", 0)

    def log(self, record: dict) -> None:
        step = int(record.get("global_epoch", 0))
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self, failed: bool = False) -> None:
        self.writer.close()


def wandb_mode(timeout: float = 2.0) -> str:
    """``$WANDB_MODE`` when set; else ``online`` when an API key is configured (``$WANDB_API_KEY``
    or ``~/.netrc``) and the W&B host (``$WANDB_BASE_URL``, default api.wandb.ai) accepts a
    connection within ``timeout`` seconds; else ``offline``."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    url = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    host, port = url.hostname or "api.wandb.ai", url.port or (80 if url.scheme == "http" else 443)
    key = os.environ.get("WANDB_API_KEY")
    if not key:
        try:
            key = (netrc.netrc().authenticators(host) or (None, None, None))[2]
        except (OSError, netrc.NetrcParseError):
            key = None
    if not key:
        return "offline"
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
        return "offline"
    return "online"


class WandbLogger:
    """A W&B run of this run directory (module docstring); ``wandb.log`` per epoch."""

    def __init__(self, run_dir: Path, name: str, config: dict, log=print):
        import wandb

        run_dir = Path(run_dir)
        id_file = run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        if not id_file.is_file():
            write_text(id_file, run_id + "\n")
        mode = wandb_mode()
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "fairdistill", entity=os.environ.get("WANDB_ENTITY"),
                              name=name, id=run_id, resume="allow", dir=str(run_dir), config=config, mode=mode)
        if mode == "offline":
            log(f"wandb: offline (no API key or no network): {run_dir / 'wandb'}; upload with `wandb sync {run_dir / 'wandb'}/offline-run-*`")

    def log(self, record: dict) -> None:
        self.run.log(scalars(record), step=int(record.get("global_epoch", 0)))

    def close(self, failed: bool = False) -> None:
        """Finish the W&B run; ``failed`` (training raised) marks it failed (exit code 1)."""
        self.run.finish(exit_code=1 if failed else 0)


class RunLoggers:
    """The configured loggers of one run, fed each epoch's record (see :func:`open_loggers`)."""

    def __init__(self, loggers: list):
        self.loggers = loggers

    def log(self, record: dict) -> None:
        for lg in self.loggers:
            lg.log(record)

    def close(self, failed: bool = False) -> None:
        for lg in self.loggers:
            lg.close(failed)

    def __enter__(self) -> "RunLoggers":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)


def open_loggers(names: list[str], run_dir: str | Path, history: list[dict] = (), name: str = "run",
                 config: dict | None = None, config_text: str = "", log=print) -> RunLoggers:
    """Open the loggers ``names`` of the run in ``run_dir``.

    ``history``: the records of the epochs already done (a resumed run): the CSV starts with them
    and TensorBoard purges its events from the next epoch on. ``name`` and ``config`` label the
    W&B run; ``config_text`` (the resolved YAML) is stored as TensorBoard text.
    """
    check_loggers(names)
    run_dir = Path(run_dir)
    history = list(history)
    first = int(history[-1].get("global_epoch", len(history))) + 1 if history else 1
    out = []
    for n in dict.fromkeys(names):  # a name listed twice logs once
        if n == "csv":
            out.append(CSVLogger(run_dir, history))
        elif n == "tensorboard":
            out.append(TensorBoardLogger(run_dir, first, config_text))
        else:
            out.append(WandbLogger(run_dir, name, config or {}, log=log))
    return RunLoggers(out)
