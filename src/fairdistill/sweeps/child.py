"""The process of one run of a local sweep: ``python -m fairdistill.sweeps.child SWEEP_PID train ...``.

Only the standard library is imported before the death signal is set up (the package's
``__init__`` loads its modules lazily), so a sweep killed while its runs start up takes them along.

It runs ``fairdistill train ...`` and dies with its sweep, however the sweep ends (also by
SIGKILL): on Linux the kernel sends it SIGTERM when the sweep's process ends (``prctl
PR_SET_PDEATHSIG``, set here, then a check that the sweep did not end before); elsewhere a
watcher thread sees its parent process change and sends itself SIGTERM. SIGTERM and SIGINT stop
the run as Ctrl-C does (its last epoch's checkpoint stays), also when the sweep was started
with SIGINT ignored, which its children inherit.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _watch(parent: int, every: float) -> None:
    while os.getppid() == parent:
        time.sleep(every)
    os.kill(os.getpid(), signal.SIGTERM)


def die_with_parent(parent: int, every: float = 1.0) -> str:
    """Arrange SIGTERM for this process when process ``parent`` (its parent) ends; returns how:
    ``"prctl"`` (Linux) or ``"watcher"`` (a daemon thread polling the parent id every ``every`` s)."""
    how = "watcher"
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) == 0:
                how = "prctl"
        except (OSError, AttributeError):
            pass
    if how == "prctl":
        if os.getppid() != parent:  # the sweep ended before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)
    else:
        threading.Thread(target=_watch, args=(parent, every), daemon=True, name="parent-watcher").start()
    return how


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or not argv[0].isdigit():
        print("usage: python -m fairdistill.sweeps.child SWEEP_PID train CONFIG [key=value ...]", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.default_int_handler)  # inherited as ignored in background sweeps
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        die_with_parent(int(argv[0]))
        from ..cli import main as cli_main  # torch and the rest: seconds, during which the sweep may end
    except KeyboardInterrupt:
        print("fairdistill: interrupted before the run started (its sweep ended or was stopped)", file=sys.stderr)
        return 130
    return cli_main(argv[1:])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
