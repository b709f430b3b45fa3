"""Failed writes as errors a user can act on: what failed, what was kept, what to do."""
from __future__ import annotations

import errno
from pathlib import Path

from .errors import RunDirError

RUN_FILES = ("config.yaml", "checkpoint.pt", "metrics.jsonl", "result.json")
"""The files ``train`` writes in a run directory (their interrupted temporaries are its to remove)."""


def write_error(path: Path, err: OSError) -> RunDirError:
    """The RunDirError a user can act on for ``err`` raised while writing ``path``."""
    path = Path(path)
    if err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        kept = "the previous checkpoint is intact" if path.name == "checkpoint.pt" else (
            f"the previous {path.name} is intact" if path.is_file() else f"no {path.name} was written")
        hint = f"; free some space, then continue with `fairdistill train --resume {path.parent}`" \
            if path.name in RUN_FILES else "; free some space and run the command again"
        return RunDirError(f"no space left on device while writing {path}; {kept}{hint}")
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "the file system is read-only" if err.errno == errno.EROFS else "permission denied"
        return RunDirError(f"cannot write {path}: {why}; choose a writable folder (out=DIR) or make {path.parent} writable")
    if isinstance(err, (NotADirectoryError, FileExistsError)) or err.errno in (errno.ENOTDIR, errno.EEXIST):
        blocker = next((p for p in [path.parent, *path.parent.parents] if p.exists() and not p.is_dir()), None)
        where = f"{blocker} is a file, not a folder" if blocker else (err.strerror or str(err))
        return RunDirError(f"cannot write {path}: {where}; choose another folder (out=DIR)")
    return RunDirError(f"cannot write {path}: {err.strerror or err}")
