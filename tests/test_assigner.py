import pytest
import torch

from libra.boxes import box_iou
from libra.max_iou_assigner import AssignResult, MaxIoUAssigner


def rpn_assigner(**kwargs) -> MaxIoUAssigner:
    return MaxIoUAssigner(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3, match_low_quality=True, **kwargs)


def rcnn_assigner() -> MaxIoUAssigner:
    return MaxIoUAssigner(pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5, match_low_quality=False)


def test_tied_best_anchors_both_become_positive():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    anchors = torch.tensor([[0.0, 0.0, 10.0, 20.0], [0.0, -10.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    result = rpn_assigner().assign(anchors, gt, torch.tensor([4]))
    assert isinstance(result, AssignResult)
    assert result.gt_inds.tolist() == [1, 1, 0]  # both IoU-0.5 anchors are low-quality matches
    assert result.labels.tolist() == [4, 4, -1]
    torch.testing.assert_close(result.max_overlaps, torch.tensor([0.5, 0.5, 0.0]))


def test_gt_with_best_iou_below_min_pos_iou_gets_nothing():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [100.0, 100.0, 110.0, 110.0]])
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [100.0, 100.0, 110.0, 150.0]])  # IoU 1.0 and 0.2
    result = rpn_assigner().assign(anchors, gt, torch.tensor([0, 1]))
    assert result.gt_inds.tolist() == [1, 0]
    assert (result.gt_inds != 2).all()


def test_box_best_for_two_gts_goes_to_the_later_gt():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 10.0, 10.0, 20.0]])
    anchors = torch.tensor([[0.0, 5.0, 10.0, 15.0], [50.0, 50.0, 60.0, 60.0]])  # IoU 1/3 with both gts
    result = rpn_assigner().assign(anchors, gt, torch.tensor([7, 8]))
    assert result.gt_inds.tolist() == [2, 0]
    assert result.labels.tolist() == [8, -1]


def test_thresholds_exactly_at_boundaries():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    anchors = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],  # IoU 1.0 (the gt's best: the only low-quality match)
            [0.0, 0.0, 10.0, 7.0],  # IoU exactly 0.7 -> positive (>=)
            [0.0, 0.0, 10.0, 6.9],  # IoU 0.69 -> ignored
            [0.0, 0.0, 10.0, 3.0],  # IoU exactly 0.3 -> ignored (negative needs < 0.3)
            [0.0, 0.0, 10.0, 2.9],  # IoU 0.29 -> negative
        ]
    )
    result = rpn_assigner().assign(anchors, gt, torch.tensor([0]))
    assert result.gt_inds.tolist() == [1, 1, -1, -1, 0]


def test_low_quality_match_exactly_at_min_pos_iou():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    anchors = torch.tensor([[0.0, 0.0, 10.0, 3.0], [0.0, 0.0, 10.0, 2.0]])  # best IoU exactly 0.3
    assert rpn_assigner().assign(anchors, gt, torch.tensor([0])).gt_inds.tolist() == [1, 0]


def test_rcnn_assigner_has_no_low_quality_matches():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [100.0, 100.0, 110.0, 110.0]])
    boxes = torch.tensor(
        [[0.0, 0.0, 10.0, 5.0], [0.0, 0.0, 10.0, 4.9], [100.0, 100.0, 110.0, 104.0]]  # 0.5, 0.49, 0.4
    )
    result = rcnn_assigner().assign(boxes, gt, torch.tensor([2, 3]))
    assert result.gt_inds.tolist() == [1, 0, 0]
    assert result.labels.tolist() == [2, -1, -1]


def test_no_gt_gives_all_negatives():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 8.0, 9.0]])
    result = rpn_assigner().assign(anchors, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert result.gt_inds.tolist() == [0, 0]
    assert result.max_overlaps.tolist() == [0.0, 0.0]
    assert result.labels.tolist() == [-1, -1]
    assert result.gt_inds.dtype == torch.long and result.labels.dtype == torch.long


def test_no_boxes():
    result = rpn_assigner().assign(torch.zeros(0, 4), torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([0]))
    assert result.gt_inds.shape == result.max_overlaps.shape == result.labels.shape == (0,)


def test_ignore_boxes_make_negatives_ignored_but_keep_positives():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    ignore = torch.tensor([[0.0, 0.0, 100.0, 100.0]])  # a crowd region covering everything below
    anchors = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],  # positive, inside the crowd: stays positive
            [50.0, 50.0, 60.0, 60.0],  # negative, inside the crowd: ignored
            [95.0, 0.0, 105.0, 10.0],  # negative, IoF exactly 0.5 (not > 0.5): stays negative
            [200.0, 200.0, 210.0, 210.0],  # negative, outside: stays negative
        ]
    )
    result = rpn_assigner().assign(anchors, gt, torch.tensor([3]), ignore_boxes=ignore)
    assert result.gt_inds.tolist() == [1, -1, 0, 0]
    assert result.labels.tolist() == [3, -1, -1, -1]
    # Without gts the ignore regions still apply.
    result = rpn_assigner().assign(anchors, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), ignore)
    assert result.gt_inds.tolist() == [-1, -1, 0, 0]
    # ignore_iof_thr <= 0 disables them.
    result = rpn_assigner(ignore_iof_thr=-1).assign(anchors, gt, torch.tensor([3]), ignore_boxes=ignore)
    assert result.gt_inds.tolist() == [1, 0, 0, 0]


def _loop_reference(assigner: MaxIoUAssigner, boxes, gt_boxes) -> list[int]:
    """mmdet's loop over gts, as a plain reference."""
    overlaps = box_iou(gt_boxes, boxes)
    max_overlaps, argmax = overlaps.max(dim=0)
    gt_inds = [-1] * boxes.shape[0]
    for j in range(boxes.shape[0]):
        if max_overlaps[j] < assigner.neg_iou_thr:
            gt_inds[j] = 0
        if max_overlaps[j] >= assigner.pos_iou_thr:
            gt_inds[j] = int(argmax[j]) + 1
    for i in range(gt_boxes.shape[0]):
        best = overlaps[i].max()
        if best >= assigner.min_pos_iou:
            for j in range(boxes.shape[0]):
                if overlaps[i, j] == best:
                    gt_inds[j] = i + 1
    return gt_inds


def test_vectorised_low_quality_matching_equals_loop_over_gts():
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        xy = torch.randint(0, 40, (60, 2), generator=gen).float()
        boxes = torch.cat([xy, xy + torch.randint(4, 20, (60, 2), generator=gen).float()], 1)
        boxes = torch.cat([boxes, boxes[:10]])  # duplicates create exact ties
        gt_xy = torch.randint(0, 40, (6, 2), generator=gen).float()
        gt_boxes = torch.cat([gt_xy, gt_xy + torch.randint(4, 20, (6, 2), generator=gen).float()], 1)
        gt_boxes = torch.cat([gt_boxes, gt_boxes[:2]])  # duplicate gts: the later one must win
        assigner = rpn_assigner()
        result = assigner.assign(boxes, gt_boxes, torch.arange(8))
        assert result.gt_inds.tolist() == _loop_reference(assigner, boxes, gt_boxes)


def test_validation_errors():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    with pytest.raises(ValueError, match="NaN"):
        rpn_assigner().assign(anchors, torch.tensor([[0.0, 0.0, float("nan"), 1.0]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="x2 < x1"):
        rpn_assigner().assign(anchors, torch.tensor([[5.0, 0.0, 1.0, 1.0]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="non-negative"):
        rpn_assigner().assign(anchors, torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([-1]))
    with pytest.raises(ValueError, match=r"gt_labels must have shape"):
        rpn_assigner().assign(anchors, torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"boxes must have shape"):
        rpn_assigner().assign(torch.zeros(3), torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="neg_iou_thr"):
        MaxIoUAssigner(pos_iou_thr=0.3, neg_iou_thr=0.7, min_pos_iou=0.3)
    # validate=False skips the (host-syncing) value checks.
    result = rpn_assigner().assign(anchors, torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([-5]), validate=False)
    assert result.gt_inds.tolist() == [1]
