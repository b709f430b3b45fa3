"""One writer per run folder: an exclusive OS lock on ``RUN_DIR/run.lock`` (:class:`RunLock`),
and the probe that readers use to see whether a run is being written (:func:`lock_holder`).

The kernel holds the lock for the process (``flock`` on Linux and macOS, ``msvcrt.locking`` on
Windows) and releases it when the process ends in any way, ``kill -9`` included. The lock file
holds the holder's PID, host and start time as JSON, for the error that refuses a second writer.
Used through :meth:`fairdistill.rundir.RunDir.lock` and :meth:`~fairdistill.rundir.RunDir.writer`.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import RunDirError
from .write_errors import write_error

log = logging.getLogger(__name__)

_UMASK = os.umask(0)
os.umask(_UMASK)

LOCK = "run.lock"
"""The lock file of a run directory's writer."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds a run directory's lock (from its lock file; fields may be unknown)."""

    pid: int | None
    host: str = ""
    since: str = ""

    def __str__(self) -> str:
        who = f"process {self.pid}" if self.pid else "another process"
        return who + (f" on {self.host}" if self.host and self.host != socket.gethostname() else "") + \
            (f" (since {self.since})" if self.since else "")


try:  # POSIX
    import fcntl

    def _try_lock(fd: int, exclusive: bool) -> bool:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)

except ImportError:  # pragma: no cover - Windows
    try:
        import msvcrt

        _REGION = 1 << 20  # the locked byte lies past the holder's JSON, which stays readable

        def _try_lock(fd: int, exclusive: bool) -> bool:
            os.lseek(fd, _REGION, os.SEEK_SET)
            try:
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
                return True
            except OSError:
                return False

        def _unlock(fd: int) -> None:
            os.lseek(fd, _REGION, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

    except ImportError:
        _try_lock = _unlock = None

_UNSUPPORTED = {errno.ENOLCK, errno.EINVAL, getattr(errno, "ENOTSUP", -1), getattr(errno, "EOPNOTSUPP", -1),
                getattr(errno, "ENOSYS", -1)}


def _read_holder(path: Path) -> LockHolder:
    for _ in range(20):  # the holder writes its JSON right after taking the lock
        try:
            info = json.loads(path.read_text() or "null")
        except (OSError, ValueError):
            info = None
        if isinstance(info, dict):
            pid = info.get("pid")
            return LockHolder(pid if isinstance(pid, int) else None, str(info.get("host", "")), str(info.get("since", "")))
        time.sleep(0.01)
    return LockHolder(None)


class RunLock:
    """The one-writer lock of a run directory: an exclusive OS lock on ``RUN_DIR/run.lock``.

    ``fairdistill train`` holds it from its first write to its last (a launcher that starts
    ``train`` in a child process must not hold it itself: check :meth:`RunDir.writer` instead).
    It is an OS lock (``flock`` on Linux and macOS, ``msvcrt.locking`` on Windows), so the kernel
    releases it when the holder ends in any way, ``kill -9`` included: a stale ``run.lock`` never
    blocks anyone. A second writer is refused at once with a RunDirError naming the folder and
    the holder (PID, host, start time: the lock file's JSON). On a file system without locks
    (some Lustre or old NFS mounts) a warning says one writer per folder is not enforced there.

    Use as a context manager (``with RunDir(path).lock(): ...``) or ``acquire()``/``release()``;
    keep the object while holding the lock (a lost one lets go when it is garbage-collected).
    ``acquire`` creates the folder when needed; ``release`` removes ``run.lock`` (and the folder,
    when it created it and nothing else was written). Not reentrant: a second ``acquire`` of the
    same folder, in this process or another, is refused.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self._fd: int | None = None
        self._created = False

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> "RunLock":
        if self._fd is not None:
            raise RunDirError(f"{self.folder}: this process already holds its lock")
        self._created = not self.folder.exists()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_error(self.path, e) from None
        deadline = time.monotonic() + 0.5  # readers probe with a momentary shared lock
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
            except OSError as e:
                raise write_error(self.path, e) from None
            try:
                if _try_lock is None:
                    raise OSError(errno.ENOSYS, "no file locks on this platform")
                got = _try_lock(fd, exclusive=True)
            except OSError as e:
                if e.errno not in _UNSUPPORTED:
                    os.close(fd)
                    raise RunDirError(f"{self.path}: cannot take the writer's lock ({e.strerror or e})") from None
                log.warning("%s: the file system does not support file locks (%s); one writer per run folder is not "
                            "enforced there", self.folder, e.strerror or e)
                got = True
            if not got:
                os.close(fd)
                if time.monotonic() < deadline:
                    time.sleep(0.02)
                    continue
                raise busy_error(self.folder, _read_holder(self.path))
            try:  # the file may have been removed by a holder that released it meanwhile: lock its successor
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")})
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (info + "\n").encode())
            self._fd = fd
            return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                os.unlink(self.path)  # still holding it: a waiting process re-checks and locks a new file
        except OSError:
            pass
        if _try_lock is not None:
            try:
                _unlock(fd)
            except OSError:
                pass
        os.close(fd)
        if self._created:
            try:
                self.folder.rmdir()  # only when empty: a run that wrote nothing leaves nothing
            except OSError:
                pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):  # a lost object still lets go (the kernel would at exit anyway)
        if getattr(self, "_fd", None) is not None:
            self.release()


def busy_error(folder: Path, holder: LockHolder) -> RunDirError:
    """The refusal of a second writer of ``folder``."""
    stop = f" (kill {holder.pid})" if holder.pid and (not holder.host or holder.host == socket.gethostname()) else ""
    return RunDirError(f"{folder} is being written by {holder}: one run folder has one writer; wait for that run "
                       f"to end or stop it{stop}, or choose another out=DIR")


def lock_holder(folder: str | os.PathLike) -> LockHolder | None:
    """The process writing run directory ``folder`` now, or None. Takes no lock beyond a
    momentary shared probe, so readers (``eval``, ``tsne``, a launcher) never block a writer."""
    path = Path(folder) / LOCK
    try:
        fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)
    except OSError:
        return None
    try:
        if _try_lock is None or _try_lock(fd, exclusive=False):
            if _try_lock is not None:
                _unlock(fd)
            return None
    except OSError:  # no locks on this file system: the file's presence is all there is
        return _read_holder(path)
    finally:
        os.close(fd)
    return _read_holder(path)
