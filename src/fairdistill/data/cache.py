"""An on-disk cache of built data sets (the embedded digits sets), shared by processes.

Building digits-s imports scikit-learn (2-3 s) and renders the images in every process; a sweep
starts one process per run, and the tests start many. A built set is therefore stored once, as
arrays, and read back by every later process:

- where: ``$FAIRDISTILL_CACHE`` (a folder; ``off`` disables the cache), else
  ``$XDG_CACHE_HOME/fairdistill``, else ``~/.cache/fairdistill``;
- what: one ``.npz`` file per (set, key), named ``<set>-<hash of the key>.npz``, holding the
  arrays and the key itself (``__key__``, JSON) and the format (``__format__``). The key holds
  everything the content depends on: the options, the construction's own version and
  constants, the torch and scikit-learn versions (see the builders);
- reading is safe: ``numpy.load(allow_pickle=False)`` (a file holding a pickled object is
  refused, never run), and a file whose format, key, array names, dtypes or shapes are not the
  expected ones is refused with a warning, rebuilt and replaced;
- writing is atomic (a temporary file in the same folder, then ``os.replace``), so a process
  never reads a half-written file, and concurrent builders simply write the same content. A
  cache folder that cannot be written leaves the set built in memory (one warning per process).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

ENV = "FAIRDISTILL_CACHE"
FORMAT = 1
"""Version of the file layout (``__key__``, ``__format__`` and named arrays)."""
OFF = ("off", "none", "0", "false")
_warned: set = set()


def cache_dir(environ=None) -> Path | None:
    """The cache folder (not created here), or None when ``$FAIRDISTILL_CACHE`` is ``off``."""
    env = os.environ if environ is None else environ
    chosen = env.get(ENV, "").strip()
    if chosen.lower() in OFF:
        return None
    if chosen:
        return Path(chosen).expanduser()
    base = env.get("XDG_CACHE_HOME", "").strip()
    return (Path(base) if base else Path(env.get("HOME") or Path.home()) / ".cache") / "fairdistill"


def key_text(key: dict) -> str:
    """The canonical JSON of a key (sorted keys, compact)."""
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


def cache_path(name: str, key: dict, folder: Path) -> Path:
    return folder / f"{name}-{hashlib.sha256(key_text(key).encode()).hexdigest()[:20]}.npz"


def _warn_once(what: str, text: str) -> None:
    if what not in _warned:
        _warned.add(what)
        log.warning(text)


def read_arrays(path: Path, key: dict, expected: dict[str, tuple]) -> dict[str, np.ndarray] | None:
    """The arrays of cache file ``path``, or None when there is none. ``expected`` maps each
    array's name to (dtype, shape), None in a shape for any length. A file that is not such a
    cache (not an npz, pickled objects, another format or key, other arrays) is refused: a
    warning, and None."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        problem = None
        if set(arrays) != {"__key__", "__format__", *expected}:
            problem = f"arrays {sorted(arrays)}"
        elif int(arrays["__format__"]) != FORMAT:
            problem = f"format {int(arrays['__format__'])}"
        elif str(arrays["__key__"]) != key_text(key):
            problem = "another key"
        else:
            for k, (dtype, shape) in expected.items():
                a = arrays[k]
                if a.dtype != np.dtype(dtype) or a.ndim != len(shape) or \
                        any(s is not None and s != n for s, n in zip(shape, a.shape)):
                    problem = f"{k}: {a.dtype} {a.shape}, expected {np.dtype(dtype)} {shape}"
                    break
    except Exception as e:  # not a zip, a pickled object (ValueError), a damaged member
        problem = f"{type(e).__name__}: {str(e)[:120]}"
    if problem:
        log.warning("%s is not a fairdistill cache of this data (%s); it is rebuilt and replaced", path, problem)
        return None
    return {k: v for k, v in arrays.items() if not k.startswith("__")}


def write_arrays(path: Path, key: dict, arrays: dict[str, np.ndarray]) -> bool:
    """Store ``arrays`` with ``key`` at ``path`` atomically; False (one warning per process)
    when the folder cannot be written."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, __key__=np.array(key_text(key)), __format__=np.array(FORMAT), **arrays)
        os.replace(tmp, path)
        return True
    except OSError as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        _warn_once(str(path.parent), f"data cache {path.parent} cannot be written ({e.strerror or e}); built data "
                                     f"sets are not cached (set {ENV} to another folder, or {ENV}=off)")
        return False


def cached(name: str, key: dict, expected: dict[str, tuple], build: Callable[[], dict[str, np.ndarray]],
           environ=None) -> dict[str, np.ndarray]:
    """The arrays of data set ``name`` with ``key``: read from the cache, else ``build()``
    (arrays named and typed as ``expected``) and stored."""
    folder = cache_dir(environ)
    path = cache_path(name, key, folder) if folder is not None else None
    if path is not None:
        found = read_arrays(path, key, expected)
        if found is not None:
            return found
    arrays = {k: np.ascontiguousarray(v) for k, v in build().items()}
    if path is not None:
        write_arrays(path, key, arrays)
    return arrays
