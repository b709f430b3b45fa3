"""voc-seg on tiny fixtures in the real formats: palette PNGs with the VOC colormap, SBD .mat files
in the GTcls struct layout, SegmentationClassAug mode-L PNGs, the lists; the official set
arithmetic, groups from a CSV, the hold-out, the cache and the errors."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from fairdistill.data import build_dataset
from fairdistill.data.dense import VOID
from fairdistill.data.dense_loader import DenseBatchLoader
from fairdistill.data.voc_seg import combine_sbd, read_list, read_sbd_mask
from fairdistill.errors import ConfigError, DataError

scipy_io = pytest.importorskip("scipy.io")
scipy_sparse = pytest.importorskip("scipy.sparse")


def voc_palette() -> list[int]:
    """The VOC colormap: bits of the index interleaved into the high bits of R, G, B."""
    out = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out += [r, g, b]
    return out


def fake(image_id: str, h: int, w: int, void: bool = True):
    """Deterministic image and mask for an id (classes 0-20, a void border when ``void``)."""
    seed = sum(map(ord, image_id))
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = rng.integers(0, 21, (h, w), dtype=np.uint8)
    if void:
        mask[0, :] = VOID
    return rgb, mask


def write_jpeg(path, rgb):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, quality=95)


def write_palette_png(path, mask):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(mask, mode="P")
    im.putpalette(voc_palette())
    im.save(path)


def write_sbd_mat(path, mask):
    """A cls/*.mat as SBD ships it: struct GTcls with Segmentation, Boundaries (a cell of 20
    sparse maps) and CategoriesPresent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    boundaries = np.empty((20, 1), dtype=object)
    for c in range(20):
        boundaries[c, 0] = scipy_sparse.csc_matrix((mask == c + 1).astype(np.uint8))
    present = np.unique(mask[(mask > 0) & (mask < 21)]).astype(np.uint8).reshape(-1, 1)
    scipy_io.savemat(str(path), {"GTcls": {"Segmentation": mask, "Boundaries": boundaries, "CategoriesPresent": present}})


def write_list(path, ids):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{i}\n" for i in ids))


SIZES = {"a": (6, 8), "b": (7, 5), "c": (5, 9), "d": (8, 8), "e": (6, 6), "f": (9, 7), "g": (5, 5), "h": (6, 10)}


@pytest.fixture
def voc(tmp_path):
    """VOC train {a, b, c}, val {d, e}; SBD train {b, d, f}, val {g, a, h}; trainaug {a, f, d, h}."""
    root, sbd = tmp_path / "VOC2012", tmp_path / "benchmark_RELEASE" / "dataset"
    for i, (h, w) in SIZES.items():
        rgb, mask = fake(i, h, w)
        write_jpeg(root / "JPEGImages" / f"{i}.jpg", rgb)
        write_jpeg(sbd / "img" / f"{i}.jpg", rgb)
        write_palette_png(root / "SegmentationClass" / f"{i}.png", mask)
        sbd_mask = mask.copy()
        sbd_mask[sbd_mask == VOID] = 0  # SBD has no void
        sbd_mask[-1, -1] = 20
        write_sbd_mat(sbd / "cls" / f"{i}.mat", sbd_mask)
        aug = Image.fromarray(sbd_mask, mode="L")
        (root / "SegmentationClassAug").mkdir(parents=True, exist_ok=True)
        aug.save(root / "SegmentationClassAug" / f"{i}.png")
    write_list(root / "ImageSets/Segmentation/train.txt", ["a", "b", "c"])
    write_list(root / "ImageSets/Segmentation/val.txt", ["d", "e"])
    write_list(sbd / "train.txt", ["b", "d", "f"])
    write_list(sbd / "val.txt", ["g", "a", "h"])
    write_list(root / "ImageSets/Segmentation/trainaug.txt", ["a", "f", "d", "h"])
    return root, sbd


def decoded(path):
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1).copy())


def test_fixture_formats_read_back_as_the_official_code_expects(voc):
    root, sbd = voc
    im = Image.open(root / "SegmentationClass" / "a.png")
    assert im.mode == "P"
    pal = im.getpalette()
    assert pal[3:6] == [128, 0, 0] and pal[6:9] == [0, 128, 0] and pal[255 * 3:256 * 3] == [224, 224, 192]
    assert np.array_equal(np.array(im), fake("a", 6, 8)[1])
    seg = scipy_io.loadmat(str(sbd / "cls" / "a.mat"))["GTcls"][0]["Segmentation"][0]
    assert seg.dtype == np.uint8 and seg.shape == (6, 8) and seg.max() == 20 and VOID not in seg
    assert np.array_equal(read_sbd_mask(sbd / "cls" / "a.mat"), seg)
    assert Image.open(root / "SegmentationClassAug" / "a.png").mode == "L"


def test_voc_train_and_test(voc):
    root, _ = voc
    train = build_dataset("voc-seg", root=str(root), split="train")
    assert train.ids == ["a", "b", "c"] and train.task == "segmentation" and not train.same_size
    assert train.num_classes == 21 and train.class_names[1] == "aeroplane" and train.class_names[20] == "tvmonitor"
    assert train.num_groups == 1 and train.groups.tolist() == [0, 0, 0] and train.num_labels == 1
    for k, i in enumerate(train.ids):
        assert torch.equal(train.images[k], decoded(root / "JPEGImages" / f"{i}.jpg"))
        assert torch.equal(train.masks[k], torch.from_numpy(fake(i, *SIZES[i])[1]))
    test = build_dataset("voc-seg", root=str(root), split="test")
    assert test.ids == ["d", "e"] and (test.masks[0] == VOID).any()
    x, y, g = next(DenseBatchLoader(train, 3, augment={"train": True, "crop_size": 5, "base_size": 6}).epoch(0))
    assert x.shape == (3, 3, 5, 5) and y.shape == (3, 5, 5) and g.tolist() == [0, 0, 0]
    x, y, _ = next(DenseBatchLoader(test, 2, sampler="sequential").epoch(0))
    assert x.shape == (2, 3, 8, 8) and (y[1, 6:] == VOID).all()  # e (6x6) padded to d (8x8)


def test_sbd_set_arithmetic(voc):
    root, sbd = voc
    assert combine_sbd(["a", "b", "c"], ["d", "e"], ["b", "d", "f", "g", "a", "h"]) == [
        ("a", "voc"), ("b", "voc"), ("c", "voc"), ("f", "sbd"), ("g", "sbd"), ("h", "sbd")]
    ds = build_dataset("voc-seg", root=str(root), split="train", sbd_root=str(sbd))
    assert ds.ids == ["a", "b", "c", "f", "g", "h"]  # d is VOC val: excluded
    for k, i in enumerate(ds.ids):
        voc_mask = torch.from_numpy(fake(i, *SIZES[i])[1])
        if i in ("a", "b", "c"):  # read from VOC: its PNG, void included
            assert torch.equal(ds.masks[k], voc_mask)
        else:  # read from SBD: the .mat, no void
            want = torch.from_numpy(scipy_io.loadmat(str(sbd / "cls" / f"{i}.mat"))["GTcls"][0]["Segmentation"][0])
            assert torch.equal(ds.masks[k], want) and not (ds.masks[k] == VOID).any()
            assert torch.equal(ds.images[k], decoded(sbd / "img" / f"{i}.jpg"))


def test_trainaug_drops_val_ids(voc, caplog):
    root, _ = voc
    with caplog.at_level(logging.WARNING):
        ds = build_dataset("voc-seg", root=str(root), split="train", trainaug=True)
    assert ds.ids == ["a", "f", "h"] and "removed 1 VOC val id" in caplog.text
    want = np.array(Image.open(root / "SegmentationClassAug" / "f.png"))
    assert torch.equal(ds.masks[1], torch.from_numpy(want))


def test_deeplab_style_list_lines(tmp_path):
    path = tmp_path / "train_aug.txt"
    path.write_text("/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png\n\n2007_000039\n2007_000039\n")
    assert read_list(path, "x") == ["2007_000032", "2007_000039"]


def test_groups_from_csv_and_holdout(voc, tmp_path):
    root, sbd = voc
    csv = tmp_path / "groups.csv"
    csv.write_text("image,tone\n" + "".join(f"{i},{'dark' if i in 'aceg' else 'light'}\n" for i in SIZES))
    opts = dict(root=str(root), sbd_root=str(sbd), group_csv=str(csv), id_column="image", group_column="tone")
    ds = build_dataset("voc-seg", split="train", **opts)
    assert ds.group_names == ["dark", "light"] and ds.groups.tolist() == [0, 1, 0, 1, 0, 1]
    test = build_dataset("voc-seg", split="test", **opts)
    assert test.group_names == ["dark", "light"] and test.groups.tolist() == [1, 0]
    train, val = (build_dataset("voc-seg", split=s, val_fraction=0.34, **opts) for s in ("train", "val"))
    assert sorted(train.ids + val.ids) == sorted(ds.ids) and val.cell_counts().tolist() == [[1], [1]]
    with pytest.raises(DataError, match="group_csv.*missing from"):
        csv.write_text("image,tone\na,dark\n")
        build_dataset("voc-seg", split="train", **opts)


def test_cache_round_trip(voc, tmp_path):
    root, sbd = voc
    first = build_dataset("voc-seg", root=str(root), split="train", sbd_root=str(sbd), cache=True, cache_dir=str(tmp_path / "c"))
    files = list((tmp_path / "c").iterdir())
    assert len(files) == 1
    for i in SIZES:  # the cache is read, not the files
        (root / "JPEGImages" / f"{i}.jpg").unlink()
    again = build_dataset("voc-seg", root=str(root), split="train", sbd_root=str(sbd), cache=True, cache_dir=str(tmp_path / "c"))
    assert again.ids == first.ids
    assert all(torch.equal(a, b) for a, b in zip(again.images, first.images))
    assert all(torch.equal(a, b) for a, b in zip(again.masks, first.masks))


def test_errors_name_files_and_options(voc, tmp_path):
    root, sbd = voc
    with pytest.raises(DataError, match="data root folder .* not found; expected the VOC2012 folder"):
        build_dataset("voc-seg", root=str(tmp_path / "nope"), split="train")
    with pytest.raises(ConfigError, match="sbd_root and trainaug"):
        build_dataset("voc-seg", root=str(root), split="train", sbd_root=str(sbd), trainaug=True)
    with pytest.raises(DataError, match="SBD \\(data.options.sbd_root\\) folder"):
        build_dataset("voc-seg", root=str(root), split="train", sbd_root=str(tmp_path / "nosbd"))
    Image.fromarray(np.zeros((6, 8, 3), dtype=np.uint8)).save(root / "SegmentationClass" / "a.png")
    with pytest.raises(DataError, match="a.png \\(ValueError: mode RGB: expected a palette"):
        build_dataset("voc-seg", root=str(root), split="train")
    write_palette_png(root / "SegmentationClass" / "a.png", np.zeros((3, 3), dtype=np.uint8))
    with pytest.raises(DataError, match="a.png is 3x3 but .*a.jpg is 8x6"):
        build_dataset("voc-seg", root=str(root), split="train")
    write_palette_png(root / "SegmentationClass" / "a.png", np.full((6, 8), 33, dtype=np.uint8))
    with pytest.raises(DataError, match="mask of image 'a' holds value 33"):
        build_dataset("voc-seg", root=str(root), split="train")
    (root / "JPEGImages" / "b.jpg").write_bytes(b"not a jpeg")
    (root / "SegmentationClass" / "c.png").unlink()
    with pytest.raises(DataError, match="2 image/mask pair\\(s\\) could not be read: .*b.jpg.*missing file .*c.png"):
        build_dataset("voc-seg", root=str(root), split="train")
    (root / "ImageSets/Segmentation/val.txt").unlink()
    with pytest.raises(DataError, match="VOC val list .*val.txt not found"):
        build_dataset("voc-seg", root=str(root), split="test")


def test_bad_sbd_mat_is_named(voc):
    root, sbd = voc
    (sbd / "cls" / "f.mat").write_bytes(b"junk")
    scipy_io.savemat(str(sbd / "cls" / "g.mat"), {"other": np.zeros((5, 5))})
    with pytest.raises(DataError, match="2 image/mask pair.*f.mat \\(ValueError: not a readable MATLAB.*g.mat \\(ValueError: no GTcls.Segmentation"):
        build_dataset("voc-seg", root=str(root), split="train", sbd_root=str(sbd))
