"""The checkpoint format: the one place that writes and reads ``checkpoint.pt``.

A checkpoint holds everything a killed run needs to continue as if uninterrupted (DESIGN.md
contract 5), after the last completed epoch:

    format, version     the format number below and the fairdistill version that wrote it
    fingerprint         the run's identity: :func:`config_fingerprint` of its resolved config
    stage, epoch        where to continue: the stage index and the epoch within it
    model, objective    state dicts of the student and of the objective's term modules
    teacher_buffers     the teacher's buffers when a stage runs its BN in train mode
    optim, term_optim   the stage's main optimizer and the terms' own optimizers
    plateau, scaler     ReduceLROnPlateau and GradScaler states ({} when unused)
    history             the per-epoch records written so far (metrics.jsonl)
    elapsed             training seconds so far
    checksum            SHA-256 of everything above (:func:`content_checksum`)

Files are written atomically and read with ``torch.load(weights_only=True)``: loading a
checkpoint cannot run code. Every load checks the checksum, so a damaged file (truncated, or a
single flipped bit in a weight) is refused instead of evaluated; loads for a run also check the
fingerprint, so a checkpoint copied from another run is refused.

Format 1 (fairdistill 0.1 before the checksum) is refused with a message saying so: it cannot
be verified. Its weights stay usable, unverified, as a teacher through ``teacher.checkpoint=FILE``
with ``teacher.model``.
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import torch

from .. import __version__
from ..config import RESUMABLE, RunConfig, stage_list
from ..config.schema import non_default
from ..errors import RunDirError
from ..rundir import RunDir, atomic_write, lock_holder

FORMAT = 2
"""The checkpoint format this version writes and reads."""
KEYS = ("stage", "epoch", "model", "objective", "teacher_buffers", "optim", "term_optim", "plateau", "scaler",
        "history", "elapsed")
IDENTITY_IGNORES = ("out", *RESUMABLE)
"""Config keys outside a run's identity: where it lies, and what may change on resume."""


def config_fingerprint(cfg: RunConfig) -> str:
    """SHA-256 (hex) of a run's identity: what its resolved config sets beyond the schema's
    defaults (:func:`~fairdistill.config.schema.non_default`, so that a later version's new
    keys leave it unchanged), without :data:`IDENTITY_IGNORES`, as JSON with sorted keys and
    ``(",", ":")`` separators. A run moved or copied elsewhere, or resumed on another device,
    keeps its fingerprint."""
    identity = {k: v for k, v in non_default(cfg).items() if k not in IDENTITY_IGNORES}
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), allow_nan=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _feed(h, obj, where: str) -> None:
    """Feed ``obj`` to hash ``h`` as a type tag, then its length-prefixed content (see
    :func:`content_checksum`)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        head = f"T{t.dtype}{tuple(obj.shape)}".encode()
        data = t.view(torch.uint8).numpy() if t.numel() else b""
        h.update(b"%d:" % len(head) + head + b"%d:" % (t.numel() * t.element_size()))
        h.update(data)
    elif isinstance(obj, dict):
        h.update(b"d%d:" % len(obj))
        for k in sorted(obj, key=lambda k: (type(k).__name__, str(k))):
            _feed(h, k, where)
            _feed(h, obj[k], f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        h.update((b"l" if isinstance(obj, list) else b"t") + b"%d:" % len(obj))
        for i, v in enumerate(obj):
            _feed(h, v, f"{where}[{i}]")
    elif isinstance(obj, (str, bytes)):
        data = obj.encode() if isinstance(obj, str) else obj
        h.update((b"s" if isinstance(obj, str) else b"b") + b"%d:" % len(data) + data)
    elif isinstance(obj, bool):
        h.update(b"?1" if obj else b"?0")
    elif isinstance(obj, int):
        h.update(b"i%d:" % len(str(obj)) + str(obj).encode())
    elif isinstance(obj, float):
        h.update(b"f" + struct.pack("<d", obj))
    elif obj is None:
        h.update(b"n")
    elif isinstance(obj, (torch.dtype, torch.device)):
        h.update(b"o%d:" % len(str(obj)) + str(obj).encode())
    else:
        raise TypeError(f"checkpoint {where}: cannot checksum a {type(obj).__name__}")


def content_checksum(state: dict) -> str:
    """SHA-256 (hex) of a checkpoint's contents, independent of how ``torch.save`` lays them out.

    Every value is fed as a type tag and its content: a tensor as its dtype, shape and raw bytes
    (C order, native byte order); a dict as its size and its items sorted by (key type name,
    str(key)); a list or tuple as its length and items; str (UTF-8) and bytes with their length;
    int as decimal digits; float as 8 little-endian IEEE bytes; bool, None, dtype and device by
    name. The ``checksum`` key itself is left out.
    """
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != "checksum"}, "")
    return h.hexdigest()


WEIGHT_KEYS = ("model", "objective", "teacher_buffers")
"""The state dicts a checkpoint stores contiguous (NCHW), so that its weights export to any format
(safetensors refuses strided tensors) and load into a model of either memory layout."""


def save_checkpoint(path: str | Path, state: dict, fingerprint: str | None = None) -> None:
    """Write ``state`` (every key of :data:`KEYS`) as a checkpoint of this format, atomically.

    ``fingerprint``: the run's :func:`config_fingerprint` (default: that of the ``config.yaml``
    beside ``path``, which the trainer writes before the first checkpoint; without one, "": a
    checkpoint of no run, which loads for a run refuse).
    """
    path = Path(path)
    missing = [k for k in KEYS if k not in state]
    if missing:
        raise ValueError(f"checkpoint state lacks {', '.join(missing)}")
    if fingerprint is None:
        rd = RunDir(path.parent)
        fingerprint = config_fingerprint(rd.read_config()) if rd.config.is_file() else ""
    full = {"format": FORMAT, "version": __version__, "fingerprint": fingerprint, **state}
    for key in WEIGHT_KEYS:  # weights in the standard layout, whatever the run's (channels_last)
        full[key] = {k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in full[key].items()}
    full["checksum"] = content_checksum(full)
    atomic_write(path, lambda f: torch.save(full, f))


def load_checkpoint(path: str | Path, map_location="cpu", fingerprint: str | None = None) -> dict:
    """Read a checkpoint safely and verify it: its format, its checksum, and (when given) that
    its fingerprint is ``fingerprint``. A RunDirError says what is wrong and what to do."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise RunDirError(f"{path.parent}: no {path.name} (the run was stopped before its first epoch ended?)") from None
    except Exception as e:  # a truncated, damaged or foreign file
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise RunDirError(f"{path} cannot be read as a fairdistill checkpoint ({first}): it is damaged or another "
                          "kind of file; restore it from a copy or train the run again") from None
    found = state.get("format") if isinstance(state, dict) else type(state).__name__
    if found == 1:
        raise RunDirError(
            f"{path} is a format-1 checkpoint (fairdistill {state.get('version', '?')}): it carries no checksum or "
            f"config fingerprint, so it cannot be verified, and this version reads format {FORMAT} only. Train the run "
            f"again; to use its weights as a teacher anyway, unverified, pass teacher.checkpoint={path} with "
            "teacher.model.name=... (and its options)")
    if found != FORMAT or any(k not in state for k in (*KEYS, "fingerprint", "checksum")):
        raise RunDirError(f"{path}: not a fairdistill checkpoint of format {FORMAT} (found format {found!r})")
    try:
        actual = content_checksum(state)
    except TypeError as e:
        raise RunDirError(f"{path} is damaged ({e})") from None
    if actual != state["checksum"]:
        raise RunDirError(f"{path} is damaged: its contents do not match their SHA-256 checksum (changed or corrupted "
                          "after it was written); restore it from a copy or train the run again")
    if fingerprint is not None and state["fingerprint"] != fingerprint:
        raise RunDirError(f"{path} belongs to another run: its config fingerprint {state['fingerprint'][:12]} is not "
                          f"{fingerprint[:12]}, that of the config it is loaded for ({path.parent / 'config.yaml'})")
    return state


def load_run_checkpoint(run_dir: str | Path, map_location="cpu") -> dict:
    """The verified checkpoint of a run directory: checksum, and fingerprint against the run's
    own ``config.yaml``."""
    rd = RunDir(run_dir)
    return load_checkpoint(rd.checkpoint, map_location, fingerprint=config_fingerprint(rd.read_config()))


def load_weights(path: str | Path, map_location="cpu") -> dict:
    """The student's state dict from a checkpoint, verified (:func:`load_checkpoint`); with a
    ``config.yaml`` beside it (a run directory) also against that run's fingerprint."""
    path = Path(path)
    if (path.parent / "config.yaml").is_file():
        return load_run_checkpoint(path.parent, map_location)["model"]
    return load_checkpoint(path, map_location)["model"]


def checkpoint_progress(path: str | Path) -> dict | None:
    """``{"stage", "epoch", "epochs_done", "last"}`` of a checkpoint, read without its tensors
    (memory-mapped, not verified); None when it cannot be read."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        history = state["history"]
        return {"stage": state["stage"], "epoch": state["epoch"], "epochs_done": len(history),
                "last": history[-1] if history else None}
    except Exception:
        return None


def run_notes(run_dir: str | Path) -> list[str]:
    """What a reader of a run directory (``eval``, ``tsne``) should be told: that the run is
    still being written (and by whom), or that it is unfinished and at which epoch."""
    rd = RunDir(run_dir)
    notes = []
    holder = lock_holder(rd.path)
    if holder is not None:
        notes.append(f"{rd.path} is still being written by {holder}; reading the checkpoint of its last completed epoch")
    if not rd.finished and rd.checkpoint.is_file():
        prog = checkpoint_progress(rd.checkpoint)
        if prog is not None:
            try:
                total = f" of {sum(st.epochs for st in stage_list(rd.read_config()))}"
            except Exception:  # an old or damaged config: the count is only a courtesy
                total = ""
            last = prog["last"] or {}
            where = f" (stage {last['stage']!r}, epoch {last['epoch']})" if "stage" in last and "epoch" in last else ""
            notes.append(f"{rd.path} is an unfinished run (no result.json): its checkpoint is after epoch "
                         f"{prog['epochs_done']}{total}{where}")
    return notes
