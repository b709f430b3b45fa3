"""VOC AP (07 11-point and area), per-group AP and recall-DEO, COCO mAP (optional extra).

Pinned against hand-computed cases (duplicates, difficult boxes, classes without ground truth,
the strict IoU threshold, pooled vs per-group AP) and an independent py-faster-rcnn-style loop.
"""
import math
import sys

import numpy as np
import pytest
import torch

from fairdistill.errors import DataError
from fairdistill.metrics import average_precision, coco_map, detection_fairness, voc_ap

A, B, C_BOX = [0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]


def det(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "scores": torch.tensor(scores),
            "labels": torch.tensor(labels, dtype=torch.long)}


def gt(boxes, labels, difficult=None):
    d = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels, dtype=torch.long)}
    if difficult is not None:
        d["difficult"] = torch.tensor(difficult, dtype=torch.bool)
    return d


def duplicate_case():
    # TP on A (0.9), a second detection of A (0.8: FP), TP on B (0.7)
    # recall [.5, .5, 1], precision [1, .5, 2/3]
    return [det([A, [1, 0, 11, 10], B], [0.9, 0.8, 0.7], [1, 1, 1])], [gt([A, B], [1, 1])]


def test_duplicate_detection_11_point_and_area():
    d, g = duplicate_case()
    # 11-point: t = 0..0.5 -> 1 (6 points), t = 0.6..1 -> 2/3 (5 points)
    assert voc_ap(d, g)["ap"] == pytest.approx([(6 + 5 * 2 / 3) / 11])
    # area: 0.5 * 1 + 0.5 * 2/3
    r = voc_ap(d, g, use_07_metric=False)
    assert r["ap"] == pytest.approx([5 / 6]) and r["map"] == pytest.approx(5 / 6)


def test_difficult_boxes_count_neither_way():
    d, g = duplicate_case()
    # a difficult box C, detected twice (0.95 and 0.6), and never counted in npos
    d[0] = det([C_BOX] + d[0]["boxes"].tolist() + [C_BOX], [0.95, 0.9, 0.8, 0.7, 0.6], [1, 1, 1, 1, 1])
    g[0] = gt([A, B, C_BOX], [1, 1, 1], [False, False, True])
    assert voc_ap(d, g, use_07_metric=False)["ap"] == pytest.approx([5 / 6])
    # an undetected difficult box does not lower recall; an undetected normal box does
    d2, g2 = duplicate_case()
    g2[0] = gt([A, B, C_BOX], [1, 1, 1], [False, False, True])
    assert voc_ap(d2, g2, use_07_metric=False)["ap"] == pytest.approx([5 / 6])
    g2[0] = gt([A, B, C_BOX], [1, 1, 1], [False, False, False])
    # recall [1/3, 1/3, 2/3], precision [1, 1/2, 2/3] -> 1/3 * 1 + 1/3 * 2/3
    assert voc_ap(d2, g2, use_07_metric=False)["ap"] == pytest.approx([1 / 3 + 2 / 9])


def test_classes_without_ground_truth_are_nan_and_left_out():
    d = [det([A, B], [0.9, 0.8], [1, 2])]
    g = [gt([A, C_BOX], [1, 4])]
    r = voc_ap(d, g, num_classes=5)
    # class 1: perfect; class 2: detections but no gt -> NaN; class 3 and 5: nothing -> NaN;
    # class 4: a gt never detected -> AP 0, counted in the mean
    assert r["ap"][0] == 1.0 and r["ap"][3] == 0.0
    assert all(math.isnan(r["ap"][i]) for i in (1, 2, 4))
    assert r["map"] == pytest.approx(0.5)
    assert len(voc_ap(d, g)["ap"]) == 4  # inferred: the largest label
    only_difficult = voc_ap([det([A], [0.9], [1])], [gt([A], [1], [True])])
    assert math.isnan(only_difficult["ap"][0]) and math.isnan(only_difficult["map"])


def test_iou_threshold_is_strict_and_class_must_match():
    half = [0, 0, 10, 20]  # IoU with A = 100 / 200 = 0.5 exactly
    assert voc_ap([det([half], [0.9], [1])], [gt([A], [1])])["ap"] == [0.0]
    assert voc_ap([det([half], [0.9], [1])], [gt([A], [1])], iou_threshold=0.49)["ap"] == [1.0]
    r = voc_ap([det([A], [0.9], [2])], [gt([A], [1])], num_classes=2)
    assert r["ap"][0] == 0.0 and math.isnan(r["ap"][1])


def test_detection_matches_best_iou_box_even_if_taken():
    # the second detection's best box (A) is taken: VOC calls it a FP although B' is free
    near_a = [0, 0, 10, 12]   # IoU with A 100/120, with A2 = [0, 2, 10, 12] 80/120
    a2 = [0, 2, 10, 12]
    d = [det([A, near_a], [0.9, 0.8], [1, 1])]
    g = [gt([A, a2], [1, 1])]
    # recall [.5, .5], precision [1, .5] -> area AP 0.5
    assert voc_ap(d, g, use_07_metric=False)["ap"] == pytest.approx([0.5])


def test_average_precision_formulas():
    rec, prec = torch.tensor([0.3, 0.6]), torch.tensor([1.0, 0.5])
    # 11-point: t <= 0.3 -> 1 (4 points), 0.4..0.6 -> 0.5 (3 points), above -> 0
    assert average_precision(rec, prec, True) == pytest.approx((4 + 1.5) / 11)
    assert average_precision(rec, prec, False) == pytest.approx(0.3 + 0.3 * 0.5)
    assert average_precision(torch.zeros(0), torch.zeros(0), True) == 0.0


def group_case():
    # group 0: TP 0.9, FP 0.8 -> AP 1; group 1: TP 0.3, FP 0.2, one missed box -> AP 0.5
    d = [det([A, B], [0.9, 0.8], [1, 1]), det([A, B], [0.3, 0.2], [1, 1])]
    g = [gt([A], [1]), gt([A, C_BOX], [1, 1])]
    return d, g, [0, 1]


def test_per_group_ap_is_not_the_pooled_ap():
    d, g, groups = group_case()
    m = detection_fairness(d, g, groups, num_classes=1, use_07_metric=False)
    assert m["map_by_group"] == pytest.approx([1.0, 0.5]) and m["ap_by_group"] == [[1.0], [0.5]]
    # pooled ranking .9 TP, .8 FP, .3 TP, .2 FP over npos 3: 1/3 * 1 + 1/3 * 2/3
    assert m["map"] == pytest.approx(1 / 3 + 2 / 9) and m["ap"] == pytest.approx([1 / 3 + 2 / 9])
    assert m["map"] == pytest.approx(voc_ap(d, g, use_07_metric=False)["map"])
    assert m["ap_gap"] == pytest.approx([0.5]) and m["ap_gap_a"] == pytest.approx(0.5) and m["map_gap"] == pytest.approx(0.5)
    # recall at score >= 0.5: group 0 finds 1/1, group 1 none of 2 (its TP scores 0.3)
    assert m["recall_by_group"] == [[1.0], [0.0]] and m["deo_a"] == 1.0 and m["deo_m"] == 1.0
    assert m["cell_count"] == [[1], [2]] and m["excluded_cells"] == []
    assert detection_fairness(d, g, groups, 1, score_threshold=0.25)["recall_by_group"] == [[1.0], [0.5]]


def test_pooled_map_below_both_groups():
    # dense.md §5: scores on different scales per group interleave in the pooled ranking
    d = [det([A, B], [0.9, 0.8], [1, 1]), det([A, B], [0.3, 0.2], [1, 1])]
    g = [gt([A], [1]), gt([A], [1])]
    m = detection_fairness(d, g, [0, 1], 1, use_07_metric=False)
    assert m["map_by_group"] == [1.0, 1.0] and m["map"] == pytest.approx(5 / 6)


def test_group_without_a_class_is_excluded():
    d = [det([A], [0.9], [1]), det([B], [0.9], [2])]
    g = [gt([A], [1]), gt([B], [2])]
    m = detection_fairness(d, g, [0, 1], 2)
    assert m["excluded_cells"] == [[0, 1], [1, 0]]
    assert all(math.isnan(v) for v in m["ap_gap"] + m["deo_gap"]) and math.isnan(m["ap_gap_a"])
    assert m["map_by_group"] == [1.0, 1.0]


def test_bad_input_is_a_data_error():
    with pytest.raises(DataError, match="one entry per image"):
        voc_ap([det([A], [0.9], [1])], [])
    with pytest.raises(DataError, match="has no 'scores'"):
        voc_ap([{"boxes": [A], "labels": [1]}], [gt([A], [1])])
    with pytest.raises(DataError, match="labels must lie in 1..2"):
        voc_ap([det([A], [0.9], [0])], [gt([A], [1])], num_classes=2)
    with pytest.raises(DataError, match=r"shape \(N, 4\)"):
        voc_ap([det([A], [0.9], [1])], [{"boxes": [[0, 0, 1]], "labels": [1]}])
    with pytest.raises(DataError, match="differ in length"):
        voc_ap([det([A, B], [0.9], [1, 1])], [gt([A], [1])])
    with pytest.raises(DataError, match="no image"):
        voc_ap([], [], num_classes=2)
    with pytest.raises(DataError, match="groups must"):
        detection_fairness([det([A], [0.9], [1])], [gt([A], [1])], [0, 1], 1)


# ----------------------------------------------------------------------------- independent reference


def reference_voc(dets, gts, C, thr, use_07):
    """py-faster-rcnn voc_eval, written as a loop over ranked detections (no +1, IoU > thr)."""
    aps = []
    for c in range(1, C + 1):
        recs, npos = {}, 0
        for i, t in enumerate(gts):
            keep = [j for j, lab in enumerate(t["labels"]) if lab == c]
            recs[i] = {"bbox": [t["boxes"][j] for j in keep], "difficult": [t["difficult"][j] for j in keep],
                       "det": [False] * len(keep)}
            npos += sum(not x for x in recs[i]["difficult"])
        cand = [(i, s, b) for i, d in enumerate(dets) for b, s, lab in zip(d["boxes"], d["scores"], d["labels"]) if lab == c]
        cand = [cand[k] for k in np.argsort([-s for _, s, _ in cand], kind="stable")]
        tp, fp = np.zeros(len(cand)), np.zeros(len(cand))
        for k, (i, _, bb) in enumerate(cand):
            r, ovmax, jmax = recs[i], -np.inf, -1
            for j, g in enumerate(r["bbox"]):
                iw = max(min(bb[2], g[2]) - max(bb[0], g[0]), 0.0)
                ih = max(min(bb[3], g[3]) - max(bb[1], g[1]), 0.0)
                inter = iw * ih
                ov = inter / ((bb[2] - bb[0]) * (bb[3] - bb[1]) + (g[2] - g[0]) * (g[3] - g[1]) - inter)
                if ov > ovmax:
                    ovmax, jmax = ov, j
            if ovmax > thr:
                if not r["difficult"][jmax]:
                    if not r["det"][jmax]:
                        tp[k], r["det"][jmax] = 1, True
                    else:
                        fp[k] = 1
            else:
                fp[k] = 1
        if npos == 0:
            aps.append(float("nan"))
            continue
        fp, tp = np.cumsum(fp), np.cumsum(tp)
        rec, prec = tp / npos, tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        if use_07:
            ap = sum((np.max(prec[rec >= k / 10]) if np.sum(rec >= k / 10) else 0.0) for k in range(11)) / 11
        else:
            mrec, mpre = np.concatenate(([0.0], rec, [1.0])), np.concatenate(([0.0], prec, [0.0]))
            for k in range(len(mpre) - 1, 0, -1):
                mpre[k - 1] = max(mpre[k - 1], mpre[k])
            idx = np.where(mrec[1:] != mrec[:-1])[0]
            ap = np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1])
        aps.append(float(ap))
    return aps


def random_case(rng, n_images, C):
    dets, gts = [], []
    for _ in range(n_images):
        m = int(rng.integers(0, 5))
        xy = rng.uniform(0, 80, (m, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(5, 30, (m, 2))], 1)
        labels = rng.integers(1, C + 1, m)
        gts.append({"boxes": boxes.tolist(), "labels": labels.tolist(), "difficult": (rng.random(m) < 0.2).tolist()})
        # jittered copies of the boxes (some twice, some with a wrong label) plus random boxes
        src = rng.integers(0, m, int(rng.integers(0, 2 * m + 1))) if m else np.zeros(0, int)
        jit = boxes[src] + rng.normal(0, 3, (len(src), 4)) if m else np.zeros((0, 4))
        lab = np.where(rng.random(len(src)) < 0.85, labels[src] if m else 0, rng.integers(1, C + 1, len(src)))
        k = int(rng.integers(0, 4))
        xy = rng.uniform(0, 80, (k, 2))
        noise = np.concatenate([xy, xy + rng.uniform(5, 30, (k, 2))], 1)
        b = np.concatenate([jit, noise]).reshape(-1, 4)
        b[:, 2:] = np.maximum(b[:, 2:], b[:, :2] + 1)
        dets.append({"boxes": b.tolist(), "scores": rng.random(len(b)).tolist(),
                     "labels": np.concatenate([lab, rng.integers(1, C + 1, k)]).astype(int).tolist()})
    return dets, gts


@pytest.mark.parametrize("seed,C,thr,use_07", [(0, 1, 0.5, True), (1, 3, 0.5, False), (2, 5, 0.5, True), (3, 4, 0.7, False)])
def test_random_against_py_faster_rcnn_loop(seed, C, thr, use_07):
    rng = np.random.default_rng(seed)
    dets, gts = random_case(rng, 40, C)
    ref = reference_voc(dets, gts, C, thr, use_07)
    r = voc_ap(dets, gts, iou_threshold=thr, use_07_metric=use_07, num_classes=C)
    np.testing.assert_allclose(r["ap"], ref, rtol=1e-12, atol=1e-12)
    assert r["map"] == pytest.approx(np.nanmean(ref))
    groups = rng.integers(0, 3, len(dets))
    m = detection_fairness(dets, gts, groups, C, iou_threshold=thr, use_07_metric=use_07)
    for g in range(3):
        sel = [i for i in range(len(dets)) if groups[i] == g]
        np.testing.assert_allclose(m["ap_by_group"][g], reference_voc([dets[i] for i in sel], [gts[i] for i in sel], C, thr, use_07))
    np.testing.assert_allclose(m["ap"], ref)


def test_ties_keep_image_order():
    # equal scores: the first image's detection ranks first, so its FP comes before the TP
    d = [det([B], [0.5], [1]), det([A], [0.5], [1])]
    g = [gt([C_BOX], [1]), gt([A], [1])]
    # npos 2; ranking FP, TP: recall [0, 1/2], precision [0, 1/2] -> area 1/4
    assert voc_ap(d, g, use_07_metric=False)["ap"] == pytest.approx([0.25])
    # reversed image order: TP, FP: recall [1/2, 1/2], precision [1, 1/2] -> area 1/2
    assert voc_ap(d[::-1], g[::-1], use_07_metric=False)["ap"] == pytest.approx([0.5])


# ----------------------------------------------------------------------------- COCO (optional extra)


def test_coco_map_through_faster_coco_eval():
    pytest.importorskip("faster_coco_eval")
    # one 10 x 10 box found with IoU 0.62: matched at IoU thresholds 0.50, 0.55, 0.60 of ten
    d = [det([[0, 0, 10, 6.2]], [0.9], [1])]
    g = [gt([A], [1])]
    r = coco_map(d, g)
    assert r["map"] == pytest.approx(0.3) and r["map_50"] == pytest.approx(1.0) and r["map_75"] == 0.0
    assert r["map_small"] == pytest.approx(0.3) and math.isnan(r["map_large"])
    assert coco_map([det([], [], [])], g)["map_50"] == 0.0  # no detections at all
    d, g = duplicate_case()
    assert coco_map(d, g)["map_50"] == pytest.approx(voc_ap(d, g, use_07_metric=False)["map"], abs=0.01)


def test_coco_map_names_the_extra_when_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)
    with pytest.raises(ImportError, match="faster-coco-eval.*coco"):
        coco_map(*duplicate_case())
