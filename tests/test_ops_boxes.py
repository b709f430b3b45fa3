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
