"""CIFAR-10/100/10S builders on Python-2-style pickle folders (tests/fixtures_cifar.py): the
official MFD CIFAR-10S assignment, PIL's gray pixels, and pickles that cannot run code."""
from __future__ import annotations

import copyreg
import os
import pickle
import pickletools

import numpy as np
import pytest
import torch
from PIL import Image

from fairdistill.data import build_dataset
from fairdistill.data.cifar import cifar10s_groups, luma, mfd_order
from fairdistill.errors import ConfigError, DataError

from fixtures_cifar import make_cifar10, make_cifar100, py2_dumps


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


def pil_gray(rgb_nchw: np.ndarray) -> np.ndarray:
    """PIL's convert("L") of uint8 (N, 3, H, W) images, one PIL call on a mosaic of them all."""
    n, _, h, w = rgb_nchw.shape
    mosaic = np.ascontiguousarray(rgb_nchw.transpose(0, 2, 3, 1).reshape(n * h, w, 3))
    return np.asarray(Image.fromarray(mosaic, "RGB").convert("L")).reshape(n, h, w)


def official_cifar10s(labels: np.ndarray, seed: int, skew: float, gray_classes=(0, 1, 2, 3, 4)) -> np.ndarray:
    """MFD's CIFAR-10S assignment re-done as its code does it (data_handler/cifar10.py): global
    ``np.random.seed`` + ``np.random.shuffle`` of the indices, then one walk over the shuffled
    items counting gray ones per class (classes 0-4 take the skewed count, 5-9 the rest; other
    ``gray_classes`` for the wang2020 split). Returns the group of each item in file order; the
    global numpy state is restored after."""
    saved = np.random.get_state()
    try:
        np.random.seed(seed)
        idx = np.arange(len(labels), dtype=np.int64)
        np.random.shuffle(idx)
    finally:
        np.random.set_state(saved)
    n = len(labels)
    total, skewed = int(n // 10), int((n * skew) // 10)
    gray_count = [0] * 10
    groups = np.ones(n, dtype=np.int64)
    for i in idx.tolist():  # the shuffled stream
        target = int(labels[i])
        limit = skewed if target in gray_classes else total - skewed
        if gray_count[target] < limit:
            groups[i] = 0
            gray_count[target] += 1
    return groups


def test_fixture_is_python2_style(c10):
    path = os.path.join(c10[0], "cifar-10-batches-py", "data_batch_1")
    with open(path, "rb") as f:
        assert b"data" in pickle.load(f, encoding="bytes")
    with open(path, "rb") as f:
        assert "data" in pickle.load(f, encoding="latin1")  # py2 str keys, as the real files
    with open(path, "rb") as f:
        ops = list(pickletools.genops(f.read()))
    # the globals of the real files: numpy's py2 array rebuilder, ndarray and dtype, nothing else
    named = {arg for op, arg, _ in ops if op.name == "GLOBAL"}
    assert named == {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}
    assert not {op.name for op, _, _ in ops} & {"STACK_GLOBAL", "INST", "OBJ", "EXT1", "EXT2", "EXT4"}


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


def all_rgb_triples() -> np.ndarray:
    """Every 8-bit RGB triple once, as one image (1, 3, 4096, 4096)."""
    v = np.arange(256, dtype=np.uint8)
    planes = np.empty((3, 256, 256, 256), dtype=np.uint8)
    planes[0], planes[1], planes[2] = v[:, None, None], v[None, :, None], v[None, None, :]
    return planes.reshape(1, 3, 4096, 4096)


def test_luma_is_pil_convert_L_on_every_rgb_triple():
    rgb = all_rgb_triples()
    expect = np.asarray(Image.fromarray(np.ascontiguousarray(rgb[0].transpose(1, 2, 0)), "RGB").convert("L"))
    y = luma(torch.from_numpy(rgb))
    assert y.shape == (1, 3, 4096, 4096) and y.dtype == torch.uint8
    assert np.array_equal(y[0, 0].numpy(), expect)
    assert torch.equal(y[0, 0], y[0, 1]) and torch.equal(y[0, 0], y[0, 2])
    # against the ITU-R 601 value s / 1000, s = 299 R + 587 G + 114 B: PIL is at most 0.501 off, and
    # round-half-up floor((s + 500) / 1000) equals PIL's value exactly when -500 <= d < 500 below
    r, g, b = (rgb[0, i].astype(np.int32) for i in range(3))
    d = 299 * r + 587 * g + 114 * b - 1000 * expect.astype(np.int32)
    assert int(np.abs(d).max()) == 501
    assert int(((d < -500) | (d >= 500)).sum()) == 9040


def test_luma_hand_values():
    # (19595 R + 38470 G + 7471 B + 32768) >> 16 by hand; 601 luma: 76.245, 149.685, 29.07, 28.5, 10, 124.2
    rgb = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [0, 0, 250], [10, 10, 10], [200, 100, 50]], dtype=torch.uint8)
    y = luma(rgb.view(-1, 3, 1, 1))
    # 0 0 250: 7471 * 250 + 32768 = 1900518 < 29 * 65536 = 1900544, so 28 (rounding 28.5 up gives 29)
    assert y[:, 0].flatten().tolist() == [76, 150, 29, 28, 10, 124]
    imgs = torch.randint(0, 256, (7, 3, 5, 6), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    assert np.array_equal(luma(imgs)[:, 0].numpy(), pil_gray(imgs.numpy()))


def test_mfd_order_is_the_global_numpy_shuffle_and_leaves_global_state():
    for seed in (0, 1, 7, 2**32 - 1):
        saved = np.random.get_state()
        np.random.seed(seed)
        idx = np.arange(1000, dtype=np.int64)
        np.random.shuffle(idx)
        np.random.set_state(saved)
        before = np.random.get_state()
        ours = mfd_order(1000, seed)
        after = np.random.get_state()
        assert ours.tolist() == idx.tolist()
        assert before[0] == after[0] and np.array_equal(before[1], after[1]) and before[2:] == after[2:]
    for bad in (-1, 2**32, 1.5):
        with pytest.raises(ConfigError, match="seed must be an integer from 0 to 2\\*\\*32 - 1"):
            mfd_order(10, bad)


@pytest.mark.parametrize("protocol,skew,gray_classes", [("mfd", 0.8, (0, 1, 2, 3, 4)), ("wang2020", 0.95, (0, 2, 4, 6, 8))])
def test_cifar10s_train_protocol(c10, protocol, skew, gray_classes):
    root, a = c10
    ds = build_dataset("cifar10s", root, "train", seed=3, protocol=protocol)
    counts = ds.cell_counts()
    k = int(10 * skew)  # 10 images per class in the fixture
    for c in range(10):
        gray = k if c in gray_classes else 10 - k
        assert counts[:, c].tolist() == [gray, 10 - gray]
    assert ds.groups.tolist() == official_cifar10s(a["train_y"], 3, skew, gray_classes).tolist()
    colour = to_nchw(a["train_x"])
    g = ds.groups.numpy()
    assert np.array_equal(ds.images.numpy()[g == 1], colour[g == 1])
    gray_imgs = ds.images.numpy()[g == 0]
    assert np.all(gray_imgs[:, 0] == gray_imgs[:, 1]) and np.all(gray_imgs[:, 0] == gray_imgs[:, 2])
    assert np.array_equal(gray_imgs[:, 0], pil_gray(colour[g == 0]))
    assert ds.mean is None and ds.std is None and ds.group_names == ["gray", "color"]


@pytest.fixture(scope="module")
def c10_full(tmp_path_factory):
    """A full-size CIFAR-10 folder: 5 x 10000 training images (5000 per class), real format."""
    root = tmp_path_factory.mktemp("c10full")
    arrays = make_cifar10(str(root), per_batch=10000, test=10)
    return str(root), arrays


def test_cifar10s_full_size_gray_set_is_the_official_one(c10_full):
    root, a = c10_full
    labels = a["train_y"]
    assert len(labels) == 50000 and np.bincount(labels).tolist() == [5000] * 10
    colour = to_nchw(a["train_x"])
    groups = {}
    for seed in (0, 1):
        ds = build_dataset("cifar10s", root, "train", seed=seed)
        expect = official_cifar10s(labels, seed, 0.8)
        assert ds.groups.numpy().tolist() == expect.tolist()
        assert ds.cell_counts().tolist() == [[4000] * 5 + [1000] * 5, [1000] * 5 + [4000] * 5]
        g = ds.groups.numpy()
        assert np.array_equal(ds.labels.numpy(), labels)  # file order is kept
        rows = np.arange(seed, 50000, 25)  # the pixels of 2000 items (all pinned by the tests above)
        shown, source = ds.images.numpy()[rows], colour[rows]
        is_gray = g[rows] == 0
        assert 0 < is_gray.sum() < len(rows)
        assert np.array_equal(shown[~is_gray], source[~is_gray])
        assert np.array_equal(shown[is_gray], np.repeat(pil_gray(source[is_gray])[:, None], 3, axis=1))
        groups[seed] = g
    assert (groups[0] != groups[1]).any()
    # the 95% skew (4750 / 250) and the wang2020 class split, on the same 50000 labels
    y = torch.from_numpy(labels)
    for seed in (0, 1):
        assert cifar10s_groups(y, 0.95, range(5), seed).tolist() == official_cifar10s(labels, seed, 0.95).tolist()
        wang = cifar10s_groups(y, 0.95, (0, 2, 4, 6, 8), seed)
        assert wang.tolist() == official_cifar10s(labels, seed, 0.95, (0, 2, 4, 6, 8)).tolist()
        assert torch.bincount(y[wang == 0], minlength=10).tolist() == [4750, 250] * 5


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
    with pytest.raises(ConfigError, match="cifar10s: seed must be an integer"):
        build_dataset("cifar10s", root, "train", seed=-3)


def test_cifar10s_test_set_is_both_versions(c10):
    root, a = c10
    te = build_dataset("cifar10s", root, "test", seed=5)
    n = len(a["test_y"])
    assert len(te) == 2 * n
    assert te.groups.tolist() == [0] * n + [1] * n
    assert te.labels.tolist() == a["test_y"].tolist() * 2
    colour = to_nchw(a["test_x"])
    assert np.array_equal(te.images[n:].numpy(), colour)
    assert np.array_equal(te.images[:n, 1].numpy(), pil_gray(colour))
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
        pickle.dump({b"images": [1, 2]}, f, protocol=4)  # protocol 4: bytes without _codecs.encode
    with pytest.raises(DataError, match="test_batch lacks key"):
        build_dataset("cifar10", str(tmp_path), "test")
    bad_data = {b"data": np.zeros((2, 3072), dtype=np.float32), b"labels": [0, 1]}
    (folder / "test_batch").write_bytes(py2_dumps(bad_data))
    with pytest.raises(DataError, match=r"test_batch holds float32 data of shape \(2, 3072\).*expected uint8"):
        build_dataset("cifar10", str(tmp_path), "test")
    bad_labels = {b"data": np.zeros((2, 3072), dtype=np.uint8), b"labels": [b"cat", b"dog"]}
    (folder / "test_batch").write_bytes(py2_dumps(bad_labels))
    with pytest.raises(DataError, match="test_batch: b'labels' holds .*expected a list of integer labels"):
        build_dataset("cifar10", str(tmp_path), "test")
    (folder / "test_batch").write_bytes(py2_dumps({**bad_labels, b"labels": [0, [1, 2]]}))
    with pytest.raises(DataError, match="test_batch: b'labels' holds a ragged list"):
        build_dataset("cifar10", str(tmp_path), "test")


def test_a_numpy2_resave_still_loads(tmp_path):
    """A batch re-saved by Python 3 and numpy 2 (protocol 4) names numpy._core's rebuilder: admitted."""
    a = make_cifar10(str(tmp_path), per_batch=10, test=10)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    blob = pickle.dumps(batch, protocol=4)
    assert b"numpy._core.multiarray" in blob
    path.write_bytes(blob)
    te = build_dataset("cifar10", str(tmp_path), "test")
    assert torch.equal(te.images, torch.from_numpy(to_nchw(a["test_x"])))


class Payload:
    """An object whose pickle calls ``builtins.eval`` on ``code`` when it is loaded."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return eval, (self.code,)


def crafted_pickles(marker: str) -> dict[str, tuple[bytes, str]]:
    """Pickles that create ``marker`` when loaded with plain pickle -> (bytes, refused global)."""
    touch = f"touch {marker}".encode()
    code = f"open({marker!r}, 'w').close()"
    inside_cifar = {b"batch_label": b"testing batch 1 of 1", b"data": np.zeros((2, 3072), dtype=np.uint8),
                    b"labels": [0, 1], b"filenames": [b"a.png", b"b.png"], b"x": Payload(code)}
    ext = b"\x80\x02\x82\xf0" + pickle.SHORT_BINUNICODE + bytes([len(code)]) + code.encode() + b"\x85R."
    return {
        "eval inside a real-looking batch (py2 GLOBAL)": (py2_dumps(inside_cifar), "__builtin__.eval"),
        "os.system (GLOBAL, protocol 0)": (b"cos\nsystem\n(S'" + touch + b"'\ntR.", "os.system"),
        "posix.system (INST)": (b"(S'" + touch + b"'\niposix\nsystem\n.", "posix.system"),
        "eval (STACK_GLOBAL, protocol 4)": (pickle.dumps(Payload(code), protocol=4), "builtins.eval"),
        "eval (EXT1 via copyreg)": (ext, "builtins.eval"),
    }


def test_crafted_pickles_are_live_with_plain_pickle(tmp_path):
    """Control: each crafted file really runs its payload when loaded with plain pickle."""
    copyreg.add_extension("builtins", "eval", 0xF0)
    try:
        for i, case in enumerate(crafted_pickles("M")):
            marker = tmp_path / f"m{i}"
            blob, _ = crafted_pickles(str(marker))[case]
            try:
                pickle.loads(blob)
            except Exception:
                pass  # eval/system return values may not build a dict; the payload has run by then
            assert marker.exists(), case
    finally:
        copyreg.remove_extension("builtins", "eval", 0xF0)


@pytest.mark.parametrize("case", list(crafted_pickles("M")))
def test_crafted_pickle_is_refused_before_it_runs(tmp_path, case):
    make_cifar10(str(tmp_path), per_batch=10, test=10)
    marker = tmp_path / "PWNED"
    blob, refused = crafted_pickles(str(marker))[case]
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(blob)
    copyreg.add_extension("builtins", "eval", 0xF0)
    try:
        with pytest.raises(DataError) as e:
            build_dataset("cifar10", str(tmp_path), "test")
    finally:
        copyreg.remove_extension("builtins", "eval", 0xF0)
    assert not marker.exists()
    msg = str(e.value)
    assert f"refused to load {path}" in msg and f"global {refused}," in msg and "fresh copy" in msg
