"""SSD matching, box coding, MultiBox loss with hard-negative mining, and detect(), against hand
cases and independent per-image plain-Python computations."""
from __future__ import annotations

import math

import pytest
import torch

from fairdistill.errors import DataError
from fairdistill.models.priors import PriorConfig, prior_boxes
from fairdistill.ops.boxes import box_iou, cxcywh_to_xyxy
from fairdistill.ops.multibox import (decode, detect, encode, hard_negatives, match, match_targets,
                                      multibox_loss, multibox_loss_from_targets)

SMALL = PriorConfig(image_size=32, feature_maps=(4, 2), steps=(8, 16), min_sizes=(8, 16), max_sizes=(16, 24),
                    aspect_ratios=((2,), (2,)))  # 4*16 + 4*4 = 80 priors


def priors_of(*xyxy) -> torch.Tensor:
    """Priors (cx, cy, w, h) from corner boxes."""
    b = torch.tensor(xyxy, dtype=torch.float32)
    return torch.cat([(b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]], 1)


def random_targets(n_images: int, num_classes: int, seed: int, empty: tuple[int, ...] = ()) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_images):
        k = 0 if i in empty else int(torch.randint(1, 5, (1,), generator=g))
        lo = torch.rand(k, 2, generator=g) * 0.6
        hi = lo + 0.1 + torch.rand(k, 2, generator=g) * 0.3
        out.append({"boxes": torch.cat([lo, hi], 1), "labels": torch.randint(1, num_classes + 1, (k,), generator=g)})
    return out


# ---- matching ----------------------------------------------------------------------------------

def reference_match(truths, labels, priors, threshold=0.5):
    """ssd.pytorch's ``match`` written out with Python loops (later truths win a shared prior)."""
    iou = box_iou(truths, cxcywh_to_xyxy(priors)).tolist()
    k, p = len(iou), len(priors)
    best_truth = [max(range(k), key=lambda j: (iou[j][q], -j)) for q in range(p)]  # first on ties
    overlap = [iou[best_truth[q]][q] for q in range(p)]
    for j in range(k):
        q = max(range(p), key=lambda q: (iou[j][q], -q))
        overlap[q] = 2.0
        best_truth[q] = j
    truth = [best_truth[q] if overlap[q] >= threshold else -1 for q in range(p)]
    return truth, [int(labels[t]) if t >= 0 else 0 for t in truth]


def test_best_prior_is_forced_below_threshold():
    priors = priors_of([0, 0, 0.5, 0.5], [0.6, 0.6, 1.0, 1.0])
    truths = torch.tensor([[0.0, 0.0, 0.3, 0.2]])  # IoU with prior 0: 0.06 / 0.25 = 0.24
    truth, conf = match(truths, torch.tensor([3]), priors)
    assert truth.tolist() == [0, -1] and conf.tolist() == [3, 0]


def test_threshold_is_inclusive():
    priors = priors_of([0, 0, 1, 1], [0, 0, 1, 0.5], [0, 0, 1, 0.49])  # IoU 1, exactly 0.5, 0.49
    truth, conf = match(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([2]), priors)
    assert truth.tolist() == [0, 0, -1] and conf.tolist() == [2, 2, 0]
    truth, _ = match(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([2]), priors, threshold=0.51)
    assert truth.tolist() == [0, -1, -1]


def test_two_truths_competing_for_one_prior():
    # both truths have prior 0 as best (IoU 0.81 each); the later truth takes it, the earlier one
    # keeps only priors it reaches with IoU >= 0.5 (prior 1: 0.5625 / 0.81 = 0.69), as ssd.pytorch;
    # prior 2's best truth is B at 0.25 / 0.81 = 0.31 < 0.5: background
    priors = priors_of([0, 0, 1, 1], [0, 0, 0.9, 0.625], [0.5, 0.5, 1.0, 1.0])
    truths = torch.tensor([[0.0, 0.0, 0.9, 0.9], [0.1, 0.1, 1.0, 1.0]])
    truth, conf = match(truths, torch.tensor([1, 2]), priors)
    assert truth.tolist() == [1, 0, -1] and conf.tolist() == [2, 1, 0]
    assert (truth.tolist(), conf.tolist()) == reference_match(truths, torch.tensor([1, 2]), priors)


def test_no_truths_and_degenerate_truths():
    priors = prior_boxes(SMALL)
    truth, conf = match(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), priors)
    assert (truth == -1).all() and (conf == 0).all()
    # a zero-width box is ignored: the result equals matching without it
    truths = torch.tensor([[0.2, 0.2, 0.2, 0.6], [0.1, 0.1, 0.5, 0.4]])
    got = match(truths, torch.tensor([1, 2]), priors)
    want = match(truths[1:], torch.tensor([2]), priors)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0] >= 0, want[0] >= 0)


@pytest.mark.parametrize("seed", range(3))
def test_batched_matching_equals_the_per_image_reference(seed):
    priors = prior_boxes(SMALL)
    targets = random_targets(4, 5, seed, empty=(2,))
    loc_t, conf_t = match_targets(targets, priors, num_classes=5)
    for i, t in enumerate(targets):
        if len(t["labels"]) == 0:
            assert (conf_t[i] == 0).all() and (loc_t[i] == 0).all()
            continue
        truth, conf = reference_match(t["boxes"], t["labels"], priors)
        assert conf_t[i].tolist() == conf
        pos = torch.tensor(truth) >= 0
        want = encode(t["boxes"][torch.tensor(truth)[pos]], priors[pos])
        assert torch.allclose(loc_t[i][pos], want, atol=1e-5)
        assert (loc_t[i][~pos] == 0).all()


def test_target_errors_name_the_problem():
    priors = prior_boxes(SMALL)
    with pytest.raises(DataError, match="1..5"):
        match_targets([{"boxes": torch.tensor([[0.1, 0.1, 0.5, 0.5]]), "labels": torch.tensor([0])}], priors, 5)
    with pytest.raises(DataError, match="normalised"):
        match_targets([{"boxes": torch.tensor([[10.0, 10, 50, 50]]), "labels": torch.tensor([1])}], priors, 5)
    with pytest.raises(DataError, match="boxes"):
        match_targets([{"boxes": torch.zeros(2, 4)}], priors, 5)
    with pytest.raises(DataError, match=r"\(K, 4\)"):
        match_targets([{"boxes": torch.zeros(2, 5), "labels": torch.ones(2)}], priors, 5)


# ---- box coding --------------------------------------------------------------------------------

def test_encode_hand_value_and_round_trip():
    prior = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    box = torch.tensor([[0.4, 0.4, 0.8, 0.8]])  # centre 0.6, side 0.4
    # ((0.6 - 0.5) / (0.1 * 0.2), log(0.4 / 0.2) / 0.2)
    assert encode(box, prior)[0].tolist() == pytest.approx([5.0, 5.0, math.log(2) / 0.2, math.log(2) / 0.2], rel=1e-5)
    priors = prior_boxes(SMALL)
    loc = torch.randn(3, len(priors), 4, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(encode(decode(loc, priors), priors), loc, atol=1e-4)


# ---- loss --------------------------------------------------------------------------------------

def reference_loss(loc, conf, priors, targets, ratio=3):
    """Per image: reference matching, explicit smooth-L1, CE, and a sorted list of negatives."""
    total_l = total_c = 0.0
    npos_all = 0
    for i, t in enumerate(targets):
        p = len(priors)
        if len(t["labels"]):
            truth, labels = reference_match(t["boxes"], t["labels"], priors)
        else:
            truth, labels = [-1] * p, [0] * p
        logp = torch.log_softmax(conf[i].double(), -1)
        pos = [q for q in range(p) if labels[q] > 0]
        npos_all += len(pos)
        for q in pos:
            target = encode(t["boxes"][truth[q]][None].double(), priors[q:q + 1].double())[0]
            for d in (loc[i, q].double() - target).tolist():
                total_l += 0.5 * d * d if abs(d) < 1 else abs(d) - 0.5
            total_c -= float(logp[q, labels[q]])
        negatives = sorted((q for q in range(p) if labels[q] == 0), key=lambda q: float(logp[q, 0]))  # by decreasing -log p0
        for q in negatives[:min(ratio * len(pos), p - 1)]:
            total_c -= float(logp[q, 0])
    n = max(npos_all, 1)
    return total_l / n, total_c / n


@pytest.mark.parametrize("seed", range(3))
def test_loss_equals_the_plain_computation(seed):
    priors = prior_boxes(SMALL)
    g = torch.Generator().manual_seed(seed)
    targets = random_targets(4, 3, seed, empty=(1,))
    targets[3] = {"boxes": torch.rand(8, 2, generator=g).mul(0.5).repeat(1, 2) + torch.tensor([0, 0, 0.4, 0.4]),
                  "labels": torch.randint(1, 4, (8,), generator=g)}  # many positives: 3 * npos clamps
    loc = torch.randn(4, len(priors), 4, generator=g)
    conf = torch.randn(4, len(priors), 4, generator=g) * 2
    loss_l, loss_c = multibox_loss(loc, conf, priors, targets)
    ref_l, ref_c = reference_loss(loc, conf, priors, targets)
    assert loss_l.item() == pytest.approx(ref_l, rel=1e-5)
    assert loss_c.item() == pytest.approx(ref_c, rel=1e-5)


def test_hard_negatives_rank_and_clamp():
    background = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.3, 0.2], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    positive = torch.tensor([[True, False, False, False, False, False], [True, True, False, False, False, False]])
    neg = hard_negatives(background, positive)
    # image 0: 3 negatives, the largest background losses 0.9, 0.7, 0.5
    assert neg[0].tolist() == [False, True, True, True, False, False]
    # image 1: 3 * 2 = 6 clamped to P - 1 = 5, i.e. all 4 non-positives
    assert neg[1].tolist() == [False, False, True, True, True, True]
    assert not hard_negatives(background, torch.zeros_like(positive)).any()  # no positive, no negative


def test_images_without_boxes_add_nothing():
    priors = prior_boxes(SMALL)
    g = torch.Generator().manual_seed(5)
    loc = torch.randn(2, len(priors), 4, generator=g, requires_grad=True)
    conf = torch.randn(2, len(priors), 3, generator=g, requires_grad=True)
    one = random_targets(1, 2, 0)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    alone = multibox_loss(loc[:1], conf[:1], priors, one)
    both = multibox_loss(loc, conf, priors, one + [empty])
    assert both[0].item() == pytest.approx(alone[0].item()) and both[1].item() == pytest.approx(alone[1].item())
    zero_l, zero_c = multibox_loss(loc, conf, priors, [empty, empty])
    assert zero_l.item() == 0 and zero_c.item() == 0
    (zero_l + zero_c).backward()
    assert (loc.grad == 0).all() and (conf.grad == 0).all()


def test_loss_from_targets_gradients_touch_only_chosen_priors():
    priors = prior_boxes(SMALL)
    loc_t, conf_t = match_targets(random_targets(1, 2, 3), priors, 2)
    loc = torch.zeros(1, len(priors), 4, requires_grad=True)
    conf = torch.randn(1, len(priors), 3, generator=torch.Generator().manual_seed(1), requires_grad=True)
    loss_l, loss_c = multibox_loss_from_targets(loc, conf, loc_t, conf_t)
    (loss_l + loss_c).backward()
    pos = conf_t[0] > 0
    assert (loc.grad[0][~pos] == 0).all() and (loc.grad[0][pos] != 0).any()
    touched = (conf.grad[0] != 0).any(-1)
    assert int(touched.sum()) == min(4 * int(pos.sum()), len(priors))  # positives + 3:1 negatives


# ---- detect ------------------------------------------------------------------------------------

def test_detect_threshold_nms_and_classes():
    # priors 0 and 1 overlap with IoU 0.24 / 0.26 = 0.92
    priors = priors_of([0, 0, 0.5, 0.5], [0.02, 0, 0.52, 0.5], [0.5, 0.5, 1.0, 1.0])
    p = torch.tensor([[0.10, 0.80, 0.10],  # class 1 at 0.8 kept; class 2 at 0.1 suppressed by prior 1
                      [0.10, 0.70, 0.20],  # class 1 at 0.7 suppressed by prior 0; class 2 at 0.2 kept
                      [0.985, 0.006, 0.009]])  # below the threshold 0.01: nothing
    conf = p.log()[None]
    out = detect(torch.zeros(1, 3, 4), conf, priors)[0]
    assert out["labels"].tolist() == [1, 2]
    assert out["scores"].tolist() == pytest.approx([0.8, 0.2], rel=1e-5)
    assert torch.allclose(out["boxes"], torch.tensor([[0, 0, 0.5, 0.5], [0.02, 0, 0.52, 0.5]]))
    assert detect(torch.zeros(1, 3, 4), conf, priors, nms_threshold=0.95)[0]["labels"].tolist() == [1, 1, 2, 2]
    assert detect(torch.zeros(1, 3, 4), conf, priors, top_k=1)[0]["labels"].tolist() == [1]


def test_detect_clips_boxes():
    priors = torch.tensor([[0.9, 0.9, 0.4, 0.4]])
    conf = torch.tensor([[[0.0, 5.0]]])
    out = detect(torch.zeros(1, 1, 4), conf, priors)[0]
    assert torch.allclose(out["boxes"], torch.tensor([[0.7, 0.7, 1.0, 1.0]]))


def reference_detect(loc, conf, priors, thr, nms_thr, top_k, pre_k):
    from test_ops_boxes import greedy_reference

    out = []
    for i in range(loc.shape[0]):
        boxes = decode(loc[i], priors).clamp(0, 1)
        scores = conf[i].softmax(-1)
        found = []
        for c in range(1, conf.shape[-1]):
            s = scores[:, c]
            cand = sorted(range(len(s)), key=lambda q: -float(s[q]))[:pre_k]
            cand = torch.tensor([q for q in cand if s[q] > thr], dtype=torch.long)
            if len(cand) == 0:
                continue
            for j in greedy_reference(boxes[cand], s[cand], nms_thr):
                found.append((float(s[cand[j]]), c, int(cand[j])))
        out.append(sorted(found, reverse=True)[:top_k])
    return out


@pytest.mark.parametrize("pre_k", [None, 7])
def test_detect_equals_per_image_reference(pre_k):
    priors = prior_boxes(SMALL)
    g = torch.Generator().manual_seed(4)
    loc = torch.randn(3, len(priors), 4, generator=g) * 0.5
    conf = torch.randn(3, len(priors), 4, generator=g) * 2
    got = detect(loc, conf, priors, score_threshold=0.2, nms_threshold=0.45, top_k=12, pre_nms_top_k=pre_k)
    want = reference_detect(loc, conf, priors, 0.2, 0.45, 12, pre_k or len(priors))
    boxes = decode(loc, priors).clamp(0, 1)
    for i in range(3):
        assert got[i]["labels"].tolist() == [c for _, c, _ in want[i]]
        assert got[i]["scores"].tolist() == pytest.approx([s for s, _, _ in want[i]], rel=1e-6)
        assert torch.allclose(got[i]["boxes"], boxes[i][torch.tensor([q for _, _, q in want[i]], dtype=torch.long)])
    assert all(len(d["scores"]) == 12 for d in got)  # top_k binds on this input


def test_detect_no_candidates():
    priors = prior_boxes(SMALL)
    conf = torch.zeros(2, len(priors), 3)
    conf[..., 0] = 20  # every foreground score is about 2e-9
    out = detect(torch.zeros(2, len(priors), 4), conf, priors)
    assert [len(d["boxes"]) for d in out] == [0, 0] and out[0]["boxes"].shape == (0, 4)
