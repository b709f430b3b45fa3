"""The CPU memory allocator settings of a fairdistill process (glibc ``mallopt``).

A training step frees and re-allocates the same large activation buffers every step. With
glibc's defaults, blocks above the (dynamic, up to 32 MiB) mmap threshold are ``mmap``-ed and
``munmap``-ed each time, and free memory above the trim threshold at the top of the heap is
returned to the kernel: the next step touches fresh pages, and every page fault costs kernel
time. Measured here (MFD CNN floor, 32x32, one thread, CPU time): 268 of 868 ms of a batch-256
step in the kernel; ``M_MMAP_MAX = 0`` (never mmap: every block comes from the heap) and
``M_TRIM_THRESHOLD = -1`` (never trim the heap) cut the floor by 22% at batch 128 and 40% at
batch 256 (``benchmarks/bench_floor.py``), and make the evaluation time flat in the batch size.
The cost: the process keeps its peak heap until it ends (a training process reaches that peak
every step anyway).

``fairdistill`` (the command line, and so sweeps' and torchrun's processes) calls
:func:`configure` before it imports torch. The environment variable ``FAIRDISTILL_MALLOC``
chooses: ``tuned`` (the default on Linux with glibc) or ``system`` (glibc's defaults, unchanged).
Settings made outside are left alone: any of glibc's own ``MALLOC_MMAP_MAX_``,
``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TOP_PAD_`` variables or a
``glibc.malloc`` tunable in ``GLIBC_TUNABLES``, or another allocator in ``LD_PRELOAD``
(jemalloc, tcmalloc, mimalloc). Python code that trains through :func:`fairdistill.engine.train`
may call :func:`configure` first, before torch allocates its large tensors.
"""
from __future__ import annotations

import ctypes
import os
import sys

from .errors import ConfigError

ENV = "FAIRDISTILL_MALLOC"
MODES = ("tuned", "system")
M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_MAX = -4
SETTINGS = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))
"""(param, value) pairs of the tuned mode: no mmap-ed blocks, no trimming (-1 is SIZE_MAX)."""
GLIBC_VARIABLES = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")
OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

_state: str | None = None


def outside_settings(environ=None) -> str | None:
    """What in the environment already sets the allocator (a variable's name), or None."""
    env = os.environ if environ is None else environ
    for name in GLIBC_VARIABLES:
        if name in env:
            return name
    if "glibc.malloc." in env.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    preload = env.get("LD_PRELOAD", "")
    if any(a in preload for a in OTHER_ALLOCATORS):
        return "LD_PRELOAD"
    return None


def glibc() -> bool:
    """Whether this process runs on glibc (whose ``mallopt`` takes these settings)."""
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (AttributeError, ValueError, OSError):
        return False


def requested_mode(environ=None) -> str:
    """``FAIRDISTILL_MALLOC`` (default ``tuned``), checked."""
    env = os.environ if environ is None else environ
    mode = env.get(ENV, "tuned").strip().lower() or "tuned"
    if mode not in MODES:
        raise ConfigError(f"{ENV}: expected one of {', '.join(MODES)} (tuned: fairdistill's malloc settings; system: "
                          f"glibc's defaults), got {env.get(ENV)!r}")
    return mode


def configure(environ=None) -> str:
    """Apply the allocator settings of ``FAIRDISTILL_MALLOC`` to this process, once; returns
    what holds: ``tuned`` (applied now or before), ``system`` (asked for), ``outside`` (the
    environment sets the allocator) or ``unavailable`` (not Linux with glibc, or ``mallopt``
    refused). Only allocations made after the call are affected."""
    global _state
    if _state is not None:
        return _state
    mode = requested_mode(environ)
    if mode == "system":
        _state = "system"
    elif outside_settings(environ):
        _state = "outside"
    elif not (sys.platform.startswith("linux") and glibc()):
        _state = "unavailable"
    else:
        try:
            libc = ctypes.CDLL(None)
            ok = all(libc.mallopt(param, value) == 1 for param, value in SETTINGS)
        except (OSError, AttributeError):
            ok = False
        _state = "tuned" if ok else "unavailable"
    return _state
