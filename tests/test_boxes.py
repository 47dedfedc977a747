import math

import pytest
import torch

from libra.boxes import box_area, box_iof, box_iou, check_boxes, clip_boxes


def test_box_area_no_plus_one():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 5.0], [1.0, 1.0, 1.0, 3.0]])
    assert torch.equal(box_area(boxes), torch.tensor([50.0, 0.0]))


def test_box_iou_hand_case():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[5.0, 0.0, 15.0, 10.0], [20.0, 20.0, 30.0, 30.0], [0.0, 0.0, 10.0, 10.0]])
    iou = box_iou(a, b)
    assert iou.shape == (1, 3)
    torch.testing.assert_close(iou, torch.tensor([[50.0 / 150.0, 0.0, 1.0]]))


def test_box_iou_degenerate_boxes_give_zero_not_nan():
    a = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    iou = box_iou(a, a)
    assert torch.isfinite(iou).all() and iou.item() == 0.0


def test_box_iou_matches_torchvision():
    ops = pytest.importorskip("torchvision.ops")
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(40, 2, generator=gen) * 50
    wh = torch.rand(40, 2, generator=gen) * 30 + 0.5
    boxes = torch.cat([xy, xy + wh], dim=1)
    torch.testing.assert_close(box_iou(boxes[:25], boxes[25:]), ops.box_iou(boxes[:25], boxes[25:]))


def test_box_iof_uses_area_of_first_box():
    small = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    crowd = torch.tensor([[0.0, 0.0, 100.0, 100.0], [1.0, 0.0, 3.0, 2.0]])
    torch.testing.assert_close(box_iof(small, crowd), torch.tensor([[1.0, 0.5]]))
    torch.testing.assert_close(box_iof(crowd[:1], small), torch.tensor([[4.0 / 10000.0]]))


def test_clip_boxes_uses_h_w_order():
    boxes = torch.tensor([[[-5.0, -5.0, 200.0, 300.0]]])
    clipped = clip_boxes(boxes, (100, 150))  # h = 100, w = 150
    assert torch.equal(clipped, torch.tensor([[[0.0, 0.0, 150.0, 100.0]]]))


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.tensor([[0.0, 0.0, math.nan, 1.0]]), "NaN"),
        (torch.tensor([[0.0, 0.0, math.inf, 1.0]]), "infinite"),
        (torch.tensor([[5.0, 0.0, 4.0, 1.0]]), "x2 < x1"),
        (torch.tensor([[0.0, 5.0, 4.0, 1.0]]), "y2 < y1"),
        (torch.zeros(3, 5), r"\[N, 4\]"),
        (torch.zeros(3, 4, dtype=torch.long), "floating"),
    ],
)
def test_check_boxes_rejects_bad_boxes(bad, message):
    with pytest.raises(ValueError, match=message):
        check_boxes(bad, "gt_boxes")


def test_check_boxes_accepts_valid_and_empty():
    check_boxes(torch.tensor([[0.0, 0.0, 0.0, 3.0], [1.0, 2.0, 3.0, 4.0]]), "gt_boxes")
    check_boxes(torch.zeros(0, 4), "gt_boxes")
