"""Image files -> the uint8 (N, 3, H, W) tensor of :class:`ImageDataset`.

Shared by the file-based loaders (``utkface``, ``celeba``, ``imagefolder``). Files are decoded
with Pillow in a thread pool (Pillow releases the GIL while decoding and resampling), resized
as torchvision's ``Resize`` does on PIL images (bilinear, with Pillow's antialiasing) or kept
at their original size (``size=None``: every file must then have the first file's size), and
written straight into one preallocated array, so peak memory is the data set plus one image
per thread. An optional cache stores the decoded array next to the data, keyed by the file
list and the resize settings, and is written atomically.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import DataError
from ..registry import check_number

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CACHE_FORMAT = 1
MAX_LISTED = 5
"""How many offending files an error message names."""


def check_size(key: str, value) -> int:
    """``value`` as a positive int (pixels, or a count), or a ConfigError naming ``key``."""
    return check_number(value, key, integer=True, ge=1)


def first_few(items: Sequence) -> str:
    """The first ``MAX_LISTED`` items joined, with a count of the rest."""
    shown = ", ".join(str(i) for i in items[:MAX_LISTED])
    return shown + (f" (and {len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else "")


def resize_rgb(image: Image.Image, size: int | None, crop: int | None = None) -> Image.Image:
    """RGB ``image`` resized like torchvision on PIL images.

    ``size is None``: unchanged (original size; ``crop`` must be None).
    ``crop is None``: squashed to ``size x size`` (``Resize((size, size))``).
    Otherwise the shorter side goes to ``size`` (``Resize(size)``: the longer side becomes
    ``int(size * long / short)``), then the centre ``crop x crop`` is kept (``CenterCrop``).
    """
    image = image.convert("RGB")
    if size is None:
        if crop is not None:
            raise ValueError("resize_rgb: a centre crop needs a size to resize to first")
        return image
    if crop is None:
        return image.resize((size, size), pil().BILINEAR)
    w, h = image.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), pil().BILINEAR)
    top, left = int(round((new_h - crop) / 2.0)), int(round((new_w - crop) / 2.0))
    return image.crop((left, top, left + crop, top + crop))


def pil():
    """Pillow's ``Image`` module, imported where images are read (not at start-up)."""
    from PIL import Image

    return Image


def read_errors() -> tuple:
    """What reading an image file can raise (missing, unreadable, truncated, a decompression bomb)."""
    return (OSError, ValueError, SyntaxError, pil().DecompressionBombError)


def stored_hw(paths: Sequence[Path], size: int | None, crop: int | None, *, name: str) -> tuple[int, int]:
    """(height, width) of the decoded images: ``crop or size`` square, or with ``size=None``
    the first file's own size (read from its header; (0, 0) for no files)."""
    if size is not None:
        return (crop or size,) * 2
    if not paths:
        return 0, 0
    try:
        with pil().open(paths[0]) as image:
            w, h = image.size
    except read_errors() as err:
        raise DataError(f"{name}: image file {paths[0]} could not be read ({type(err).__name__}: {err})") from None
    return h, w


def decode_images(paths: Sequence[Path], size: int | None, crop: int | None = None, *, name: str,
                  workers: int | None = None) -> torch.Tensor:
    """Decode ``paths`` into a uint8 (N, 3, H, W) tensor, ``H = W = crop or size``, or with
    ``size=None`` the files' own size, the same for all (see ``resize_rgb``).

    Files that are missing or that Pillow cannot read, and with ``size=None`` files of another
    size than the first, give one DataError naming the first few.
    """
    h, w = stored_hw(paths, size, crop, name=name)
    out = np.empty((len(paths), 3, h, w), dtype=np.uint8)

    def work(i: int) -> tuple[str, str] | None:
        try:
            with pil().open(paths[i]) as image:
                if size is None and image.size != (w, h):
                    return "size", f"{paths[i]} is {image.size[0]}x{image.size[1]}"
                out[i] = np.asarray(resize_rgb(image, size, crop)).transpose(2, 0, 1)
        except read_errors() as err:
            return "read", f"{paths[i]} ({type(err).__name__}: {err})"
        return None

    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        problems = [p for p in pool.map(work, range(len(paths))) if p is not None]
    failed = [msg for kind, msg in problems if kind == "read"]
    if failed:
        raise DataError(f"{name}: {len(failed)} image file(s) could not be read: {first_few(failed)}")
    if problems:
        odd = [msg for _, msg in problems]
        raise DataError(
            f"{name}: {len(odd)} image file(s) are not {w}x{h} (width x height) like {paths[0]}, so the images "
            f"cannot be stored at their original size: {first_few(odd)}; store them resized instead "
            f"(the data set's size option, e.g. train_size=176)"
        )
    return torch.from_numpy(out)


def cache_path(cache_dir: Path, base: Path, name: str, names: Sequence[str], size: int | None, crop: int | None) -> Path:
    """Cache file for the files ``base / n`` (``n`` in ``names``) at these resize settings."""
    key = json.dumps({"format": CACHE_FORMAT, "name": name, "base": str(Path(base).resolve()), "size": size,
                      "crop": crop, "files": list(names)})
    return Path(cache_dir) / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt"


def cache_folder(root, cache: bool, cache_dir) -> Path | None:
    """Where the decoded-image cache lives: ``cache_dir``, else ``ROOT/.fairdistill_cache``; None when off."""
    if not cache:
        return None
    return Path(cache_dir) if cache_dir else Path(root) / ".fairdistill_cache"


def load_images(base: Path, names: Sequence[str], size: int | None, crop: int | None = None, *, name: str,
                cache_dir: Path | None = None) -> torch.Tensor:
    """Decoded images of the files ``base / n`` for ``n`` in ``names`` (see ``decode_images``).

    With ``cache_dir`` the result is read from, or else written to, a cache file there whose
    name hashes ``name``, the absolute ``base`` (a moved data folder is decoded afresh),
    ``names``, ``size`` (None: original size) and ``crop``. An unreadable cache is rebuilt; a cache that cannot be
    written only logs a warning.
    """
    target = cache_path(cache_dir, base, name, names, size, crop) if cache_dir is not None else None
    if target is not None and target.exists():
        try:
            images = torch.load(target, weights_only=True)
            hw = stored_hw([Path(base) / n for n in names[:1]], size, crop, name=name)
            if (isinstance(images, torch.Tensor) and images.dtype == torch.uint8
                    and tuple(images.shape) == (len(names), 3, *hw)):
                return images
            log.warning("%s: cache %s holds unexpected data; decoding the images again", name, target)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
            log.warning("%s: cache %s is unreadable (%s); decoding the images again", name, target, err)
    images = decode_images([Path(base) / n for n in names], size, crop, name=name)
    if target is not None:
        write_image_cache(target, images, name)
    return images


def write_image_cache(target: Path, tensors, name: str) -> None:
    """Store decoded ``tensors`` (a tensor or a dict of tensors; read back with
    ``weights_only=True``) as image cache ``target``, atomically; a folder that cannot be
    written leaves a warning naming data set ``name`` and the cache, and no temporary file."""
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
        os.close(fd)
        torch.save(tensors, tmp)
        os.replace(tmp, target)
    except OSError as err:
        log.warning("%s: could not write the image cache %s (%s); set cache_dir to a writable folder", name, target, err)
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
