"""The checkpoint format: the one place that writes and reads ``checkpoint.pt``.

A checkpoint holds everything a killed run needs to continue as if uninterrupted (DESIGN.md
contract 5), after the last completed epoch:

    format, version     the format number below and the fairdistill version that wrote it
    stage, epoch        where to continue: the stage index and the epoch within it
    model, objective    state dicts of the student and of the objective's term modules
    teacher_buffers     the teacher's buffers when a stage runs its BN in train mode
    optim, term_optim   the stage's main optimizer and the terms' own optimizers
    plateau, scaler     ReduceLROnPlateau and GradScaler states ({} when unused)
    history             the per-epoch records written so far (metrics.jsonl)
    elapsed             training seconds so far

Files are written atomically and read with ``torch.load(weights_only=True)``: loading a
checkpoint cannot run code.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .. import __version__
from ..errors import RunDirError
from ..rundir import atomic_write

FORMAT = 1
"""The checkpoint format this version writes and reads."""
KEYS = ("stage", "epoch", "model", "objective", "teacher_buffers", "optim", "term_optim", "plateau", "scaler",
        "history", "elapsed")


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write ``state`` (every key of :data:`KEYS`) as a checkpoint of this format, atomically."""
    missing = [k for k in KEYS if k not in state]
    if missing:
        raise ValueError(f"checkpoint state lacks {', '.join(missing)}")
    atomic_write(Path(path), lambda f: torch.save({"format": FORMAT, "version": __version__, **state}, f))


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Read a checkpoint safely and check its format; a RunDirError says what is wrong."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise RunDirError(f"{path.parent}: no {path.name}") from None
    except Exception as e:  # a truncated or foreign file
        raise RunDirError(f"{path}: cannot be read as a fairdistill checkpoint ({e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or any(k not in state for k in KEYS):
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise RunDirError(f"{path}: not a fairdistill checkpoint of format {FORMAT} (found format {found!r})")
    return state


def load_weights(path: str | Path, map_location="cpu") -> dict:
    """The student's state dict from a checkpoint."""
    return load_checkpoint(path, map_location)["model"]
