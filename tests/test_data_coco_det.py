"""coco-det on a tiny instances json in COCO's format: non-contiguous category ids, [x, y, w, h]
boxes, an iscrowd region, an image without annotations, JPEG files."""
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from fairdistill.data import build_dataset
from fairdistill.data.coco_det import parse_instances
from fairdistill.errors import DataError

CATEGORIES = [  # COCO lists them in id order; shuffled here, ids not contiguous
    {"supercategory": "animal", "id": 18, "name": "dog"},
    {"supercategory": "person", "id": 1, "name": "person"},
    {"supercategory": "indoor", "id": 90, "name": "toothbrush"},
]


def instances(images, annotations):
    return {
        "info": {"description": "tiny", "version": "1.0", "year": 2017},
        "licenses": [{"id": 1, "name": "x", "url": ""}],
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }


def image(iid, w, h, folder_name=None):
    return {"license": 1, "file_name": folder_name or f"{iid:012d}.jpg", "coco_url": "", "height": h, "width": w,
            "date_captured": "2013-11-14 17:02:52", "flickr_url": "", "id": iid}


def ann(aid, iid, cat, bbox, crowd=0):
    return {"segmentation": [[bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1], bbox[0], bbox[1] + bbox[3]]]
            if not crowd else {"counts": [0, 4], "size": [10, 10]},
            "area": bbox[2] * bbox[3], "iscrowd": crowd, "image_id": iid, "bbox": bbox, "category_id": cat, "id": aid}


TRAIN = instances(
    [image(397133, 20, 16), image(37777, 12, 10), image(252219, 16, 16)],
    [
        ann(1, 397133, 18, [2.5, 3.0, 10.25, 8.0]),
        ann(2, 397133, 1, [0.0, 0.0, 5.0, 16.0], crowd=1),
        ann(3, 37777, 90, [1.0, 2.0, 4.0, 3.0]),
        ann(4, 37777, 1, [10.0, 1.0, 5.0, 5.0]),        # extends past the 12-pixel width: clipped
        ann(5, 397133, 1, [6.0, 4.0, 0.0, 3.0]),        # zero width: no area, dropped
        # 252219 has no annotation
    ],
)
TEST = instances([image(139, 14, 12), image(285, 10, 10)], [
    ann(10, 139, 1, [1.0, 1.0, 6.0, 6.0]),
    ann(11, 139, 90, [0.0, 0.0, 14.0, 12.0], crowd=1),
])


@pytest.fixture
def coco(tmp_path):
    for doc, split in ((TRAIN, "train2017"), (TEST, "val2017")):
        folder = tmp_path / split
        folder.mkdir()
        for im in doc["images"]:
            Image.fromarray(np.full((im["height"], im["width"], 3), 77, dtype=np.uint8)).save(folder / im["file_name"])
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train2017.json").write_text(json.dumps(TRAIN))
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(TEST))
    return tmp_path


def test_parse_maps_category_ids_in_order_and_converts_boxes():
    ids, files, names, boxes, labels, crowd = parse_instances(TRAIN, "t.json")
    assert ids == ["397133", "37777", "252219"] and files[0] == "000000397133.jpg"
    assert names == ["person", "dog", "toothbrush"]  # ids 1, 18, 90 -> labels 1, 2, 3
    assert boxes[0].tolist() == [[2.5, 3.0, 12.75, 11.0], [0.0, 0.0, 5.0, 16.0], [6.0, 4.0, 6.0, 7.0]]
    assert labels[0].tolist() == [2, 1, 1] and crowd[0].tolist() == [False, True, False]
    assert labels[1].tolist() == [3, 1] and boxes[2].shape == (0, 4)


def test_training_split(coco, caplog):
    with caplog.at_level(logging.INFO, logger="fairdistill.data.voc_det"):
        ds = build_dataset("coco-det", str(coco), "train")
    # 252219 has no box: dropped from training; the crowd and the zero-width box are not trained on
    assert ds.ids == ["397133", "37777"] and ds.name == "coco-det-train"
    assert ds.num_classes == 3 and ds.class_names == ["person", "dog", "toothbrush"]
    assert [tuple(im.shape) for im in ds.images] == [(3, 16, 20), (3, 10, 12)]
    assert ds.boxes[0].tolist() == [[2.5, 3.0, 12.75, 11.0]] and ds.box_labels[0].tolist() == [2]
    assert ds.boxes[1].tolist() == [[1.0, 2.0, 5.0, 5.0], [10.0, 1.0, 12.0, 6.0]]
    assert ds.box_labels[1].tolist() == [3, 1] and not any(d.any() for d in ds.difficult)
    assert "outside the image" in caplog.text and "without a box" in caplog.text


def test_test_split_marks_crowd_as_difficult(coco):
    ds = build_dataset("coco-det", str(coco), "test")
    assert ds.ids == ["139", "285"]  # evaluation keeps an image without boxes
    assert ds.boxes[0].tolist() == [[1.0, 1.0, 7.0, 7.0], [0.0, 0.0, 14.0, 12.0]]
    assert ds.box_labels[0].tolist() == [1, 3] and ds.difficult[0].tolist() == [False, True]
    assert ds.boxes[1].shape == (0, 4)


def test_paths_group_csv_and_val(coco, tmp_path):
    csv = tmp_path / "g.csv"
    csv.write_text("id,group\n397133,a\n37777,b\n252219,b\n139,a\n285,b\n")
    ds = build_dataset("coco-det", str(coco), "test", group_csv=str(csv))
    assert ds.group_names == ["a", "b"] and ds.groups.tolist() == [0, 1]
    val = build_dataset("coco-det", str(coco), "val", group_csv=str(csv), val_fraction=0.5)
    tr = build_dataset("coco-det", str(coco), "train", group_csv=str(csv), val_fraction=0.5)
    assert not set(val.ids) & set(tr.ids) and set(val.ids) | set(tr.ids) <= {"397133", "37777", "252219"}
    assert sorted(val.groups.tolist()) == [0, 1]  # one of each group's images held out
    # annotation and image paths are options, relative to root or absolute
    other = build_dataset("coco-det", str(tmp_path), "test",
                          test_annotations=str(coco / "annotations" / "instances_val2017.json"), test_images="val2017")
    assert other.ids == ["139", "285"]


@pytest.mark.parametrize("edit, match", [
    (lambda d: d["annotations"][0].update(category_id=2), r"annotations\[0\] \(id 1\) has category_id 2, which is not in"),
    (lambda d: d["annotations"][1].update(image_id=5), r"annotations\[1\] \(id 2\) refers to image_id 5"),
    (lambda d: d["annotations"][2].update(bbox=[1, 2, 3]), r"annotations\[2\] \(id 3\) has bbox \[1, 2, 3\]"),
    (lambda d: d["annotations"][2].update(bbox=[1, 2, -3, 4]), r"has bbox \[1, 2, -3, 4\]"),
    (lambda d: d["annotations"][0].update(iscrowd=2), r"has iscrowd 2"),
    (lambda d: d["images"][0].update(file_name="../../etc/x.jpg"), r"images\[0\] \(id 397133\) has file_name"),
    (lambda d: d["images"][1].update(file_name="/abs/x.jpg"), r"images\[1\] \(id 37777\) has file_name"),
    (lambda d: d["images"][1].update(id=397133), r"images\[1\] repeats image id 397133"),
    (lambda d: d["categories"].append({"id": 1, "name": "again"}), r"lists a category id twice"),
    (lambda d: d.pop("categories"), r"top-level 'categories' is missing"),
])
def test_errors_name_the_file_and_element(edit, match):
    doc = json.loads(json.dumps(TRAIN))
    edit(doc)
    with pytest.raises(DataError, match=match):
        parse_instances(doc, "t.json")


def test_file_errors(coco):
    (coco / "annotations" / "instances_val2017.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot read .* as json"):
        build_dataset("coco-det", str(coco), "test")
    with pytest.raises(DataError, match="not found"):
        build_dataset("coco-det", str(coco), "test", test_annotations="missing.json")
    (coco / "train2017" / "000000037777.jpg").unlink()
    with pytest.raises(DataError, match=r"could not be read: .*000000037777\.jpg"):
        build_dataset("coco-det", str(coco), "train")
    assert torch.is_tensor(parse_instances(TEST, "x")[3][0])
