"""UTKFace, CelebA and ImageFolder loaders on tiny files in the real on-disk formats."""
from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch
from PIL import Image

from fairdistill.data import images as image_helpers
from fairdistill.data.celeba import celeba
from fairdistill.data.imagefolder import imagefolder
from fairdistill.data.images import decode_images, resize_rgb
from fairdistill.data.utkface import natural_key, utkface
from fairdistill.errors import ConfigError, DataError


def solid_jpeg(path, red, size=(10, 12)):
    """A JPEG of one colour; the red channel carries a value the test can read back."""
    Image.new("RGB", size, (red, 128, 64)).save(path, quality=95)


def red_means(ds):
    return ds.images[:, 0].double().mean(dim=(1, 2))


# ----------------------------------------------------------------------------- UTKFace

AGES = {0: (3, 19, 7), 1: (20, 39, 25), 2: (40, 80, 61)}  # three ages per age bin, bin edges included


def utk_files(tmp_path):
    """3 images per (race, age bin) for races 0-3, plus race-4 and malformed names."""
    folder = tmp_path / "UTKFace"
    folder.mkdir()
    cells = {}
    stamp = 20170101000000000
    for race in range(4):
        for b, ages in AGES.items():
            for k, age in enumerate(ages):
                stamp += 7
                name = f"{age}_{k % 2}_{race}_{stamp}.jpg.chip.jpg"
                solid_jpeg(folder / name, red=age * 3)
                cells[name] = (b, race)
    solid_jpeg(folder / "30_1_4_20170102000000000.jpg.chip.jpg", red=90)  # race 4: dropped
    solid_jpeg(folder / "39_1_20170116174525125.jpg.chip.jpg", red=90)  # 3 fields: skipped
    solid_jpeg(folder / "61_1_3_2_20170109150557335.jpg.chip.jpg", red=90)  # 5 fields: skipped
    (folder / "notes.txt").write_text("not an image")
    return cells


def official_split(names, test_per_cell):
    """The official procedure, written out: sort numerically by the name's integer fields (what
    natsort does for these names), random.seed(1) + shuffle, walk backwards."""
    ordered = sorted(names, key=lambda n: tuple(int(f) for f in n.split(".")[0].split("_")))
    random.seed(1)
    random.shuffle(ordered)
    count, test = {}, []
    train = list(ordered)
    for name in reversed(ordered):
        age, _, race, _ = name.split("_")
        cell = (int(race), 0 if int(age) < 20 else 1 if int(age) < 40 else 2)
        count[cell] = count.get(cell, 0) + 1
        if count[cell] <= test_per_cell:
            train.remove(name)
            test.append(name)
    return train, test


def test_natural_key_orders_digit_runs_as_numbers():
    names = ["10_0_0_5.jpg.chip.jpg", "9_0_0_5.jpg.chip.jpg", "9_0_0_40.jpg.chip.jpg", "100_1_2_1.jpg.chip.jpg"]
    assert sorted(names, key=natural_key) == [
        "9_0_0_5.jpg.chip.jpg", "9_0_0_40.jpg.chip.jpg", "10_0_0_5.jpg.chip.jpg", "100_1_2_1.jpg.chip.jpg"
    ]


def test_utkface_split_labels_groups_and_images(tmp_path, caplog):
    cells = utk_files(tmp_path)
    want_train, want_test = official_split(list(cells), test_per_cell=1)
    with caplog.at_level(logging.WARNING):
        test = utkface(root=tmp_path, split="test", test_per_cell=1, image_size=8)
    assert "skipped 2 file name(s)" in caplog.text
    train = utkface(root=tmp_path, split="train", test_per_cell=1, image_size=8)
    assert len(test) == 12 and len(train) == 24
    assert test.cell_counts().tolist() == [[1, 1, 1]] * 4
    assert train.cell_counts().tolist() == [[2, 2, 2]] * 4
    for ds, want in ((test, want_test), (train, want_train)):
        assert ds.labels.tolist() == [cells[n][0] for n in want]
        assert ds.groups.tolist() == [cells[n][1] for n in want]
        ages = torch.tensor([int(n.split("_")[0]) * 3 for n in want], dtype=torch.float64)
        assert (red_means(ds) - ages).abs().max() < 4  # image i is the file of label i
        assert ds.images.shape[1:] == (3, 8, 8) and ds.images.dtype == torch.uint8
    assert (test.num_classes, test.num_groups) == (3, 4)
    assert test.mean == (0.485, 0.456, 0.406) and test.group_names == ["White", "Black", "Asian", "Indian"]


def test_utkface_resize_and_val_fraction(tmp_path):
    utk_files(tmp_path)
    train = utkface(root=tmp_path, split="train", test_per_cell=1, image_size=8, resize=12, val_fraction=0.5)
    val = utkface(root=tmp_path, split="val", test_per_cell=1, image_size=8, resize=12, val_fraction=0.5)
    assert train.images.shape[2:] == (12, 12) and val.images.shape[2:] == (8, 8)
    assert train.cell_counts().tolist() == [[1, 1, 1]] * 4 and val.cell_counts().tolist() == [[1, 1, 1]] * 4
    with pytest.raises(DataError, match="val_fraction"):
        utkface(root=tmp_path, split="val", test_per_cell=1)


def test_utkface_errors(tmp_path):
    with pytest.raises(DataError, match="UTKFace.*AGE_GENDER_RACE_DATETIME"):
        utkface(root=tmp_path, split="train")
    utk_files(tmp_path)
    with pytest.raises(DataError, match="test_per_cell=3"):
        utkface(root=tmp_path, split="train", test_per_cell=3)
    with pytest.raises(ConfigError, match="utkface.image_size"):
        utkface(root=tmp_path, split="train", image_size=0)
    (tmp_path / "UTKFace" / "2x_0_1_20170101.jpg.chip.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="2x_0_1_20170101"):
        utkface(root=tmp_path, split="train", test_per_cell=1)
    (tmp_path / "UTKFace" / "2x_0_1_20170101.jpg.chip.jpg").unlink()
    broken = tmp_path / "UTKFace" / "33_0_1_20990101000000000.jpg.chip.jpg"
    broken.write_bytes(b"this is not a jpeg")
    errors = []
    for split in ("train", "test"):  # the broken file lands in one of them
        try:
            utkface(root=tmp_path, split=split, test_per_cell=1, image_size=8)
        except DataError as err:
            errors.append(str(err))
    assert len(errors) == 1 and "could not be read" in errors[0] and "33_0_1_2099" in errors[0]


def test_utkface_cache_is_reused(tmp_path, monkeypatch):
    utk_files(tmp_path)
    first = utkface(root=tmp_path, split="test", test_per_cell=1, image_size=8, cache=True, cache_dir=tmp_path / "c")
    assert len(list((tmp_path / "c").glob("utkface-test-*.pt"))) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(image_helpers, "decode_images", no_decoding)
    again = utkface(root=tmp_path, split="test", test_per_cell=1, image_size=8, cache=True, cache_dir=tmp_path / "c")
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    with pytest.raises(AssertionError, match="decoded again"):  # other settings: other key
        utkface(root=tmp_path, split="test", test_per_cell=1, image_size=6, cache=True, cache_dir=tmp_path / "c")


@pytest.mark.parametrize("garbage", [b"not a torch file", b"", b"PK\x03\x04"])
def test_unreadable_cache_is_rebuilt(tmp_path, caplog, garbage):
    utk_files(tmp_path)
    first = utkface(root=tmp_path, split="test", test_per_cell=1, image_size=8, cache=True)
    (cached,) = (tmp_path / ".fairdistill_cache").glob("utkface-test-*.pt")
    cached.write_bytes(garbage)
    with caplog.at_level(logging.WARNING):
        again = utkface(root=tmp_path, split="test", test_per_cell=1, image_size=8, cache=True)
    assert "unreadable" in caplog.text and torch.equal(first.images, again.images)
    assert torch.equal(torch.load(cached, weights_only=True), first.images)  # rewritten


# ----------------------------------------------------------------------------- CelebA

HEADER = ["5_o_Clock_Shadow", "Attractive", "Male", "Smiling", "Young"]


def celeba_files(tmp_path, rows, partition, count=None, header=HEADER, skip_images=()):
    """rows: name -> values (-1/1); written in the real files' format (count line, header,
    values right-aligned in 2-character fields so positives follow two spaces)."""
    base = tmp_path / "celeba"
    (base / "img_align_celeba").mkdir(parents=True)
    lines = [str(len(rows) if count is None else count), " ".join(header) + " "]
    for i, (name, values) in enumerate(rows.items()):
        lines.append(name + " " + " ".join(f"{v:2d}" for v in values))
        if name not in skip_images:
            solid_jpeg(base / "img_align_celeba" / name, red=10 * i % 250, size=(9, 11))
    (base / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (base / "list_eval_partition.txt").write_text("".join(f"{n} {p}\n" for n, p in partition.items()))


def celeba_fixture(tmp_path, **kwargs):
    """20 images: 0-11 train, 12-13 val, 14-19 test; Attractive x Male cells vary in size."""
    rng = np.random.default_rng(0)
    rows, partition = {}, {}
    test_cells = [(1, 1), (1, -1), (-1, 1), (1, 1), (-1, -1), (-1, 1)]  # (Attractive, Male); (-1,-1) once
    for i in range(20):
        name = f"{i + 1:06d}.jpg"
        values = [int(v) for v in rng.choice([-1, 1], size=len(HEADER))]
        if i >= 14:
            values[1], values[2] = test_cells[i - 14]
        rows[name] = values
        partition[name] = 0 if i < 12 else 1 if i < 14 else 2
    celeba_files(tmp_path, rows, partition, **kwargs)
    return rows, partition


def test_celeba_splits_labels_and_balanced_test(tmp_path):
    rows, partition = celeba_fixture(tmp_path)
    names = list(rows)
    train = celeba(root=tmp_path, split="train", image_size=8)
    assert len(train) == 12
    assert train.labels.tolist() == [(rows[n][1] + 1) // 2 for n in names[:12]]
    assert train.groups.tolist() == [(rows[n][2] + 1) // 2 for n in names[:12]]
    want_red = torch.tensor([10.0 * i % 250 for i in range(12)], dtype=torch.float64)
    assert (red_means(train) - want_red).abs().max() < 4
    val = celeba(root=tmp_path, split="val", image_size=8)
    assert len(val) == 2
    # test cells: (A=1,M=1) x2, (1,-1), (-1,1) x2, (-1,-1) -> min 1 -> first of each cell in order
    test = celeba(root=tmp_path, split="test", image_size=8)
    assert test.cell_counts().tolist() == [[1, 1], [1, 1]]
    assert test.labels.tolist() == [1, 1, 0, 0] and test.groups.tolist() == [1, 0, 1, 0]
    assert (red_means(test) - torch.tensor([140.0, 150.0, 160.0, 180.0], dtype=torch.float64)).abs().max() < 4
    assert test.class_names == ["not Attractive", "Attractive"] and test.group_names == ["not Male", "Male"]
    smiling = celeba(root=tmp_path, split="train", target="Smiling", group="Young", image_size=8)
    assert smiling.labels.tolist() == [(rows[n][3] + 1) // 2 for n in names[:12]]
    assert smiling.groups.tolist() == [(rows[n][4] + 1) // 2 for n in names[:12]]


def test_celeba_max_train_and_val_fraction(tmp_path):
    celeba_fixture(tmp_path)
    full = celeba(root=tmp_path, split="train", image_size=8)
    sub = celeba(root=tmp_path, split="train", image_size=8, max_train=5)
    assert len(sub) == 5
    # a subset in file order: each kept image appears in the full set, in increasing position
    pos = [int(torch.nonzero((red_means(full) - r).abs() < 4)[0]) for r in red_means(sub)]
    assert pos == sorted(pos)
    held_train = celeba(root=tmp_path, split="train", image_size=8, val_fraction=0.5)
    held_val = celeba(root=tmp_path, split="val", image_size=8, val_fraction=0.5)
    assert len(held_train) + len(held_val) == 12
    assert (held_train.cell_counts() + held_val.cell_counts()).tolist() == full.cell_counts().tolist()


def test_celeba_option_errors(tmp_path):
    celeba_fixture(tmp_path)
    with pytest.raises(ConfigError, match="celeba.target.*Did you mean 'Attractive'"):
        celeba(root=tmp_path, split="train", target="Atractive")
    with pytest.raises(ConfigError, match="celeba.group"):
        celeba(root=tmp_path, split="train", group="Female")
    with pytest.raises(ConfigError, match="different attributes"):
        celeba(root=tmp_path, split="train", target="Male")


def test_celeba_file_errors(tmp_path):
    with pytest.raises(DataError, match="img_align_celeba.*list_attr_celeba.txt"):
        celeba(root=tmp_path, split="train")
    rows = {"000001.jpg": [1, -1, 1, 1, -1], "000002.jpg": [-1, 1, -1, 1, 1]}
    part = {"000001.jpg": 0, "000002.jpg": 2}
    wrong_count = tmp_path / "wrong_count"
    celeba_files(wrong_count, rows, part, count=3)
    with pytest.raises(DataError, match="says 3 images on its first line but has 2 rows"):
        celeba(root=wrong_count, split="train", image_size=8)
    missing = tmp_path / "missing"
    celeba_files(missing, rows, {"000001.jpg": 0, "000002.jpg": 1}, skip_images=("000002.jpg",))
    assert len(celeba(root=missing, split="train", image_size=8)) == 1  # the absent val image is not needed
    with pytest.raises(DataError, match="not in .*000002.jpg"):
        celeba(root=missing, split="val", image_size=8)
    bad_value = tmp_path / "bad_value"
    celeba_files(bad_value, {**rows, "000003.jpg": [1, 2, 1, 1, 1]}, {**part, "000003.jpg": 0})
    with pytest.raises(DataError, match="line 5 \\(000003.jpg\\)"):
        celeba(root=bad_value, split="train", image_size=8)
    short_row = tmp_path / "short_row"
    celeba_files(short_row, {**rows, "000003.jpg": [1, 1, 1]}, {**part, "000003.jpg": 0})
    with pytest.raises(DataError, match="5 values -1 or 1.*line 5"):
        celeba(root=short_row, split="train", image_size=8)
    mismatch = tmp_path / "mismatch"
    celeba_files(mismatch, rows, {"000001.jpg": 0, "000009.jpg": 2})
    with pytest.raises(DataError, match="only in list_attr_celeba.txt: 000002.jpg.*only in list_eval_partition.txt: 000009"):
        celeba(root=mismatch, split="train", image_size=8)


# ----------------------------------------------------------------------------- ImageFolder


def gradient_png(path, width, height):
    """Red = 10 x column index, so a crop can be read back exactly (PNG is lossless)."""
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    arr[:, :, 0] = (10 * np.arange(width))[None, :]
    Image.fromarray(arr).save(path)


def folder_fixture(tmp_path):
    for split, counts in (("train", {"dog": 4, "cat": 2}), ("val", {"cat": 1, "dog": 2})):
        for cls, n in counts.items():
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                gradient_png(d / f"img{i}.PNG", width=16, height=8)
            (d / "readme.txt").write_text("ignored")


def test_resize_rgb_shorter_side_and_centre_crop():
    img = Image.new("RGB", (30, 10))
    assert resize_rgb(img, 5, None).size == (5, 5)  # squash
    assert resize_rgb(img, 5, 4).size == (4, 4)
    arr = np.zeros((8, 16, 3), dtype=np.uint8)
    arr[:, :, 0] = (10 * np.arange(16))[None, :]
    # shorter side already 8: no resampling; centre 8 of 16 columns starts at round(8 / 2) = 4
    out = np.asarray(resize_rgb(Image.fromarray(arr), 8, 8))
    assert out[:, :, 0].tolist() == [[40, 50, 60, 70, 80, 90, 100, 110]] * 8


def test_imagefolder_layout_labels_and_crops(tmp_path):
    folder_fixture(tmp_path)
    train = imagefolder(root=tmp_path, split="train", image_size=6, resize=8)
    test = imagefolder(root=tmp_path, split="test", image_size=6, resize=8)
    assert train.class_names == ["cat", "dog"] and train.num_groups == 1
    assert train.labels.tolist() == [0, 0, 1, 1, 1, 1] and train.groups.tolist() == [0] * 6
    assert test.labels.tolist() == [0, 1, 1]
    assert train.images.shape[1:] == (3, 8, 8) and test.images.shape[1:] == (3, 6, 6)
    assert train.images[0, 0, 0].tolist() == [40, 50, 60, 70, 80, 90, 100, 110]
    assert test.images[0, 0, 0].tolist() == [50, 60, 70, 80, 90, 100]  # centre 6 of 16: left = 5
    val = imagefolder(root=tmp_path, split="val", image_size=6, resize=8, val_fraction=0.5)
    assert val.labels.tolist() == [0, 1, 1] and val.images.shape[2:] == (6, 6)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="train not found.*ROOT/train/CLASS"):
        imagefolder(root=tmp_path, split="train")
    folder_fixture(tmp_path)
    with pytest.raises(ConfigError, match="resize"):
        imagefolder(root=tmp_path, split="train", image_size=8, resize=6)
    (tmp_path / "val" / "bird").mkdir()
    with pytest.raises(DataError, match="missing from .*bird"):
        imagefolder(root=tmp_path, split="test", image_size=6, resize=8)
    (tmp_path / "train" / "bird").mkdir()
    with pytest.raises(DataError, match="without images.*bird"):
        imagefolder(root=tmp_path, split="train", image_size=6, resize=8)


def test_decode_errors_name_the_files(tmp_path):
    good = tmp_path / "good.jpg"
    solid_jpeg(good, 50)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(DataError, match="2 image file\\(s\\).*bad.jpg.*missing.jpg"):
        decode_images([good, bad, tmp_path / "missing.jpg"], 4, name="demo")
    out = decode_images([good, good], 4, name="demo", workers=2)
    assert out.shape == (2, 3, 4, 4) and (out[:, 0].double().mean() - 50).abs() < 4
