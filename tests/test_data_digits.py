"""digits-s: split, CIFAR-10S skew counts, gray = luma of colour, colour construction, options."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from fairdistill.data import build_dataset
from fairdistill.data.digits import LAYOUT_SEED, chroma_basis, split_mask
from fairdistill.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def raw():
    d = load_digits()
    return d.images, d.target


@pytest.fixture(scope="module")
def test_set():
    return build_dataset("digits-s", split="test")


def luma_numpy(rgb: np.ndarray) -> np.ndarray:
    return 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]


def train_counts(target: np.ndarray) -> np.ndarray:
    """Training digits per class: all minus the rounded third that is tested."""
    per_class = np.bincount(target, minlength=10)
    return per_class - np.round(per_class / 3).astype(int)


def test_sizes_and_metadata(raw, test_set):
    _, target = raw
    tr = build_dataset("digits-s", split="train", seed=0)
    n_train = int(train_counts(target).sum())
    assert len(tr) == n_train and len(test_set) == 2 * (len(target) - n_train)
    assert tr.images.dtype == torch.uint8 and tr.image_shape == (3, 8, 8)
    assert tr.num_classes == 10 and tr.num_groups == 2 and tr.group_names == ["gray", "color"]
    assert build_dataset("digits-s", split="test", size=16).image_shape == (3, 16, 16)


@pytest.mark.parametrize("skew", [0.95, 0.8, 0.5])
def test_train_skew_counts(raw, skew):
    n = train_counts(raw[1])
    counts = build_dataset("digits-s", split="train", seed=2, skew=skew).cell_counts()
    for c in range(10):
        k = int(np.floor(n[c] * skew + 1e-9))
        gray = k if c < 5 else n[c] - k
        assert counts[:, c].tolist() == [gray, n[c] - gray]


def test_test_set_protocol(raw, test_set):
    n = len(test_set) // 2
    assert test_set.groups.tolist() == [0] * n + [1] * n
    assert torch.equal(test_set.labels[:n], test_set.labels[n:])
    stratified = np.round(np.bincount(raw[1], minlength=10) / 3).astype(int)
    assert test_set.cell_counts().tolist() == [stratified.tolist()] * 2
    gray, colour = test_set.images[:n].numpy().astype(float), test_set.images[n:].numpy().astype(float)
    assert np.all(gray[:, 0] == gray[:, 1]) and np.all(gray[:, 0] == gray[:, 2])
    assert np.all(np.abs(gray[:, 0] - luma_numpy(colour)) <= 0.5 + 1e-9)
    assert (colour[:, 0] != colour[:, 1]).mean() > 0.5  # colour images really are coloured
    again = build_dataset("digits-s", split="test", seed=7)
    assert torch.equal(again.images, test_set.images)  # independent of seed


def test_gray_assignment_depends_on_seed_only(raw):
    a = build_dataset("digits-s", split="train", seed=0)
    b = build_dataset("digits-s", split="train", seed=1)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.cell_counts(), b.cell_counts())
    assert not torch.equal(a.groups, b.groups)
    same = a.groups == b.groups
    assert torch.equal(a.images[same], b.images[same])  # the same digit, the same version
    assert torch.equal(a.groups, build_dataset("digits-s", split="train", seed=0).groups)
    g0 = a.images[a.groups == 0]
    assert torch.equal(g0[:, 0], g0[:, 1]) and torch.equal(g0[:, 0], g0[:, 2])


def test_colour_version_has_the_digit_as_luma_and_zero_luma_chroma(raw):
    images, target = raw
    basis = chroma_basis().numpy()
    assert np.allclose(basis @ basis.T, np.eye(2)) and np.allclose(basis @ np.array([0.299, 0.587, 0.114]), 0)
    te = build_dataset("digits-s", split="test", noise=0.0)
    n = len(te) // 2
    mask = split_mask(torch.from_numpy(target).long(), torch.Generator().manual_seed(LAYOUT_SEED)).numpy()
    assert te.labels[:n].tolist() == target[mask].tolist()
    y = luma_numpy(te.images[n:].numpy().astype(float)) / 255
    expect = 0.3 + 0.4 * images[mask] / 16
    assert np.abs(y - expect).max() <= 1.0 / 255 + 1e-9  # channel rounding moves luma by <= 0.5/255 each way
    # corner pixels are empty (d = 0): background = 0.3 gray + chroma -0.3 u, |u| = 1
    chroma = te.images[n:, :, 0, 0].numpy().astype(float) / 255 - 0.3
    assert np.allclose(np.linalg.norm(chroma, axis=1), 0.3, atol=2 / 255)
    assert np.allclose(chroma @ np.array([0.299, 0.587, 0.114]), 0, atol=1 / 255)


def test_noise_only_changes_the_intensity(raw):
    clean = build_dataset("digits-s", split="test", noise=0.0)
    noisy = build_dataset("digits-s", split="test", noise=0.3)
    assert torch.equal(clean.labels, noisy.labels)
    assert (clean.images.float() - noisy.images.float()).abs().mean() > 5


def test_mean_std_are_stats_of_both_versions_of_the_training_digits():
    ds = build_dataset("digits-s", split="train", seed=0)
    # skew 1: classes 0-4 gray, 5-9 colour; skew 0: the other way round -> both versions of all
    both = torch.cat([build_dataset("digits-s", split="train", skew=s).images for s in (0.0, 1.0)]).double() / 255
    assert ds.mean == pytest.approx(both.mean((0, 2, 3)).tolist(), abs=1e-9)
    assert ds.std == pytest.approx(both.std((0, 2, 3)).tolist(), abs=1e-9)


def test_val_split(raw):
    full = build_dataset("digits-s", split="train", seed=4)
    tr = build_dataset("digits-s", split="train", seed=4, val_fraction=0.25)
    va = build_dataset("digits-s", split="val", seed=4, val_fraction=0.25)
    assert len(tr) + len(va) == len(full)
    assert torch.equal(va.cell_counts(), torch.floor(full.cell_counts().double() * 0.25 + 0.5).long())
    assert torch.equal(tr.cell_counts() + va.cell_counts(), full.cell_counts())
    with pytest.raises(DataError, match="set the data set option val_fraction"):
        build_dataset("digits-s", split="val")


def test_bad_options():
    with pytest.raises(ConfigError, match="skew"):
        build_dataset("digits-s", skew=-0.1)
    with pytest.raises(ConfigError, match="size must be an integer >= 8"):
        build_dataset("digits-s", size=4)
    with pytest.raises(ConfigError, match="noise"):
        build_dataset("digits-s", noise=-1.0)
    with pytest.raises(ConfigError, match="Did you mean 'skew'"):
        build_dataset("digits-s", skwe=0.9)
