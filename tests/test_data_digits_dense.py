"""digits-s-seg / digits-s-det: mask, void and box rules on hand-made canvases, rendering (gray =
luma of colour = 0.3 + 0.4 d), skew counts, the test protocol, determinism, resampling, options."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fairdistill.data import build_dataset
from fairdistill.data.cifar import luma
from fairdistill.data.dense import VOID
from fairdistill.data.dense_loader import DenseBatchLoader
from fairdistill.data.digits import channel_stats
from fairdistill.data.digits_dense import canvases, digit_pools, digits_s_seg, render, training_canvases
from fairdistill.errors import ConfigError, DataError

SMALL = dict(train_canvases=200, test_canvases=30)


@pytest.fixture(scope="module")
def seg_train():
    return build_dataset("digits-s-seg", split="train", seed=0, **SMALL)


@pytest.fixture(scope="module")
def seg_test():
    return build_dataset("digits-s-seg", split="test", **SMALL)


def hand_layout():
    """Two digits on a 32x32 canvas: a bright 4x4 block (class 3) and a ramp (class 7)."""
    block = torch.zeros(8, 8, dtype=torch.float64)
    block[2:6, 2:6] = 1.0
    ramp = torch.linspace(0, 1, 8, dtype=torch.float64).repeat(8, 1)
    digits, labels = torch.stack([block, ramp]), torch.tensor([3, 7])
    placed = [(0, 16, 2, 1), (1, 10, 20, 18)]  # (digit, side, top, left)
    hues = np.array([0.3, 1.9, 4.0])
    noise = np.random.default_rng(0).standard_normal((32, 32)).astype(np.float32)
    return [(placed, hues, noise)], digits, labels


def reference_canvas(layout, digits, labels, size, noise):
    """Mask, boxes and intensity of the hand-made canvas from the rules, pixel by pixel."""
    placed, _, eps = layout[0]
    d = np.zeros((size, size))
    mask = np.zeros((size, size), dtype=np.uint8)
    boxes, box_labels = [], []
    for digit, side, top, left in placed:
        up = F.interpolate(digits[digit][None, None], (side, side), mode="bilinear", align_corners=False)[0, 0].numpy()
        c = int(labels[digit])
        for y in range(side):
            for x in range(side):
                v = up[y, x]
                d[top + y, left + x] = v
                mask[top + y, left + x] = c + 1 if v > 0.5 else VOID if v > 0.2 else 0
        ys, xs = np.nonzero(up > 0.2)
        boxes.append([left + xs.min(), top + ys.min(), left + xs.max() + 1, top + ys.max() + 1])
        box_labels.append(c + 1)
    return mask, np.array(boxes, dtype=np.float32), box_labels, np.clip(d + noise * eps, 0, 1)


@pytest.mark.parametrize("noise", [0.0, 0.05])
def test_masks_void_and_boxes_follow_the_rules(noise):
    layout, digits, labels = hand_layout()
    mask, boxes, box_labels, d_noisy = reference_canvas(layout, digits, labels, 32, noise)
    colour, masks, got_boxes, got_labels = render(layout, digits, labels, 32, noise)
    assert torch.equal(masks[0], torch.from_numpy(mask))
    assert {0, 4, 8, VOID} == set(masks[0].unique().tolist())  # classes 3 and 7 -> labels 4 and 8
    assert torch.equal(got_boxes[0], torch.from_numpy(boxes)) and got_labels[0].tolist() == box_labels
    # the block's box: bilinear 8 -> 16 of rows 2..5 exceeds 0.2 on rows 3..12 of the square
    assert got_boxes[0][0].tolist() == [1 + 3, 2 + 3, 1 + 13, 2 + 13]
    # rendering: luma of the colour canvas is Y = 0.3 + 0.4 d' up to uint8 rounding
    y = luma(colour)[0, 0].double() / 255
    assert (y - (0.3 + 0.4 * torch.from_numpy(d_noisy))).abs().max() <= 1.0 / 255 + 1e-9
    # the two digits and the background carry different hues (chroma != 0 there)
    chroma = colour[0].double() / 255 - y
    assert chroma[:, 0, 0].abs().max() > 0.05 and not torch.allclose(chroma[:, 10, 9], chroma[:, 25, 23], atol=0.05)


def test_sizes_halves_and_test_protocol(seg_train, seg_test):
    assert len(seg_train) == 200 and seg_train.image_shape == (3, 64, 64) and seg_train.num_classes == 11
    assert seg_train.num_labels == 2 and seg_train.class_names[0] == "background" and seg_train.group_names == ["gray", "color"]
    n = 30
    assert len(seg_test) == 2 * n and seg_test.groups.tolist() == [0] * n + [1] * n
    assert torch.equal(seg_test.images[:n], luma(seg_test.images[n:]))  # gray = luma of the same colour canvas
    assert torch.equal(seg_test.masks[:n], seg_test.masks[n:]) and torch.equal(seg_test.labels[:n], seg_test.labels[n:])
    assert not torch.equal(seg_test.images[n:], luma(seg_test.images[n:]))
    for ds in (seg_train, seg_test):  # every digit of a canvas is from its half
        for m, half in zip(ds.masks, ds.labels.tolist()):
            classes = set(m.unique().tolist()) - {0, VOID}
            assert classes and classes <= set(range(1 + 5 * half, 6 + 5 * half))


@pytest.mark.parametrize("skew", [0.95, 0.8, 0.5])
def test_skew_counts_per_half(skew):
    ds = build_dataset("digits-s-seg", split="train", seed=3, skew=skew, **SMALL)
    n = torch.bincount(ds.labels, minlength=2)
    k = [int(np.floor(int(c) * skew + 1e-9)) for c in n]
    assert ds.cell_counts().tolist() == [[k[0], int(n[1]) - k[1]], [int(n[0]) - k[0], k[1]]]
    gray = ds.images[ds.groups == 0]
    assert torch.equal(gray, luma(gray))  # group 0 is rendered gray


def test_determinism_and_seed_changes_only_the_groups(seg_train):
    a, b, fewer = canvases((2,), 50, False, 64, 0.05), canvases((2,), 50, False, 64, 0.05), canvases((2,), 30, False, 64, 0.05)
    assert (a[0] == b[0]).all() and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    assert all(torch.equal(x, y) for x, y in zip(a[3], b[3]))
    assert torch.equal(fewer[1], a[1][:30]) and torch.equal(fewer[2], a[2][:30])  # canvas i does not depend on the count
    other = build_dataset("digits-s-seg", split="train", seed=1, **SMALL)
    assert not torch.equal(other.groups, seg_train.groups) and torch.equal(other.labels, seg_train.labels)
    assert torch.equal(luma(other.images), luma(seg_train.images)) and torch.equal(other.masks, seg_train.masks)


def test_training_images_and_normalisation_come_from_both_renderings(seg_train, seg_test):
    _, colour, masks, _, _, (mean, std) = training_canvases(200, 64, 0.05)
    assert channel_stats(torch.cat([luma(colour), colour])) == (mean, std)
    assert seg_train.mean == seg_test.mean == mean and seg_train.std == std
    gray = seg_train.groups == 0
    assert torch.equal(seg_train.images[~gray], colour[~gray]) and torch.equal(seg_train.images[gray], luma(colour[gray]))
    assert torch.equal(seg_train.masks, masks)


def test_detection_boxes_agree_with_the_segmentation_masks():
    det = build_dataset("digits-s-det", split="test", **SMALL)
    seg = build_dataset("digits-s-seg", split="test", **SMALL)
    assert det.num_classes == 10 and det.class_names == [str(c) for c in range(10)] and torch.equal(det.images, seg.images)
    counts = [len(b) for b in det.boxes]
    assert min(counts) >= 1 and max(counts) <= 3
    for boxes, labels, mask in zip(det.boxes, det.box_labels, seg.masks):
        assert boxes.min() >= 0 and boxes.max() <= 64 and not det.difficult[0].any()
        covered = torch.zeros(64, 64, dtype=torch.long)
        for (x1, y1, x2, y2), c in zip(boxes.long().tolist(), labels.tolist()):
            assert covered[y1:y2, x1:x2].eq(0).all()  # boxes of one canvas do not overlap
            covered[y1:y2, x1:x2] = c
            inside = mask[y1:y2, x1:x2]
            assert set(inside.unique().tolist()) <= {0, c, VOID} and (inside == c).any()
            # tight: the box's outer rows and columns each hold a labelled (class or void) pixel
            edge = (inside != 0)
            assert edge[0].any() and edge[-1].any() and edge[:, 0].any() and edge[:, -1].any()
        labelled = (mask > 0)
        assert (covered[labelled] > 0).all()


def test_resampling_redraws_content_and_keeps_cells():
    ds = build_dataset("digits-s-seg", split="train", seed=0, resample_every_epoch=True, **SMALL)
    assert ds.for_epoch(0) is ds
    one, again, two = ds.for_epoch(1), ds.for_epoch(1), ds.for_epoch(2)
    assert torch.equal(one.images, again.images) and not torch.equal(one.images, ds.images)
    assert not torch.equal(one.masks, two.masks)
    assert torch.equal(one.groups, ds.groups) and torch.equal(one.labels, ds.labels)
    gray = one.images[one.groups == 0]
    assert torch.equal(gray, luma(gray))
    for m, half in zip(one.masks, one.labels.tolist()):
        assert set(m.unique().tolist()) - {0, VOID} <= set(range(1 + 5 * half, 6 + 5 * half))
    train = build_dataset("digits-s-seg", split="train", seed=0, resample_every_epoch=True, val_fraction=0.2, **SMALL)
    held = train.for_epoch(1)
    assert len(train) == 160 and torch.equal(held.groups, train.groups) and torch.equal(held.masks, one.masks[
        torch.tensor([int(i.split("-")[1]) for i in train.ids])])
    loader = DenseBatchLoader(ds, 16, sampler="balanced", augment={"train": True})
    x, y, g = next(loader.epoch(1))
    assert x.shape == (16, 3, 64, 64) and y.shape == (16, 64, 64)


@pytest.mark.parametrize("options,error,match", [
    ({"size": 16}, ConfigError, "size must be an integer >= 32"),
    ({"train_canvases": 0}, ConfigError, "train_canvases must be an integer >= 1"),
    ({"noise": -0.1}, ConfigError, "noise must be a number >= 0"),
    ({"skew": 1.5}, ConfigError, "skew must be a ratio"),
    ({"resample_every_epoch": "yes"}, ConfigError, "resample_every_epoch must be true or false"),
    ({"val_fraction": 0.0, "split": "val"}, DataError, "val_fraction"),
])
def test_option_errors(options, error, match):
    split = options.pop("split", "train")
    with pytest.raises(error, match=match) as err:
        digits_s_seg(split=split, **options)  # the builder's own checks, whatever the config layer checks first
    assert "digits-s-seg" in str(err.value)


def test_pools_are_digits_s_split():
    digits, labels, is_test = digit_pools()
    assert int(is_test.sum()) == 599 and digits.shape == (1797, 8, 8) and float(digits.max()) == 1.0
