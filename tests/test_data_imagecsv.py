"""imagecsv and imagefolder's group CSV: labels, single and intersectional groups, split files,
and errors, on PNG files and CSVs written here in their real formats."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fairdistill.data import build_dataset
from fairdistill.errors import ConfigError, DataError

ROWS = [  # path, label, race, gender, split
    ("img/a.png", "cat", "b", "f", "train"), ("img/b.png", "dog", "w", "m", "train"),
    ("img/c.png", "cat", "w", "f", "train"), ("img/d.png", "dog", "b", "f", "train"),
    ("img/e.png", "cat", "b", "f", "train"), ("img/f.png", "dog", "w", "m", "test"),
    ("img/g.png", "cat", "w", "f", "test"), ("img/h.png", "dog", "b", "f", "test"),
]


def write_images(root, names, size=(5, 7)):
    pixels = {}
    rng = np.random.default_rng(0)
    for n in names:
        arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        (root / n).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(root / n)
        pixels[n] = arr
    return pixels


@pytest.fixture
def root(tmp_path):
    write_images(tmp_path, [r[0] for r in ROWS])
    lines = ["path,label,race,gender,split,notes"] + [",".join(r) + ",x" for r in ROWS]
    (tmp_path / "all.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tmp_path


def test_single_group_column_labels_names_and_pixels(root):
    train = build_dataset("imagecsv", root=str(root), split="train", csv="all.csv", group="race", image_size=4)
    test = build_dataset("imagecsv", root=str(root), split="test", csv="all.csv", group="race", image_size=4)
    assert train.class_names == test.class_names == ["cat", "dog"]
    assert train.group_names == test.group_names == ["b", "w"]
    assert train.labels.tolist() == [0, 1, 0, 1, 0] and train.groups.tolist() == [0, 1, 1, 0, 0]
    assert test.labels.tolist() == [1, 0, 1] and test.groups.tolist() == [1, 1, 0]
    assert (train.num_classes, train.num_groups) == (2, 2) and train.images.shape == (5, 3, 4, 4)
    ref = np.asarray(Image.open(root / "img/f.png").convert("RGB").resize((4, 4), Image.BILINEAR))
    assert torch.equal(test.images[0], torch.from_numpy(ref.transpose(2, 0, 1).copy()))


def test_intersectional_groups_are_the_combinations_present(root):
    train = build_dataset("imagecsv", root=str(root), split="train", csv="all.csv", group=["race", "gender"],
                          image_size=4)
    test = build_dataset("imagecsv", root=str(root), split="test", csv="all.csv", group=["race", "gender"],
                         image_size=4)
    # present combinations sorted by (race, gender): (b, f), (w, f), (w, m); (b, m) never occurs
    assert train.group_names == test.group_names == ["b/f", "w/f", "w/m"]
    want = {("b", "f"): 0, ("w", "f"): 1, ("w", "m"): 2}
    assert train.groups.tolist() == [want[(r[2], r[3])] for r in ROWS if r[4] == "train"]
    assert test.groups.tolist() == [want[(r[2], r[3])] for r in ROWS if r[4] == "test"]
    assert train.cell_counts().tolist() == [[2, 1], [1, 0], [0, 1]]


def test_one_file_per_split_numbers_classes_over_both(root):
    (root / "tr.csv").write_text("file,y\nimg/a.png,1\nimg/b.png,10\n", encoding="utf-8")
    (root / "te.csv").write_text("\ufefffile,y\nimg/c.png,2\n\nimg/d.png,10\n", encoding="utf-8")
    opts = dict(root=str(root), train_csv="tr.csv", test_csv="te.csv", path_column="file", label_column="y",
                image_size=None)
    train, test = (build_dataset("imagecsv", split=s, **opts) for s in ("train", "test"))
    assert train.class_names == ["1", "2", "10"]  # integers sorted numerically, over both files
    assert train.labels.tolist() == [0, 2] and test.labels.tolist() == [1, 2]
    assert train.group_names == ["all"] and train.groups.tolist() == [0, 0]
    assert train.images.shape == (2, 3, 7, 5)  # original size kept


def test_val_fraction_holds_out_a_stratified_part_of_train(root):
    opts = dict(root=str(root), csv="all.csv", group="race", image_size=4, val_fraction=0.4)
    train, val = (build_dataset("imagecsv", split=s, **opts) for s in ("train", "val"))
    # round(0.4 n) per (group, class) cell: (b, cat) has 2 -> 1 held out; the single-item cells keep theirs
    assert len(train) == 4 and (val.labels.tolist(), val.groups.tolist()) == ([0], [0])
    both = sorted(zip(train.labels.tolist() + val.labels.tolist(), train.groups.tolist() + val.groups.tolist()))
    assert both == sorted([(0, 0), (1, 1), (0, 1), (1, 0), (0, 0)])


@pytest.mark.parametrize("text,options,error,match", [
    ("path,label,split\nimg/a.png,cat,train\n", dict(group="race"), DataError, "lacks column.*'race'"),
    ("path,label,split\nimg/a.png,cat,train\nimg/a.png,dog,test\n", {}, DataError, "lists image 'img/a.png' twice"),
    ("path,label,split\nimg/a.png,cat,train\nimg/b.png,dog,valid\n", {}, DataError, "'valid'.*val_fraction"),
    ("path,label,split\nimg/a.png,cat,train\n", {}, DataError, "no test rows"),
    ("path,label,split\nimg/a.png,,train\nimg/b.png,dog,test\n", {}, DataError, "line 2 has an empty 'label'"),
    ("path,label,split\nimg/a.png,cat,train\nimg/zz.png,dog,test\n", {}, DataError, "could not be read.*zz.png"),
    ("path,label,split\n", dict(train_csv="x.csv"), ConfigError, "not both"),
    ("path,label,split\n", dict(group=[]), ConfigError, "non-empty list"),
])
def test_bad_files_and_options_name_the_problem(root, text, options, error, match):
    (root / "bad.csv").write_text(text, encoding="utf-8")
    split = "test" if "zz" in text else "train"
    with pytest.raises(error, match=match):
        build_dataset("imagecsv", root=str(root), split=split, csv="bad.csv", image_size=4, **options)
    with pytest.raises(ConfigError, match="needs csv"):
        build_dataset("imagecsv", root=str(root), split="train", train_csv="bad.csv")


def test_imagefolder_reads_groups_from_a_csv(tmp_path):
    names = ["train/cat/1.png", "train/cat/2.png", "train/dog/3.png", "val/cat/4.png", "val/dog/5.png"]
    write_images(tmp_path, names, size=(8, 8))
    rows = ["id,skin,age"] + [f"{n},{'dark' if i % 2 else 'light'},{'old' if i < 2 else 'young'}"
                              for i, n in enumerate(names)] + ["train/cat/unused.png,dark,old"]
    csv = tmp_path / "groups.csv"
    csv.write_text("\n".join(rows) + "\n", encoding="utf-8")
    opts = dict(root=str(tmp_path), image_size=4, resize=4, group_csv=str(csv))
    train = build_dataset("imagefolder", split="train", group_column="skin", **opts)
    test = build_dataset("imagefolder", split="test", group_column="skin", **opts)
    assert train.group_names == test.group_names == ["dark", "light"]
    assert train.groups.tolist() == [1, 0, 1] and test.groups.tolist() == [0, 1]
    inter = build_dataset("imagefolder", split="train", group_column=["skin", "age"], **opts)
    # combinations in the whole file: dark/old (1 and unused), light/old, light/young, dark/young
    assert inter.group_names == ["dark/old", "dark/young", "light/old", "light/young"]
    assert inter.groups.tolist() == [2, 0, 3]
    csv.write_text("id,skin\ntrain/cat/1.png,dark\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"2 image\(s\) of the data set are missing.*train/cat/2.png"):
        build_dataset("imagefolder", split="train", group_column="skin", **opts)
