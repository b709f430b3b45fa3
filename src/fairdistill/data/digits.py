"""digits-s: the embedded default data set, a small CIFAR-10S built from scikit-learn's digits.

Needs no download: ``sklearn.datasets.load_digits()`` gives 1797 8x8 gray digits (values 0..16,
10 classes). Construction (everything except the gray/colour assignment of training images is
fixed by the constant ``LAYOUT_SEED``, so it does not depend on ``seed``):

1. Split: per class, a fixed third of the digits (rounded) is the test set: 599 test and 1198
   training digits.
2. Intensity map d in [0, 1]: the digit / 16, resized bilinearly to ``size`` x ``size`` when
   ``size != 8``, plus Gaussian pixel noise of standard deviation ``noise``, clipped to [0, 1].
3. Colour version: luma ``Y = 0.3 + 0.4 d`` plus a chroma vector c that has zero luma (it lies
   in the plane orthogonal to the ITU-R 601 weights w = (0.299, 0.587, 0.114)): the background
   gets ``-0.3 u``, the stroke ``+0.3 u`` (linear in d between), with u a unit vector of random
   hue, drawn per digit. RGB = Y + c, in [0, 1] by construction, stored as uint8.
4. Gray version: PIL's ITU-R 601 luma of the colour version (``cifar.luma``), copied to 3
   channels; it equals Y up to rounding, so both versions show the digit with the same
   luminance contrast and colour only adds the chroma cue.
5. CIFAR-10S-style protocol (``cifar.skewed_groups``: ``torch.randperm`` order and per-class
   counts, not MFD's numpy order and 5000 per class): training digits shuffled with ``seed``; of the
   n_c training digits of class c, the first ``floor(n_c * skew)`` are gray for classes 0-4 and
   the first ``n_c - floor(n_c * skew)`` for classes 5-9, the rest colour. Test = every test
   digit gray (group 0) and then colour (group 1): 1198 images, about 60 per cell.
6. Normalisation: per-channel mean/std of both versions of all training digits (independent of
   ``seed``), because the plain MFD CNN (no BatchNorm) learns far faster on centred inputs.
7. Only with the option ``renders`` = k > 1: the training split holds k renderings of every
   training digit, the first that of steps 2-3, rendering r >= 1 redrawn by steps 2-3 with its
   own fixed generator (seed ``LAYOUT_SEED + r``: new noise and hue); each keeps the digit's
   gray/colour assignment of step 5 (and, with ``val_fraction``, the same digits are held out of
   every rendering). Test set and normalisation are those of k = 1.

Why the bias is real. With skew 0.95, 5% of the training images of each class carry the
minority appearance (6 or 7 per class), so gray vs colour is a strong shortcut for the split
{0-4} vs {5-9}, and noisy digits are ambiguous across it (3/5/8, 4/9, 1/7, 0/6). Measured with
the MFD CIFAR CNN (conv3-32, conv3-32, maxpool, dropout .25, conv3-64 x2, ..., conv3-128 x2,
maxpool, dropout .25, fc 128->256, fc 256->10), Adam 1e-3, batch 128, uniform sampler, no
augmentation, default options, one CPU thread (``configs/digits_s/scratch.yaml`` with
``epochs`` and ``seed`` set; 9 steps per epoch, about 0.033 s per step on an idle machine; the
30- and 15-epoch figures are epochs 30 and 15 of the 40- and 20-epoch runs, the schedule being
constant):

- skew 0.95, 40 epochs: accuracy 90.3 / 91.3 / 84.7 %, DEO_A 16.7 / 14.4 / 27.9 (seeds 0/1/2),
  mean 88.8 % and 19.7;
- skew 0.95, 30 epochs: accuracy 89.9 / 88.9 / 81.7 %, DEO_A 17.5 / 16.2 / 32.3, mean 86.8 % and 22.0;
- skew 0.5 (control), 40 epochs: accuracy 96.4 / 97.7 / 98.2 %, DEO_A 0.5 / 1.2 / 1.2, mean 97.5 % and 0.9;
- skew 0.95, balanced sampler, 20 epochs: accuracy 95.4 / 97.6 / 96.7 %, DEO_A 2.2 / 1.8 / 2.3,
  mean 96.5 % and 2.1.

The skew-0.5 control shows that the unfairness comes from the skew, not from gray digits being
harder; the balanced sampler (SS, 20 epochs of 17 steps: 340 steps against 360) removes
most of it, as SS does on CIFAR-10S (MFD supplement, Table 2). With ``size=16`` the same
network costs about 3.3 times as much per step (1.1 s against 0.33 s per epoch of 10 steps, idle
machine); 15 epochs give accuracy 86.8 / 87.8 / 77.5 % and DEO_A 20.8 / 18.4 / 32.4 (mean 84.1 %
and 23.9), 20 epochs 87.1 / 89.6 / 80.6 % and 19.9 / 16.1 / 32.3: also biased, but slower to converge and more seed-dependent, hence ``size=8`` by default.
"""
from __future__ import annotations

import functools
import math
from importlib.metadata import PackageNotFoundError, version

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .base import DATASETS, ImageDataset
from .cache import cached
from .cifar import GROUP_NAMES, both_versions, check_skew, gray_and_colour, skewed_groups
from .split import check_val_fraction, select_split

LAYOUT_SEED = 1797
"""Seed of the fixed parts: the test split, the noise and the hues."""
TEST_FRACTION = 1 / 3
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
LUMA_BACKGROUND, LUMA_STROKE, CHROMA = 0.3, 0.7, 0.3
GRAY_CLASSES = (0, 1, 2, 3, 4)
VERSION = 1
"""Version of the construction: part of the data cache's key (``data/cache.py``), raised whenever the
images it builds change, so that no cached file of an earlier construction is read."""


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def sklearn_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled digits: images (1797, 8, 8) float64 in [0, 1] (the stored 0..16
    over 16, exact) and labels (1797,) int64; read from the data cache when it holds them, so
    that scikit-learn is imported once per cache, not once per process."""
    def build():
        from sklearn.datasets import load_digits

        raw = load_digits()
        return {"images": raw.images.astype(np.uint8), "labels": raw.target.astype(np.int64)}

    key = {"set": "sklearn-digits", "scikit-learn": package_version("scikit-learn")}
    a = cached("sklearn-digits", key, {"images": ("uint8", (None, 8, 8)), "labels": ("int64", (None,))}, build)
    return torch.from_numpy(a["images"]).double() / 16.0, torch.from_numpy(a["labels"])


@functools.lru_cache(maxsize=4)
def rendered(size: int, noise: float) -> dict[str, torch.Tensor]:
    """The seed-independent part of digits-s (steps 1-3 and 6 of the module docstring) for all
    1797 digits: colour images (N, 3, size, size) uint8, labels, the test mask, and the training
    normalisation (``mean``, ``std``: tuples)."""
    digits, labels = sklearn_digits()
    gen = torch.Generator().manual_seed(LAYOUT_SEED)
    is_test = split_mask(labels, gen)
    colour = colourise(digits, size, noise, gen)
    train_both, _, _ = both_versions(colour[~is_test], labels[~is_test])
    mean, std = channel_stats(train_both)
    return {"colour": colour, "labels": labels, "is_test": is_test, "mean": mean, "std": std}


def build_split(split: str, seed: int, skew: float, size: int, noise: float, val_fraction: float,
                renders: int = 1) -> dict:
    """The arrays of one digits-s split (steps 1-7): images, labels, groups, mean, std."""
    parts = rendered(size, noise)
    colour, labels, is_test = parts["colour"], parts["labels"], parts["is_test"]
    if split == "test":
        x, y, g = both_versions(colour[is_test], labels[is_test])
    else:
        train_y = labels[~is_test]
        g = skewed_groups(train_y, skew, GRAY_CLASSES, seed)
        xs, ys, gs = [], [], []
        for r in range(renders):
            train_x = colour[~is_test] if r == 0 else rerender(sklearn_digits()[0][~is_test], size, noise, r)
            ds = ImageDataset(gray_and_colour(train_x, g), train_y, g, 10, 2, name="digits-s")
            ds = select_split(ds, split, val_fraction)  # the same items in every rendering
            xs.append(ds.images), ys.append(ds.labels), gs.append(ds.groups)
        x, y, g = torch.cat(xs), torch.cat(ys), torch.cat(gs)
    return {"images": x.numpy(), "labels": y.numpy(), "groups": g.numpy(),
            "mean": np.array(parts["mean"], dtype=np.float64), "std": np.array(parts["std"], dtype=np.float64)}


def chroma_basis() -> torch.Tensor:
    """Two orthonormal RGB vectors (2, 3) with zero ITU-R 601 luma (orthogonal to its weights)."""
    w = torch.tensor(LUMA_WEIGHTS, dtype=torch.float64)
    w = w / w.norm()
    red = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    e1 = red - (red @ w) * w
    e1 = e1 / e1.norm()
    return torch.stack([e1, torch.linalg.cross(w, e1)])


def colourise(digits: torch.Tensor, size: int, noise: float, gen: torch.Generator) -> torch.Tensor:
    """Colour versions (N, 3, size, size) uint8 of ``digits`` (N, 8, 8) in [0, 1] (steps 2-3)."""
    n = digits.shape[0]
    d = digits[:, None]
    if size != d.shape[-1]:
        d = F.interpolate(d, size=(size, size), mode="bilinear", align_corners=False)
    d = (d + noise * torch.randn(d.shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    hue = 2 * math.pi * torch.rand(n, generator=gen, dtype=torch.float64)
    u = torch.cos(hue)[:, None] * chroma_basis()[0] + torch.sin(hue)[:, None] * chroma_basis()[1]
    y = LUMA_BACKGROUND + (LUMA_STROKE - LUMA_BACKGROUND) * d
    c = CHROMA * (2 * d - 1) * u[:, :, None, None]
    return ((y + c).clamp(0, 1) * 255).round().to(torch.uint8)


def rerender(digits: torch.Tensor, size: int, noise: float, r: int) -> torch.Tensor:
    """Rendering ``r`` >= 1 of the training digits (step 7): ``colourise`` with its own fixed
    generator (seed ``LAYOUT_SEED + r``), so new pixel noise and new hues, independent of ``seed``."""
    return colourise(digits, size, noise, torch.Generator().manual_seed(LAYOUT_SEED + r))


def split_mask(labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Fixed stratified test split: a random third (rounded) of each class."""
    perm = torch.randperm(labels.numel(), generator=gen)
    mask = torch.zeros(labels.numel(), dtype=torch.bool)
    for c in range(10):
        members = perm[labels[perm] == c]
        mask[members[: round(members.numel() * TEST_FRACTION)]] = True
    return mask


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std, in [0, 1] units, of uint8 images (N, C, H, W)."""
    x = images.double() / 255
    return tuple(x.mean((0, 2, 3)).tolist()), tuple(x.std((0, 2, 3)).tolist())


@DATASETS.register("digits-s")
def digits_s(
    *, root: str | None = None, split: str = "train", seed: int = 0,
    skew: float = 0.95, size: int = 8, noise: float = 0.1, val_fraction: float = 0.0, renders: int = 1,
) -> ImageDataset:
    """digits-s (module docstring); ``root`` is unused (the data ship with scikit-learn).

    ``skew``: share of each class's training digits in its majority appearance (gray for 0-4,
    colour for 5-9); 0.5 is balanced. ``size``: image side in pixels (8 = native; larger sizes
    are bilinear upsamplings). ``noise``: standard deviation of the Gaussian pixel noise on the
    [0, 1] intensity map, the knob for how ambiguous the digits are. ``seed``: which training
    digits are gray. ``val_fraction``: share of each (group, class) cell held out of "train" as
    "val" (``split.py``). ``renders``: renderings of each training digit in the training set
    (step 7; 1 = the single rendering of steps 2-3, the default); each further rendering draws
    its own noise and hue, keeps the digit's gray/colour assignment, and multiplies the training
    set (and the steps of an epoch) by ``renders``; the test set and the normalisation are unchanged.
    """
    skew = check_skew("digits-s", skew)
    if int(size) != size or size < 8:
        raise ConfigError(f"digits-s: size must be an integer >= 8 (the digits are 8x8), got {size!r}")
    if not noise >= 0:
        raise ConfigError(f"digits-s: noise must be >= 0, got {noise!r}")
    if isinstance(renders, bool) or not isinstance(renders, int) or renders < 1:
        raise ConfigError(f"digits-s: option renders must be an integer >= 1 (renderings of each training digit), got {renders!r}")
    check_val_fraction("digits-s", split, val_fraction)
    size, noise, val_fraction, renders = int(size), float(noise), float(val_fraction), int(renders)
    # the built split comes from the data cache (data/cache.py) when it holds it: the test split
    # depends on neither seed nor skew; the key holds every input of the construction
    key = {"set": "digits-s", "version": VERSION, "split": split, "size": size, "noise": noise,
           "layout_seed": LAYOUT_SEED, "test_fraction": TEST_FRACTION, "gray_classes": GRAY_CLASSES,
           "luma": [LUMA_WEIGHTS, LUMA_BACKGROUND, LUMA_STROKE, CHROMA], "torch": torch.__version__.split("+")[0],
           "scikit-learn": package_version("scikit-learn")}
    if split != "test":
        key.update(seed=int(seed), skew=skew, val_fraction=val_fraction)
        if renders != 1:  # absent at 1, so the default's cached files keep their key
            key.update(renders=renders)
    expected = {"images": ("uint8", (None, 3, size, size)), "labels": ("int64", (None,)), "groups": ("int64", (None,)),
                "mean": ("float64", (3,)), "std": ("float64", (3,))}
    a = cached(f"digits-s-{split}", key, expected, lambda: build_split(split, seed, skew, size, noise, val_fraction, renders))
    return ImageDataset(torch.from_numpy(a["images"]), torch.from_numpy(a["labels"]), torch.from_numpy(a["groups"]),
                        10, 2, name="digits-s", mean=tuple(a["mean"].tolist()), std=tuple(a["std"].tolist()),
                        group_names=GROUP_NAMES)
