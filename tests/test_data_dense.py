"""DenseDataset: validation of images, masks and boxes, subsets, cells, split, per-epoch resample."""
from __future__ import annotations

import pytest
import torch

from fairdistill.data.dense import VOID, DenseDataset, select_dense_split
from fairdistill.errors import DataError


def seg(n=6, hw=(5, 7), num_classes=4, **kw):
    images = torch.randint(0, 256, (n, 3, *hw), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    masks = torch.randint(0, num_classes, (n, *hw), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    masks[:, 0, 0] = VOID
    kw.setdefault("groups", torch.arange(n) % 2)
    return DenseDataset(images, kw.pop("groups"), num_classes, 2, task="segmentation", name="toy-seg", masks=masks, **kw)


def det(sizes=((5, 7), (9, 4)), **kw):
    images = [torch.zeros(3, h, w, dtype=torch.uint8) for h, w in sizes]
    boxes = [torch.tensor([[0.0, 0.0, 2.0, 3.0], [1.0, 1.5, 4.0, 5.0]]), torch.zeros(0, 4)]
    labels = [torch.tensor([1, 3]), torch.zeros(0, dtype=torch.long)]
    return DenseDataset(images, [0, 0], 3, 1, task="detection", name="toy-det", boxes=boxes, box_labels=labels, **kw)


def test_segmentation_items_cells_and_subset():
    ds = seg(labels=[0, 1, 1, 0, 1, 1], ids=[f"im{i}" for i in range(6)], num_labels=3)
    assert ds.same_size and ds.image_shape == (3, 5, 7) and ds.channels == 3 and len(ds) == 6
    image, mask, g = ds[3]
    assert torch.equal(image, ds.images[3]) and torch.equal(mask, ds.masks[3]) and g == 1
    # cells are (group, image-level label) with num_labels columns, not num_classes
    assert ds.cell_counts().tolist() == [[1, 2, 0], [1, 2, 0]]
    sub = ds.subset(torch.tensor([4, 1]))
    assert sub.ids == ["im4", "im1"] and sub.labels.tolist() == [1, 1] and sub.num_labels == 3
    assert torch.equal(sub.masks, ds.masks[[4, 1]]) and sub.groups.tolist() == [0, 1]


def test_default_labels_ids_and_num_labels():
    ds = seg()
    assert ds.labels.tolist() == [0] * 6 and ds.num_labels == 1 and ds.ids == [str(i) for i in range(6)]
    assert ds.class_names == ["0", "1", "2", "3"] and ds.group_names == ["0", "1"]


def test_detection_lists_defaults_and_targets():
    ds = det(ids=["a", "b"])
    assert not ds.same_size and ds.image_shape is None and ds.channels == 3
    assert [d.tolist() for d in ds.difficult] == [[False, False], []]
    _, target, _ = ds[0]
    assert target["boxes"].dtype == torch.float32 and target["labels"].tolist() == [1, 3]
    assert ds.boxes[1].shape == (0, 4)
    sub = ds.subset([1, 0])
    assert sub.ids == ["b", "a"] and sub.boxes[1].shape == (2, 4)


def test_variable_size_segmentation_checks_mask_shapes():
    images = [torch.zeros(3, 4, 6, dtype=torch.uint8), torch.zeros(3, 5, 3, dtype=torch.uint8)]
    masks = [torch.zeros(4, 6, dtype=torch.uint8), torch.zeros(5, 3, dtype=torch.uint8)]
    DenseDataset(images, [0, 0], 21, 1, task="segmentation", name="v", masks=masks, ids=["x", "y"])
    with pytest.raises(DataError, match="v: mask of image 'y' must be uint8 \\(5, 3\\)"):
        DenseDataset(images, [0, 0], 21, 1, task="segmentation", name="v", masks=[masks[0], masks[0]], ids=["x", "y"])


@pytest.mark.parametrize("change,match", [
    (lambda kw: kw.update(task="depth"), "task must be one of"),
    (lambda kw: kw["masks"].__setitem__((2, 1, 1), 9), "holds value 9; expected class indices 0..3 or 255"),
    (lambda kw: kw.update(masks=kw["masks"][:, :4]), "masks must be uint8"),
    (lambda kw: kw.update(masks=None), "needs masks"),
    (lambda kw: kw.update(groups=[0, 1, 2, 0, 1, 0]), "group 2 is outside"),
    (lambda kw: kw.update(labels=[0, 0, 0]), "6 images but 3 labels"),
    (lambda kw: kw.update(labels=[0, 0, 0, 0, 0, 5], num_labels=2), "image-level label 5"),
    (lambda kw: kw.update(ids=["a"] * 6), "ids must be 6 unique"),
    (lambda kw: kw.update(mean=(0.5, 0.5)), "mean has 2 values for 3-channel"),
    (lambda kw: kw.update(class_names=["bg"]), "1 class names for 4 classes"),
    (lambda kw: kw.update(boxes=[]), "takes masks, not boxes"),
])
def test_segmentation_errors_name_the_data_set(change, match):
    kw = dict(images=torch.zeros(6, 3, 5, 7, dtype=torch.uint8), groups=torch.arange(6) % 2, num_classes=4,
              num_groups=2, task="segmentation", name="toy-seg", masks=torch.zeros(6, 5, 7, dtype=torch.uint8))
    change(kw)
    with pytest.raises(DataError, match=match) as err:
        DenseDataset(kw.pop("images"), kw.pop("groups"), kw.pop("num_classes"), kw.pop("num_groups"), **kw)
    assert "toy-seg" in str(err.value)


@pytest.mark.parametrize("boxes,labels,match", [
    ([[[0, 0, 2, 3]], []], [[4], []], "box label 4; expected 1..3"),
    ([[[0, 0, 2, 3]], []], [[0], []], "box label 0"),
    ([[[2, 0, 2, 3]], []], [[1], []], "has box \\[2.0, 0.0, 2.0, 3.0\\]"),
    ([[[0, 0, float("nan"), 3]], []], [[1], []], "expected finite"),
    ([[[0, 0, 2, 3]], []], [[1, 2], []], "expected \\(K, 4\\), \\(K,\\) and \\(K,\\)"),
    ([[[0, 0, 2, 3]]], [[1]], "2 images but 1 box lists"),
])
def test_detection_errors(boxes, labels, match):
    images = [torch.zeros(3, 5, 7, dtype=torch.uint8)] * 2
    with pytest.raises(DataError, match=match):
        DenseDataset(images, [0, 0], 3, 1, task="detection", name="toy-det", boxes=boxes, box_labels=labels, ids=["p", "q"])


def test_select_dense_split_holds_out_per_group_and_label_cell():
    ds = seg(n=40, groups=torch.arange(40) % 2, labels=(torch.arange(40) // 2) % 2)
    train, val = select_dense_split(ds, "train", 0.25), select_dense_split(ds, "val", 0.25)
    assert len(train) + len(val) == 40 and set(train.ids).isdisjoint(val.ids)
    assert val.cell_counts().tolist() == [[3, 3], [3, 3]]  # round(0.25 * 10) of each 10-image cell
    assert select_dense_split(ds, "train", 0.0) is ds
    with pytest.raises(DataError, match="val_fraction"):
        select_dense_split(ds, "val", 0.0)


def test_for_epoch_resample_and_its_checks():
    base = seg(labels=[0, 1] * 3)

    def fresh(epoch):
        return DenseDataset(base.images.flip(-1) if epoch else base.images, base.groups, 4, 2, task="segmentation",
                            name="toy-seg", masks=base.masks, labels=base.labels)

    ds = DenseDataset(base.images, base.groups, 4, 2, task="segmentation", name="toy-seg", masks=base.masks,
                      labels=base.labels, resample=fresh)
    assert base.for_epoch(3) is base
    assert torch.equal(ds.for_epoch(2).images, base.images.flip(-1))
    # a subset resamples the same positions
    assert torch.equal(ds.subset([5, 0]).for_epoch(1).images, base.images.flip(-1)[[5, 0]])
    bad = DenseDataset(base.images, base.groups, 4, 2, task="segmentation", name="toy-seg", masks=base.masks,
                       resample=lambda e: base.subset([0, 1]))
    with pytest.raises(DataError, match="resample\\(1\\) changed"):
        bad.for_epoch(1)
