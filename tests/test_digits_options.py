"""digits-s option ``renders``: k renderings of each training digit (module docstring, step 7).

Pinned: k = 1 is the default set bit for bit; with k = 2 the first half is the default set, the
second a rendering from generator ``LAYOUT_SEED + 1`` recomputed here independently (colourise
of the training digits, then gray = luma where the default set is gray), with the same labels
and groups; the test set and the normalisation do not change; the data cache keeps the
renderings apart; bad values fail with a ConfigError naming the option; a validation split
holds out the same digits of every rendering.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fairdistill.data import build_dataset
from fairdistill.data.cifar import luma
from fairdistill.data.digits import LAYOUT_SEED, colourise, sklearn_digits, split_mask
from fairdistill.errors import ConfigError


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FAIRDISTILL_CACHE", str(tmp_path / "cache"))


def test_one_rendering_is_the_default():
    a = build_dataset("digits-s", split="train", seed=1)
    b = build_dataset("digits-s", split="train", seed=1, renders=1)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and torch.equal(a.groups, b.groups)


def test_second_rendering_recomputed_independently():
    one = build_dataset("digits-s", split="train", seed=2)
    two = build_dataset("digits-s", split="train", seed=2, renders=2)
    n = len(one)
    assert len(two) == 2 * n
    assert torch.equal(two.images[:n], one.images)
    assert torch.equal(two.labels, one.labels.repeat(2)) and torch.equal(two.groups, one.groups.repeat(2))
    # rendering 1 by hand: the training digits (in the stored order), their own generator
    digits, labels = sklearn_digits()
    is_test = split_mask(labels, torch.Generator().manual_seed(LAYOUT_SEED))
    colour = colourise(digits[~is_test], 8, 0.1, torch.Generator().manual_seed(LAYOUT_SEED + 1))
    expect = colour.clone()
    gray = one.groups == 0
    expect[gray] = luma(colour[gray])
    assert torch.equal(two.images[n:], expect)
    # new noise and hues: the colour images differ, the gray ones still have equal channels
    col = one.groups == 1
    assert not torch.equal(two.images[n:][col], one.images[col])
    g2 = two.images[n:][gray]
    assert torch.equal(g2[:, 0], g2[:, 1]) and torch.equal(g2[:, 1], g2[:, 2])


def test_test_set_and_normalisation_unchanged():
    t1 = build_dataset("digits-s", split="test")
    t3 = build_dataset("digits-s", split="test", renders=3)
    assert torch.equal(t1.images, t3.images)
    a = build_dataset("digits-s", split="train", seed=0)
    b = build_dataset("digits-s", split="train", seed=0, renders=3)
    assert np.allclose(a.mean, b.mean, rtol=0, atol=0) and np.allclose(a.std, b.std, rtol=0, atol=0)
    assert len(b) == 3 * len(a)


def test_cache_keeps_renderings_apart(tmp_path):
    two = build_dataset("digits-s", split="train", seed=0, renders=2)
    one = build_dataset("digits-s", split="train", seed=0)  # read after the k = 2 file exists
    assert len(two) == 2 * len(one)
    files = sorted(p.name for p in (tmp_path / "cache").rglob("digits-s-train-*.npz"))
    assert len(files) == 2


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_renders_names_the_option(bad):
    with pytest.raises(ConfigError, match="renders"):
        build_dataset("digits-s", split="train", renders=bad)


def test_validation_split_holds_out_the_same_digits():
    tr1 = build_dataset("digits-s", split="train", seed=0, val_fraction=0.2)
    va1 = build_dataset("digits-s", split="val", seed=0, val_fraction=0.2)
    tr2 = build_dataset("digits-s", split="train", seed=0, val_fraction=0.2, renders=2)
    va2 = build_dataset("digits-s", split="val", seed=0, val_fraction=0.2, renders=2)
    assert len(tr2) == 2 * len(tr1) and len(va2) == 2 * len(va1)
    assert torch.equal(tr2.images[: len(tr1)], tr1.images) and torch.equal(va2.images[: len(va1)], va1.images)
    assert torch.equal(tr2.labels[len(tr1):], tr1.labels) and torch.equal(va2.groups[len(va1):], va1.groups)
