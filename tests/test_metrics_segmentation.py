"""Segmentation metrics: per-group confusion, mIoU (official nanmean), recall-DEO and IoU gaps.

Pinned against hand-computed values, a per-pixel plain-Python reference and (optionally)
torchmetrics' MulticlassJaccardIndex.
"""
import math

import numpy as np
import pytest
import torch

from fairdistill.errors import DataError
from fairdistill.metrics import segmentation_counts, segmentation_metrics, segmentation_metrics_from_counts

NAN = float("nan")


def hand_case():
    target = torch.tensor([[[0, 0, 1], [1, 2, 255]], [[0, 0, 0], [2, 2, 2]]])
    pred = torch.tensor([[[0, 1, 1], [1, 2, 0]], [[0, 0, 2], [2, 2, 0]]])
    return pred, target, torch.tensor([0, 1])


def test_hand_computed():
    m = segmentation_metrics(*hand_case(), num_classes=3, num_groups=2)
    # pooled: class 0 TP 3 / union 6, class 1 TP 2 / union 3, class 2 TP 3 / union 5
    np.testing.assert_allclose(m["iou"], [0.5, 2 / 3, 0.6])
    assert m["miou"] == pytest.approx((0.5 + 2 / 3 + 0.6) / 3)
    assert m["pixel_accuracy"] == pytest.approx(8 / 11)  # the void pixel is not counted
    np.testing.assert_allclose(m["iou_by_group"], [[0.5, 2 / 3, 1.0], [0.5, NAN, 0.5]])
    np.testing.assert_allclose(m["recall_by_group"], [[0.5, 1.0, 1.0], [2 / 3, NAN, 2 / 3]])
    np.testing.assert_allclose(m["miou_by_group"], [13 / 18, 0.5])
    assert m["miou_gap"] == pytest.approx(2 / 9)
    np.testing.assert_allclose(m["pixel_accuracy_by_group"], [4 / 5, 4 / 6])
    assert m["cell_count"] == [[2, 2, 1], [3, 0, 3]] and m["excluded_cells"] == [[1, 1]]
    np.testing.assert_allclose(m["deo_gap"], [1 / 6, NAN, 1 / 3])
    assert m["deo_a"] == pytest.approx(0.25) and m["deo_m"] == pytest.approx(1 / 3)
    np.testing.assert_allclose(m["iou_gap"], [0.0, NAN, 0.5])
    assert m["iou_gap_a"] == pytest.approx(0.25) and m["iou_gap_m"] == pytest.approx(0.5)
    assert m["gaps_include_background"] is True


def test_background_left_out_of_gaps_only():
    m = segmentation_metrics(*hand_case(), num_classes=3, num_groups=2, include_background=False)
    assert math.isnan(m["deo_gap"][0]) and math.isnan(m["iou_gap"][0])
    assert m["deo_a"] == pytest.approx(1 / 3) and m["iou_gap_a"] == pytest.approx(0.5)
    assert m["miou"] == pytest.approx((0.5 + 2 / 3 + 0.6) / 3)  # mIoU keeps the background
    assert m["gaps_include_background"] is False


def reference(pred, target, groups, C, G):
    """Per-pixel loops: TP, FP, FN of each (group, class) and of the pool, no confusion matrix."""
    tp, fp, fn = np.zeros((G, C)), np.zeros((G, C)), np.zeros((G, C))
    correct, counted = np.zeros(G), np.zeros(G)
    for b in range(pred.shape[0]):
        g = int(groups[b])
        for t, p in zip(target[b].reshape(-1).tolist(), pred[b].reshape(-1).tolist()):
            if not 0 <= t < C:
                continue
            counted[g] += 1
            if t == p:
                tp[g, t] += 1
                correct[g] += 1
            else:
                fn[g, t] += 1
                fp[g, p] += 1

    def div(a, b):
        return a / b if b else NAN

    iou = [div(tp[:, c].sum(), tp[:, c].sum() + fp[:, c].sum() + fn[:, c].sum()) for c in range(C)]
    iou_g = [[div(tp[g, c], tp[g, c] + fp[g, c] + fn[g, c]) for c in range(C)] for g in range(G)]
    rec_g = [[div(tp[g, c], tp[g, c] + fn[g, c]) for c in range(C)] for g in range(G)]

    def gaps(r):
        out = []
        for c in range(C):
            vals = [r[g][c] for g in range(G) if tp[g, c] + fn[g, c] > 0]
            out.append(max(vals) - min(vals) if len(vals) >= 2 else NAN)
        return out

    def nanmean(v):
        v = [x for x in v if not math.isnan(x)]
        return sum(v) / len(v) if v else NAN

    return {"iou": iou, "miou": nanmean(iou), "iou_by_group": iou_g, "recall_by_group": rec_g,
            "miou_by_group": [nanmean(r) for r in iou_g], "pixel_accuracy": correct.sum() / counted.sum(),
            "deo_gap": gaps(rec_g), "iou_gap": gaps(iou_g)}


@pytest.mark.parametrize("C,G,seed", [(2, 2, 0), (5, 3, 1), (21, 2, 2)])
def test_random_against_per_pixel_reference(C, G, seed):
    rng = np.random.default_rng(seed)
    B, H, W = 6, 9, 7
    target = rng.integers(0, C, (B, H, W))
    target[rng.random((B, H, W)) < 0.15] = 255
    target[rng.random((B, H, W)) < 0.03] = C  # out of [0, C): dropped like void
    pred = np.where(rng.random((B, H, W)) < 0.6, np.clip(target, 0, C - 1), rng.integers(0, C, (B, H, W)))
    groups = rng.integers(0, G, B)
    groups[:G] = np.arange(G)
    m = segmentation_metrics(torch.tensor(pred), torch.tensor(target, dtype=torch.uint8 if C < 255 else torch.long),
                             torch.tensor(groups), C, G)
    ref = reference(pred, target, groups, C, G)
    for key, value in ref.items():
        np.testing.assert_allclose(np.array(m[key], dtype=float), np.array(value, dtype=float), err_msg=key)
    kept = lambda v: [x for x in v if not math.isnan(x)]  # noqa: E731
    assert m["deo_a"] == pytest.approx(np.mean(kept(ref["deo_gap"])))
    assert m["deo_m"] == pytest.approx(np.max(kept(ref["deo_gap"])))
    assert m["iou_gap_a"] == pytest.approx(np.mean(kept(ref["iou_gap"])))
    assert m["iou_gap_m"] == pytest.approx(np.max(kept(ref["iou_gap"])))


def test_counts_add_up_and_void_is_ignored():
    rng = np.random.default_rng(5)
    C, G = 4, 2
    target = torch.tensor(rng.integers(0, C, (8, 5, 5)))
    target[:, 0] = 255
    pred = torch.tensor(rng.integers(0, C, (8, 5, 5)))
    groups = torch.tensor(rng.integers(0, G, 8))
    whole = segmentation_counts(pred, target, groups, C, G)
    assert whole.dtype == torch.int64 and whole.shape == (G, C, C) and int(whole.sum()) == 8 * 4 * 5
    halves = segmentation_counts(pred[:3], target[:3], groups[:3], C, G) + segmentation_counts(pred[3:], target[3:], groups[3:], C, G)
    assert torch.equal(whole, halves)
    other = pred.clone()
    other[:, 0] = (other[:, 0] + 1) % C  # predictions on void pixels change nothing
    assert torch.equal(segmentation_counts(other, target, groups, C, G), whole)
    assert segmentation_metrics_from_counts(whole) == segmentation_metrics_from_counts(halves)


def test_empty_union_is_nan_and_perfect_is_fair():
    target = torch.zeros(2, 4, 4, dtype=torch.long)
    target[:, :2] = 1
    m = segmentation_metrics(target, target, torch.tensor([0, 1]), num_classes=3, num_groups=2)
    assert m["iou"][:2] == [1.0, 1.0] and math.isnan(m["iou"][2]) and m["miou"] == 1.0
    assert m["deo_a"] == 0.0 and m["iou_gap_m"] == 0.0 and m["miou_gap"] == 0.0


def test_bad_input_is_a_data_error():
    t = torch.zeros(2, 3, 3, dtype=torch.long)
    with pytest.raises(DataError, match="one shape"):
        segmentation_counts(t[:, :2], t, torch.tensor([0, 0]), 2, 1)
    with pytest.raises(DataError, match="one entry per image"):
        segmentation_counts(t, t, torch.tensor([0]), 2, 1)
    with pytest.raises(DataError, match="groups must lie in"):
        segmentation_counts(t, t, torch.tensor([0, 3]), 2, 2)
    with pytest.raises(DataError, match="predictions must lie in"):
        segmentation_counts(t + 2, t, torch.tensor([0, 0]), 2, 1)
    with pytest.raises(DataError, match="integer class indices"):
        segmentation_counts(t.float(), t, torch.tensor([0, 0]), 2, 1)


def test_against_torchmetrics_jaccard():
    try:
        from torchmetrics.classification import MulticlassJaccardIndex
    except Exception as e:  # missing, or broken by an incompatible torchvision (reference/dense.md §3.2)
        pytest.skip(f"torchmetrics not importable: {e}")
    rng = np.random.default_rng(7)
    C, G = 6, 2
    target = torch.tensor(rng.integers(0, C, (6, 16, 16)))
    target[torch.tensor(rng.random((6, 16, 16)) < 0.1)] = 255
    pred = torch.where(torch.tensor(rng.random((6, 16, 16)) < 0.5), target.clamp(max=C - 1),
                       torch.tensor(rng.integers(0, C, (6, 16, 16))))
    groups = torch.tensor([0, 1, 0, 1, 0, 1])
    m = segmentation_metrics(pred, target, groups, C, G)
    jac = MulticlassJaccardIndex(num_classes=C, ignore_index=255, average="none")
    np.testing.assert_allclose(m["iou"], jac(pred, target).numpy(), rtol=1e-6)
    for g in range(G):
        sel = groups == g
        np.testing.assert_allclose(m["iou_by_group"][g], jac(pred[sel], target[sel]).numpy(), rtol=1e-6)
