"""CIFAR-10/100/10S builders on tiny Python-2-style pickle folders (tests/fixtures_cifar.py)."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from fairdistill.data import build_dataset
from fairdistill.data.cifar import luma
from fairdistill.errors import ConfigError, DataError

from fixtures_cifar import make_cifar10, make_cifar100


@pytest.fixture(scope="module")
def c10(tmp_path_factory):
    root = tmp_path_factory.mktemp("c10")
    arrays = make_cifar10(str(root), per_batch=20, test=20)  # 100 train images, 10 per class
    return str(root), arrays


@pytest.fixture(scope="module")
def c100(tmp_path_factory):
    root = tmp_path_factory.mktemp("c100")
    return str(root), make_cifar100(str(root))


def to_nchw(flat: np.ndarray) -> np.ndarray:
    """CIFAR rows are 1024 red, 1024 green, 1024 blue values, each row-major 32x32."""
    return flat.reshape(-1, 3, 32, 32)


def luma_numpy(rgb: np.ndarray) -> np.ndarray:
    y = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]
    return y


def test_fixture_is_python2_style(c10):
    path = os.path.join(c10[0], "cifar-10-batches-py", "data_batch_1")
    with open(path, "rb") as f:
        assert b"data" in pickle.load(f, encoding="bytes")
    with open(path, "rb") as f:
        assert "data" in pickle.load(f, encoding="latin1")  # py2 str keys, as the real files


def test_cifar10_train_and_test(c10):
    root, a = c10
    tr = build_dataset("cifar10", root, "train")
    te = build_dataset("cifar10", root, "test")
    assert len(tr) == 100 and len(te) == 20
    assert torch.equal(tr.images, torch.from_numpy(to_nchw(a["train_x"])))
    assert tr.images[3, 1, 2, 5] == a["train_x"][3, 1024 + 2 * 32 + 5]
    assert tr.labels.tolist() == a["train_y"].tolist() and te.labels.tolist() == a["test_y"].tolist()
    assert torch.equal(te.images, torch.from_numpy(to_nchw(a["test_x"])))
    assert tr.num_classes == 10 and tr.num_groups == 1 and int(tr.groups.abs().sum()) == 0
    assert tr.mean == pytest.approx((125.3 / 255, 123.0 / 255, 113.9 / 255))
    assert tr.std == pytest.approx((63.0 / 255, 62.1 / 255, 66.7 / 255))
    assert tr.class_names[0] == "airplane" and tr.class_names[9] == "truck"


def test_cifar100_fine_and_coarse(c100):
    root, a = c100
    fine = build_dataset("cifar100", root, "train")
    coarse = build_dataset("cifar100", root, "test", label="coarse")
    assert fine.num_classes == 100 and coarse.num_classes == 20
    assert fine.labels.tolist() == a["train_fine"].tolist()
    assert coarse.labels.tolist() == a["test_coarse"].tolist()
    assert torch.equal(coarse.images, torch.from_numpy(to_nchw(a["test_x"])))
    assert fine.class_names[7] == "fine7" and coarse.class_names[3] == "coarse3"
    assert fine.mean == pytest.approx((125.3 / 255, 123.0 / 255, 113.9 / 255))
    with pytest.raises(ConfigError, match="fine' or 'coarse"):
        build_dataset("cifar100", root, "train", label="super")


def test_luma_is_itu601_rounded_half_up():
    rgb = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [0, 0, 250], [10, 10, 10], [200, 100, 50]], dtype=torch.uint8)
    y = luma(rgb.view(-1, 3, 1, 1))
    # 76.245, 149.685, 29.07, 28.5 (half: up), 10, 124.2
    assert y[:, 0].flatten().tolist() == [76, 150, 29, 29, 10, 124]
    assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 0], y[:, 2])
    rnd = torch.randint(0, 256, (50, 3, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    err = luma(rnd)[:, 0].double().numpy() - luma_numpy(rnd.double().numpy())
    assert np.all(np.abs(err) <= 0.5 + 1e-9)


def naive_cifar10s_groups(labels: list[int], seed: int, skew: float, gray_classes) -> list[int]:
    """The protocol as a plain loop: walk the seed-shuffled order, the first k of each class gray."""
    n_per_class = {c: labels.count(c) for c in set(labels)}
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).tolist()
    seen = {c: 0 for c in n_per_class}
    groups = [1] * len(labels)
    for i in order:
        c = labels[i]
        k = int(n_per_class[c] * skew + 1e-9)
        n_gray = k if c in gray_classes else n_per_class[c] - k
        if seen[c] < n_gray:
            groups[i] = 0
        seen[c] += 1
    return groups


@pytest.mark.parametrize("protocol,skew,gray_classes", [("mfd", 0.8, (0, 1, 2, 3, 4)), ("wang2020", 0.95, (0, 2, 4, 6, 8))])
def test_cifar10s_train_protocol(c10, protocol, skew, gray_classes):
    root, a = c10
    ds = build_dataset("cifar10s", root, "train", seed=3, protocol=protocol)
    counts = ds.cell_counts()
    k = int(10 * skew)  # 10 images per class in the fixture
    for c in range(10):
        gray = k if c in gray_classes else 10 - k
        assert counts[:, c].tolist() == [gray, 10 - gray]
    assert ds.groups.tolist() == naive_cifar10s_groups(a["train_y"].tolist(), 3, skew, gray_classes)
    colour = to_nchw(a["train_x"]).astype(np.float64)
    g = ds.groups.numpy()
    assert np.array_equal(ds.images.numpy()[g == 1], colour[g == 1].astype(np.uint8))
    gray_imgs = ds.images.numpy()[g == 0].astype(np.float64)
    assert np.all(gray_imgs[:, 0] == gray_imgs[:, 1]) and np.all(gray_imgs[:, 0] == gray_imgs[:, 2])
    assert np.all(np.abs(gray_imgs[:, 0] - luma_numpy(colour[g == 0])) <= 0.5 + 1e-9)
    assert ds.mean is None and ds.std is None and ds.group_names == ["gray", "color"]


def test_cifar10s_seed_and_skew(c10):
    root, _ = c10
    a = build_dataset("cifar10s", root, "train", seed=0)
    b = build_dataset("cifar10s", root, "train", seed=0)
    c = build_dataset("cifar10s", root, "train", seed=1)
    assert torch.equal(a.groups, b.groups) and torch.equal(a.images, b.images)
    assert not torch.equal(a.groups, c.groups) and torch.equal(a.cell_counts(), c.cell_counts())
    half = build_dataset("cifar10s", root, "train", seed=0, skew=0.5)
    assert half.cell_counts().tolist() == [[5] * 10, [5] * 10]
    wang_08 = build_dataset("cifar10s", root, "train", protocol="wang2020", skew=0.8)
    assert wang_08.cell_counts()[0].tolist() == [8, 2] * 5
    with pytest.raises(ConfigError, match="skew"):
        build_dataset("cifar10s", root, "train", skew=1.2)
    with pytest.raises(ConfigError, match="protocol"):
        build_dataset("cifar10s", root, "train", protocol="wang")


def test_cifar10s_test_set_is_both_versions(c10):
    root, a = c10
    te = build_dataset("cifar10s", root, "test", seed=5)
    n = len(a["test_y"])
    assert len(te) == 2 * n
    assert te.groups.tolist() == [0] * n + [1] * n
    assert te.labels.tolist() == a["test_y"].tolist() * 2
    colour = to_nchw(a["test_x"])
    assert np.array_equal(te.images[n:].numpy(), colour)
    assert np.all(np.abs(te.images[:n, 1].numpy() - luma_numpy(colour.astype(np.float64))) <= 0.5 + 1e-9)
    assert torch.equal(te.images, build_dataset("cifar10s", root, "test", seed=6).images)


def test_val_split_is_stratified_and_explicit(c10):
    root, _ = c10
    full = build_dataset("cifar10", root, "train")
    tr = build_dataset("cifar10", root, "train", val_fraction=0.2)
    va = build_dataset("cifar10", root, "val", val_fraction=0.2)
    assert len(tr) + len(va) == len(full) == 100
    assert va.cell_counts().tolist() == [[2] * 10]  # round(0.2 * 10) of each class
    # the two parts partition the images: match rows back to the full set
    rows = {bytes(img.numpy().tobytes()) for img in full.images}
    parts = [bytes(img.numpy().tobytes()) for img in torch.cat([tr.images, va.images])]
    assert len(set(parts)) == 100 and set(parts) == rows
    assert torch.equal(va.images, build_dataset("cifar10", root, "val", seed=9, val_fraction=0.2).images)
    s_val = build_dataset("cifar10s", root, "val", seed=1, val_fraction=0.1)
    s_full = build_dataset("cifar10s", root, "train", seed=1)
    expect = torch.floor(s_full.cell_counts().double() * 0.1 + 0.5).long()
    assert torch.equal(s_val.cell_counts(), expect)
    with pytest.raises(DataError, match="val_fraction"):
        build_dataset("cifar10", root, "val")
    with pytest.raises(ConfigError, match="val_fraction"):
        build_dataset("cifar10", root, "train", val_fraction=1.0)


def test_unknown_option_is_a_config_error(c10):
    with pytest.raises(ConfigError, match="skw"):
        build_dataset("cifar10s", c10[0], "train", skw=0.9)


def test_missing_folder_names_the_layout(tmp_path):
    with pytest.raises(DataError) as e:
        build_dataset("cifar10", str(tmp_path), "train")
    msg = str(e.value)
    assert "cifar-10-batches-py" in msg and "data_batch_1" in msg and "test_batch" in msg and str(tmp_path) in msg
    with pytest.raises(DataError, match="cifar-100-python.*train, test"):
        build_dataset("cifar100", str(tmp_path), "test")


def test_missing_or_corrupt_file_is_named(tmp_path):
    make_cifar10(str(tmp_path), per_batch=10, test=10)
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "data_batch_4").unlink()
    with pytest.raises(DataError, match="missing file .*data_batch_4"):
        build_dataset("cifar10s", str(tmp_path), "train")
    blob = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="test_batch.*truncated or corrupt"):
        build_dataset("cifar10", str(tmp_path), "test")
    (folder / "test_batch").write_bytes(b"not a pickle at all")
    with pytest.raises(DataError, match="test_batch"):
        build_dataset("cifar10", str(tmp_path), "test")
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"images": [1, 2]}, f, protocol=2)
    with pytest.raises(DataError, match="test_batch lacks key"):
        build_dataset("cifar10", str(tmp_path), "test")
