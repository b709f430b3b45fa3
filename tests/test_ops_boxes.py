"""Box IoU against hand-computed cases."""
import pytest
import torch

from fairdistill.ops.boxes import box_area, box_iou


def test_hand_computed_pairs():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 3.0, 4.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [5.0, 5.0, 6.0, 6.0], [0.0, 0.0, 2.0, 2.0]])
    iou = box_iou(a, b)
    # a0 ∩ b0 = 1x1 = 1, union 4 + 4 - 1 = 7; a1 ∩ b0 = 2x2 = 4, union 6 + 4 - 4 = 6
    # a1 ∩ b2 = [1,2]x[1,2] = 1, union 6 + 4 - 1 = 9
    expected = torch.tensor([[1 / 7, 0.0, 1.0], [4 / 6, 0.0, 1 / 9]])
    assert torch.allclose(iou, expected)
    assert box_area(a).tolist() == [4.0, 6.0]


def test_degenerate_and_empty():
    a = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    assert box_iou(a, a).item() == 0.0
    assert box_iou(torch.zeros(0, 4), a).shape == (0, 1)
    assert box_iou(a, torch.zeros(0, 4)).shape == (1, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_symmetric_and_bounded(dtype):
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(20, 2, generator=g, dtype=dtype) * 10
    boxes = torch.cat([xy, xy + torch.rand(20, 2, generator=g, dtype=dtype) * 5 + 0.1], 1)
    iou = box_iou(boxes, boxes)
    assert torch.allclose(iou, iou.T)
    assert torch.allclose(iou.diagonal(), torch.ones(20, dtype=dtype))
    assert (iou >= 0).all() and (iou <= 1).all()


# ---- batched IoU, conversions, NMS -------------------------------------------------------------

from fairdistill.ops import boxes as boxes_mod  # noqa: E402
from fairdistill.ops.boxes import batched_nms, cxcywh_to_xyxy, nms, xyxy_to_cxcywh  # noqa: E402


def random_boxes(n: int, seed: int, scale: float = 10.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * scale
    return torch.cat([xy, xy + torch.rand(n, 2, generator=g) * scale / 2 + 0.05], 1)


def greedy_reference(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> list[int]:
    """Textbook greedy NMS in plain Python: visit by decreasing score (ties: lower index first)."""
    b = boxes.tolist()

    def iou(p, q):
        iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
        ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
        inter = iw * ih
        union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
        return inter / union if union > 0 else 0.0

    kept: list[int] = []
    for i in sorted(range(len(b)), key=lambda k: (-float(scores[k]), k)):
        if all(iou(b[i], b[j]) <= threshold for j in kept):
            kept.append(i)
    return kept


def test_box_iou_broadcasts_over_a_batch():
    a, b = random_boxes(12, 1).view(3, 4, 4), random_boxes(15, 2).view(3, 5, 4)
    batched = box_iou(a, b)
    assert batched.shape == (3, 4, 5)
    for i in range(3):
        assert torch.allclose(batched[i], box_iou(a[i], b[i]))


def test_conversions_round_trip_and_hand_values():
    assert cxcywh_to_xyxy(torch.tensor([0.5, 0.4, 0.2, 0.6])).tolist() == pytest.approx([0.4, 0.1, 0.6, 0.7])
    assert xyxy_to_cxcywh(torch.tensor([1.0, 2.0, 4.0, 8.0])).tolist() == [2.5, 5.0, 3.0, 6.0]
    b = random_boxes(30, 3)
    assert torch.allclose(cxcywh_to_xyxy(xyxy_to_cxcywh(b)), b, atol=1e-6)


def test_nms_hand_made():
    boxes = torch.tensor([
        [0.0, 0.0, 10.0, 10.0],  # 0, score 0.9: kept
        [1.0, 0.0, 11.0, 10.0],  # 1: IoU with 0 = 90/110 = 0.818 -> suppressed
        [5.0, 0.0, 15.0, 10.0],  # 2: IoU with 0 = 50/150 = 0.333 -> kept at 0.5
        [20.0, 20.0, 30.0, 30.0],  # 3: disjoint, lowest score -> kept
    ])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.1])
    assert nms(boxes, scores, 0.5).tolist() == [0, 2, 3]
    # at 0.3 box 2 (IoU 1/3 > 0.3) goes as well
    assert nms(boxes, scores, 0.3).tolist() == [0, 3]
    # reversing the scores reverses who suppresses whom: 3, 2 kept; 1 vs 2: IoU 60/140 = 0.43 <= 0.5
    assert nms(boxes, scores.flip(0), 0.5).tolist() == [3, 2, 1]


def test_nms_suppression_chain_is_greedy_not_pairwise():
    # a chain 0 -> 1 -> 2: 0 suppresses 1, so 2 (overlapping only 1) survives
    boxes = torch.tensor([[0.0, 0, 10, 10], [4.0, 0, 14, 10], [8.0, 0, 18, 10]])
    scores = torch.tensor([3.0, 2.0, 1.0])
    assert nms(boxes, scores, 0.4).tolist() == [0, 2]


def test_nms_threshold_is_strict_and_empty_input():
    boxes = torch.tensor([[0.0, 0, 2, 1], [1.0, 0, 3, 1]])  # IoU exactly 1/3
    assert nms(boxes, torch.tensor([1.0, 0.5]), 1 / 3).tolist() == [0, 1]
    assert nms(boxes, torch.tensor([1.0, 0.5]), 0.33).tolist() == [0]
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).tolist() == []
    with pytest.raises(ValueError, match="boxes"):
        nms(torch.zeros(3, 5), torch.zeros(3), 0.5)


@pytest.mark.parametrize("seed", range(4))
def test_nms_matches_plain_greedy_on_random_boxes(seed):
    boxes = random_boxes(150, seed)
    scores = torch.rand(150, generator=torch.Generator().manual_seed(100 + seed))
    for t in (0.2, 0.45, 0.7):
        assert nms(boxes, scores, t).tolist() == greedy_reference(boxes, scores, t)


def test_nms_ties_keep_input_order():
    boxes = torch.tensor([[0.0, 0, 1, 1], [0.0, 0, 1, 1], [5.0, 5, 6, 6]])
    assert nms(boxes, torch.tensor([0.5, 0.5, 0.5]), 0.5).tolist() == [0, 2]


def test_batched_nms_equals_per_group_nms():
    boxes, g = random_boxes(200, 7), torch.Generator().manual_seed(8)
    scores = torch.rand(200, generator=g)
    idxs = torch.randint(0, 5, (200,), generator=g) * 3  # sparse group ids
    kept = batched_nms(boxes, scores, idxs, 0.4)
    expected = []
    for c in idxs.unique().tolist():
        members = torch.nonzero(idxs == c).flatten()
        expected += members[torch.tensor(greedy_reference(boxes[members], scores[members], 0.4))].tolist()
    assert sorted(kept.tolist()) == sorted(expected)
    assert (scores[kept][1:] <= scores[kept][:-1]).all()  # by decreasing score
    # identical boxes in different groups never suppress each other
    same = torch.tensor([[0.0, 0, 1, 1]] * 3)
    assert batched_nms(same, torch.tensor([0.3, 0.2, 0.1]), torch.tensor([0, 1, 0]), 0.5).tolist() == [0, 1]


def test_large_groups_and_chunks_match_the_reference(monkeypatch):
    boxes, scores = random_boxes(120, 11), torch.rand(120, generator=torch.Generator().manual_seed(12))
    idxs = torch.arange(120) % 3
    expected = batched_nms(boxes, scores, idxs, 0.3).tolist()
    monkeypatch.setattr(boxes_mod, "MATRIX_ENTRIES", 1600)  # groups of 40: chunks of one group
    assert batched_nms(boxes, scores, idxs, 0.3).tolist() == expected
    monkeypatch.setattr(boxes_mod, "MATRIX_ENTRIES", 900)  # side 30 < 40: the loop over kept boxes
    assert batched_nms(boxes, scores, idxs, 0.3).tolist() == expected
    assert nms(boxes, scores, 0.3).tolist() == greedy_reference(boxes, scores, 0.3)
    # a mix: one large group takes the loop, the small ones the matrix
    mixed = torch.where(torch.arange(120) < 60, 0, 1 + torch.arange(120) % 4)
    monkeypatch.setattr(boxes_mod, "MATRIX_ENTRIES", 2500)  # side 50: group 0 (60 boxes) loops
    got = batched_nms(boxes, scores, mixed, 0.3)
    monkeypatch.setattr(boxes_mod, "MATRIX_ENTRIES", 1 << 22)
    assert got.tolist() == batched_nms(boxes, scores, mixed, 0.3).tolist()
