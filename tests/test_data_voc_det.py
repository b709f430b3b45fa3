"""voc-det on a tiny VOCdevkit written as the real one looks: XML annotations (difficult,
truncated, person parts, float corners), ImageSets/Main lists, JPEG images."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from fairdistill.data import build_dataset
from fairdistill.data.voc_det import VOC_CLASSES, parse_annotation, parse_xml
from fairdistill.errors import ConfigError, DataError

CLASS_INDEX = {c: k for k, c in enumerate(VOC_CLASSES, start=1)}


def voc_xml(folder, image_id, size, objects):
    """An annotation file in the layout of VOC2007/VOC2012 (tab-indented, source/owner blocks)."""
    w, h = size
    parts = [f"""<annotation>
\t<folder>{folder}</folder>
\t<filename>{image_id}.jpg</filename>
\t<source>
\t\t<database>The {folder} Database</database>
\t\t<annotation>PASCAL {folder}</annotation>
\t\t<image>flickr</image>
\t</source>
\t<owner>
\t\t<flickrid>someone</flickrid>
\t\t<name>?</name>
\t</owner>
\t<size>
\t\t<width>{w}</width>
\t\t<height>{h}</height>
\t\t<depth>3</depth>
\t</size>
\t<segmented>0</segmented>
"""]
    for obj in objects:
        name, (x1, y1, x2, y2) = obj["name"], obj["box"]
        difficult = "" if obj.get("no_difficult") else f"\t\t<difficult>{obj.get('difficult', 0)}</difficult>\n"
        part = ""
        if obj.get("part"):
            part = ("\t\t<part>\n\t\t\t<name>head</name>\n\t\t\t<bndbox>\n\t\t\t\t<xmin>1</xmin>\n\t\t\t\t<ymin>1</ymin>\n"
                    "\t\t\t\t<xmax>2</xmax>\n\t\t\t\t<ymax>2</ymax>\n\t\t\t</bndbox>\n\t\t</part>\n")
        parts.append(f"""\t<object>
\t\t<name>{name}</name>
\t\t<pose>Unspecified</pose>
\t\t<truncated>{obj.get('truncated', 0)}</truncated>
{difficult}\t\t<bndbox>
\t\t\t<xmin>{x1}</xmin>
\t\t\t<ymin>{y1}</ymin>
\t\t\t<xmax>{x2}</xmax>
\t\t\t<ymax>{y2}</ymax>
\t\t</bndbox>
{part}\t</object>
""")
    parts.append("</annotation>\n")
    return "".join(parts)


def write_image(path, w, h, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), colour, dtype=np.uint8)).save(path, quality=95)


IMAGES = {
    # folder, id, (w, h), colour, objects
    ("VOC2007", "000005"): ((20, 16), (200, 30, 30), [
        {"name": "chair", "box": (3, 4, 10, 12)},
        {"name": "chair", "box": (11, 2, 20, 16), "difficult": 1, "truncated": 1},
    ]),
    ("VOC2007", "000007"): ((24, 12), (30, 200, 30), [
        {"name": "car", "box": (1, 1, 24, 12), "truncated": 1},
    ]),
    ("VOC2007", "000009"): ((16, 16), (30, 30, 200), [  # only a difficult box
        {"name": "horse", "box": (2, 2, 9, 9), "difficult": 1},
    ]),
    ("VOC2007", "000001"): ((18, 14), (120, 120, 120), [
        {"name": "dog", "box": (5, 3, 14, 13)},
        {"name": "person", "box": (1, 1, 6, 14), "difficult": 1, "part": True},
    ]),
    ("VOC2012", "2008_000008"): ((22, 18), (250, 250, 20), [
        {"name": " Person ", "box": ("4.5", "1.5", "20.0", "18"), "part": True, "no_difficult": True},
        {"name": "horse", "box": (2, 3, 30, 18)},  # xmax beyond the 22-pixel width: clipped
    ]),
}
LISTS = {
    ("VOC2007", "trainval"): ["000005", "000007", "000009"],
    ("VOC2007", "test"): ["000001"],
    ("VOC2012", "trainval"): ["2008_000008"],
}


def make_devkit(root, images=IMAGES, lists=LISTS):
    for (folder, image_id), ((w, h), colour, objects) in images.items():
        ann = root / folder / "Annotations" / f"{image_id}.xml"
        ann.parent.mkdir(parents=True, exist_ok=True)
        ann.write_text(voc_xml(folder, image_id, (w, h), objects))
        write_image(root / folder / "JPEGImages" / f"{image_id}.jpg", w, h, colour)
    for (folder, image_set), ids in lists.items():
        path = root / folder / "ImageSets" / "Main" / f"{image_set}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{i}\n" for i in ids))
    return root


@pytest.fixture
def devkit(tmp_path):
    return make_devkit(tmp_path / "VOCdevkit")


# ------------------------------------------------------------------ parsing
def test_parse_converts_one_based_inclusive_corners():
    xml = voc_xml("VOC2007", "000005", (500, 375), [
        {"name": "chair", "box": (263, 211, 324, 339)},
        {"name": "Dog ", "box": ("48.5", "10.25", "100.0", "200"), "difficult": 1, "part": True},
        {"name": "person", "box": (7, 7, 7, 9), "no_difficult": True},
    ])
    boxes, labels, difficult = parse_annotation(xml.encode(), "a.xml", CLASS_INDEX)
    # (x1 - 1, y1 - 1, x2, y2): a 1-pixel-wide box [7, 7] has width 1
    assert boxes.tolist() == [[262.0, 210.0, 324.0, 339.0], [47.5, 9.25, 100.0, 200.0], [6.0, 6.0, 7.0, 9.0]]
    assert labels.tolist() == [CLASS_INDEX["chair"], CLASS_INDEX["dog"], CLASS_INDEX["person"]] == [9, 12, 15]
    assert difficult.tolist() == [False, True, False]
    assert boxes.dtype == torch.float32


def test_parse_without_objects():
    boxes, labels, difficult = parse_annotation(voc_xml("VOC2012", "x", (5, 5), []).encode(), "a.xml", CLASS_INDEX)
    assert boxes.shape == (0, 4) and labels.shape == (0,) and difficult.shape == (0,)


@pytest.mark.parametrize("edit, match", [
    (lambda s: s.replace("<name>chair</name>", "<name>chairs</name>"), r"a\.xml: <object> 1 \(<name>chairs</name>\): unknown class"),
    (lambda s: s.replace("\t\t\t<xmax>324</xmax>\n", ""), r"a\.xml: <object> 1 .*<bndbox><xmax> is missing"),
    (lambda s: s.replace("<ymin>211</ymin>", "<ymin>2l1</ymin>"), r"<bndbox><ymin> is '2l1'; expected a number"),
    (lambda s: s.replace("<xmin>263</xmin>", "<xmin>400</xmin>"), r"a\.xml: <object> 1 .* is not a box"),
    (lambda s: s.replace("<difficult>0</difficult>", "<difficult>yes</difficult>"), r"<difficult> is 'yes'"),
    (lambda s: s.replace("<annotation>\n", "<annotations>\n", 1)[:-len("</annotation>\n")] + "</annotations>\n",
     r"root element is <annotations>"),
    (lambda s: s.replace("</annotation>", ""), r"a\.xml: not well-formed XML"),
])
def test_parse_errors_name_the_file_and_element(edit, match):
    xml = edit(voc_xml("VOC2007", "000005", (500, 375), [{"name": "chair", "box": (263, 211, 324, 339)}]))
    with pytest.raises(DataError, match=match):
        parse_annotation(xml.encode(), "a.xml", CLASS_INDEX)


@pytest.mark.parametrize("doc", [
    # billion laughs
    '<?xml version="1.0"?>\n<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]>\n'
    "<annotation><object><name>&lol2;</name></object></annotation>",
    # external entity
    '<?xml version="1.0"?>\n<!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]>\n<annotation>&x;</annotation>',
    # external DTD
    '<?xml version="1.0"?>\n<!DOCTYPE annotation SYSTEM "http://example.com/a.dtd">\n<annotation/>',
])
def test_xml_with_a_dtd_or_entities_is_refused(doc):
    with pytest.raises(DataError, match=r"evil\.xml: holds a document type declaration"):
        parse_xml(doc.encode(), "evil.xml")


def test_undefined_entity_is_not_well_formed():
    with pytest.raises(DataError, match="not well-formed"):
        parse_xml(b"<annotation>&x;</annotation>", "e.xml")
    # the predefined entities and character references still work
    assert parse_xml(b"<a>&lt;&#65;</a>", "ok.xml").text == "<A"


# ------------------------------------------------------------------ the data set
def test_train_on_voc07_plus_12(devkit, caplog):
    with caplog.at_level(logging.INFO, logger="fairdistill.data.voc_det"):
        ds = build_dataset("voc-det", str(devkit), "train")
    # 000009 has only a difficult box: dropped from training
    assert ds.ids == ["000005", "000007", "2008_000008"]
    assert ds.task == "detection" and ds.num_classes == 20 and ds.class_names == list(VOC_CLASSES)
    assert ds.num_groups == 1 and ds.groups.tolist() == [0, 0, 0] and ds.labels.tolist() == [0, 0, 0]
    assert [tuple(im.shape) for im in ds.images] == [(3, 16, 20), (3, 12, 24), (3, 18, 22)]
    assert all(im.dtype == torch.uint8 for im in ds.images)
    assert abs(ds.images[0][:, 8, 10].int() - torch.tensor([200, 30, 30])).max() <= 3  # RGB order kept
    # difficult boxes dropped (keep_difficult=False)
    assert ds.boxes[0].tolist() == [[2.0, 3.0, 10.0, 12.0]] and ds.box_labels[0].tolist() == [9]
    assert ds.boxes[1].tolist() == [[0.0, 0.0, 24.0, 12.0]]
    # a float box, a missing <difficult> (0), a box clipped to the image width 22, parts ignored
    assert ds.boxes[2].tolist() == [[3.5, 0.5, 20.0, 18.0], [1.0, 2.0, 22.0, 18.0]]
    assert ds.box_labels[2].tolist() == [15, 13] and ds.difficult[2].tolist() == [False, False]
    assert ds.mean is not None and ds.std is not None
    assert "1 training image(s) without a box" in caplog.text


def test_keep_difficult_for_training(devkit):
    ds = build_dataset("voc-det", str(devkit), "train", keep_difficult=True)
    assert ds.ids == ["000005", "000007", "000009", "2008_000008"]
    assert ds.boxes[0].tolist() == [[2.0, 3.0, 10.0, 12.0], [10.0, 1.0, 20.0, 16.0]]
    assert ds.difficult[0].tolist() == [False, True] and ds.difficult[2].tolist() == [True]


def test_test_split_keeps_difficult_boxes_flagged(devkit):
    ds = build_dataset("voc-det", str(devkit), "test")
    assert ds.ids == ["000001"] and ds.name == "voc-det-test"
    assert ds.boxes[0].tolist() == [[4.0, 2.0, 14.0, 13.0], [0.0, 0.0, 6.0, 14.0]]
    assert ds.box_labels[0].tolist() == [12, 15] and ds.difficult[0].tolist() == [False, True]


def test_sets_options_and_devkit_layouts(devkit, tmp_path):
    only07 = build_dataset("voc-det", str(devkit), "train", train_sets=[["VOC2007", "trainval"]])
    assert only07.ids == ["000005", "000007"]
    # ROOT may be the folder holding VOCdevkit/
    assert build_dataset("voc-det", str(tmp_path), "test").ids == ["000001"]
    test12 = build_dataset("voc-det", str(devkit), "test", test_sets=[["VOC2012", "trainval"]])
    assert test12.ids == ["2008_000008"]
    with pytest.raises(ConfigError, match="train_sets"):
        build_dataset("voc-det", str(devkit), "train", train_sets=["VOC2007", "trainval"])
    with pytest.raises(ConfigError, match="test_sets"):
        build_dataset("voc-det", str(devkit), "test", test_sets=[["..", "test"]])
    with pytest.raises(DataError, match="listed twice"):
        build_dataset("voc-det", str(devkit), "train", train_sets=[["VOC2007", "trainval"], ["VOC2007", "trainval"]])
    with pytest.raises(DataError, match=r"ImageSets/Main/val\.txt"):
        build_dataset("voc-det", str(devkit), "train", train_sets=[["VOC2007", "val"]])
    with pytest.raises(ConfigError, match="keep_dificult"):
        build_dataset("voc-det", str(devkit), "train", keep_dificult=True)


def test_max_size_scales_images_and_boxes(devkit):
    ds = build_dataset("voc-det", str(devkit), "train", train_sets=[["VOC2007", "trainval"]], max_size=10)
    assert [tuple(im.shape) for im in ds.images] == [(3, 8, 10), (3, 5, 10)]
    assert ds.boxes[0].tolist() == [[1.0, 1.5, 5.0, 6.0]]
    assert torch.allclose(ds.boxes[1], torch.tensor([[0.0, 0.0, 10.0, 5.0]]))


def test_group_csv_and_val_split(devkit, tmp_path):
    csv = tmp_path / "groups.csv"
    csv.write_text("id,group\n000005,dark\n000007,light\n000009,dark\n2008_000008,light\n000001,light\n")
    train = build_dataset("voc-det", str(devkit), "train", group_csv=str(csv))
    assert train.group_names == ["dark", "light"] and train.groups.tolist() == [0, 1, 1]
    full = build_dataset("voc-det", str(devkit), "train", group_csv=str(csv), keep_difficult=True)
    tr = build_dataset("voc-det", str(devkit), "train", group_csv=str(csv), keep_difficult=True, val_fraction=0.5)
    val = build_dataset("voc-det", str(devkit), "val", group_csv=str(csv), val_fraction=0.5)
    # one image of each group held out; the two parts split the training list
    assert sorted(tr.ids + val.ids) == sorted(full.ids) and not set(tr.ids) & set(val.ids)
    assert sorted(val.groups.tolist()) == [0, 1]
    # evaluation splits keep difficult boxes, flagged
    assert all(v.shape == b.shape[:1] for v, b in zip(val.difficult, val.boxes))
    csv.write_text("id,group\n000005,dark\n")
    with pytest.raises(DataError, match="missing from"):
        build_dataset("voc-det", str(devkit), "train", group_csv=str(csv))
    with pytest.raises(DataError, match="val_fraction"):
        build_dataset("voc-det", str(devkit), "val")


def test_missing_files_are_named(devkit):
    (devkit / "VOC2012" / "JPEGImages" / "2008_000008.jpg").unlink()
    with pytest.raises(DataError, match=r"could not be read: .*2008_000008\.jpg"):
        build_dataset("voc-det", str(devkit), "train")
    (devkit / "VOC2012" / "Annotations" / "2008_000008.xml").unlink()
    with pytest.raises(DataError, match=r"annotation .*2008_000008\.xml of VOC2012/trainval cannot be read"):
        build_dataset("voc-det", str(devkit), "train")
    with pytest.raises(DataError, match="not found"):
        build_dataset("voc-det", str(devkit / "nowhere"), "train")
