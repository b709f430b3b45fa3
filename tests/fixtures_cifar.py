"""Tiny CIFAR folders written the way the real (Python 2) pickles are.

Python 2 pickled its ``str`` (the keys, the file names, the raw numpy buffer and numpy's dtype
codes) with the BINSTRING opcodes, which Python 3 turns into ``bytes`` under ``encoding="bytes"``
and into ``str`` under ``encoding="latin1"``, and it named numpy's array rebuilder
``numpy.core.multiarray._reconstruct``. ``Py2Pickler`` writes Python 3 ``bytes`` and ``str``
with those opcodes and that name, at protocol 2, so a loader that passes on these files behaves
as on the real ones.
"""
from __future__ import annotations

import io
import os
import pickle
import struct

import numpy as np


class Py2Pickler(pickle._Pickler):
    """Protocol-2 pickler that writes ``bytes`` as Python 2 ``str`` (SHORT_BINSTRING/BINSTRING)."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    def save_native_str(self, obj: str) -> None:
        self.save_py2_str(obj.encode("latin1"))

    def save_global(self, obj, name=None) -> None:
        module = getattr(obj, "__module__", "")
        if module.startswith("numpy._core"):
            qualname = name or obj.__qualname__
            self.write(pickle.GLOBAL + module.replace("numpy._core", "numpy.core").encode() + b"\n" + qualname.encode() + b"\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_native_str


def py2_dumps(obj) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def write_batch(path: str, data: np.ndarray, labels: dict[bytes, list[int]], batch_label: bytes = b"batch") -> None:
    content = {b"batch_label": batch_label, b"data": data, b"filenames": [b"img_%d.png" % i for i in range(len(data))]}
    content.update(labels)
    with open(path, "wb") as f:
        f.write(py2_dumps(content))


def make_cifar10(root: str, per_batch: int = 20, test: int = 20, seed: int = 0) -> dict:
    """``root/cifar-10-batches-py`` with 5 train batches of ``per_batch`` images (labels cycle
    0..9, so classes are balanced when ``per_batch`` is a multiple of 10) and a test batch.
    Returns the arrays written: train/test data (N, 3072) uint8 and labels."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    train_x, train_y = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.permutation(np.arange(per_batch) % 10)]
        write_batch(os.path.join(folder, f"data_batch_{i}"), x, {b"labels": y}, b"training batch %d of 5" % i)
        train_x.append(x)
        train_y += y
    tx = rng.integers(0, 256, (test, 3072), dtype=np.uint8)
    ty = [int(v) for v in np.arange(test) % 10]
    write_batch(os.path.join(folder, "test_batch"), tx, {b"labels": ty}, b"testing batch 1 of 1")
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        f.write(py2_dumps({b"label_names": names, b"num_cases_per_batch": per_batch, b"num_vis": 3072}))
    return {"train_x": np.concatenate(train_x), "train_y": np.array(train_y), "test_x": tx, "test_y": np.array(ty)}


def make_cifar100(root: str, train: int = 40, test: int = 20, seed: int = 0) -> dict:
    """``root/cifar-100-python`` with ``train`` and ``test`` files (fine label = 2 * coarse + i % 2
    restricted to 100 classes) and a ``meta`` file; returns the arrays written."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    out = {}
    for name, n in (("train", train), ("test", test)):
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, n)]
        coarse = [f // 5 for f in fine]
        write_batch(os.path.join(folder, name), x, {b"fine_labels": fine, b"coarse_labels": coarse}, name.encode())
        out[f"{name}_x"], out[f"{name}_fine"], out[f"{name}_coarse"] = x, np.array(fine), np.array(coarse)
    meta = {
        b"fine_label_names": [b"fine%d" % i for i in range(100)],
        b"coarse_label_names": [b"coarse%d" % i for i in range(20)],
    }
    with open(os.path.join(folder, "meta"), "wb") as f:
        f.write(py2_dumps(meta))
    return out
