import math

import pytest
import torch

from libra.anchor_generator import AnchorGenerator
from libra.box_coder import DeltaXYWHBoxCoder


def test_anchor_values_stride4_at_origin():
    generator = AnchorGenerator(strides=(4,))
    assert generator.num_anchors == 3
    (anchors,) = generator([(1, 1)], device="cpu")
    half_long, half_short = 16 * math.sqrt(2), 16 / math.sqrt(2)  # 45.25.. / 2 and 22.63.. / 2
    expected = torch.tensor(
        [
            [-half_long, -half_short, half_long, half_short],  # ratio 0.5: w = 45.25, h = 22.63
            [-16.0, -16.0, 16.0, 16.0],  # ratio 1: 32 x 32
            [-half_short, -half_long, half_short, half_long],  # ratio 2
        ]
    )
    torch.testing.assert_close(anchors, expected)
    assert anchors[0, 2] - anchors[0, 0] == pytest.approx(45.2548, abs=1e-3)
    assert anchors[0, 3] - anchors[0, 1] == pytest.approx(22.6274, abs=1e-3)


def test_anchor_count_and_flat_order_2x3_level():
    generator = AnchorGenerator(strides=(8, 16))
    levels = generator([(2, 3), (1, 2)], device="cpu", dtype=torch.float64)
    assert [level.shape for level in levels] == [(18, 4), (6, 4)]
    assert levels[0].dtype == torch.float64
    level = levels[0]
    centres = (level[:, :2] + level[:, 2:]) / 2
    sizes = level[:, 2:] - level[:, :2]
    for y in range(2):
        for x in range(3):
            for a in range(3):
                index = (y * 3 + x) * 3 + a
                torch.testing.assert_close(centres[index], torch.tensor([x * 8.0, y * 8.0], dtype=torch.float64))
                torch.testing.assert_close(sizes[index], sizes[a])  # same shape per anchor slot
    # Second level uses its own stride as the base size.
    torch.testing.assert_close(levels[1][1], torch.tensor([-64.0, -64.0, 64.0, 64.0], dtype=torch.float64))


def test_anchor_generator_rejects_wrong_number_of_levels():
    with pytest.raises(ValueError, match="one \\(H, W\\) per pyramid level"):
        AnchorGenerator()([(2, 2)], device="cpu")


def test_encode_known_values_with_stds():
    coder = DeltaXYWHBoxCoder(stds=(0.1, 0.1, 0.2, 0.2))
    deltas = coder.encode(torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([[5.0, 5.0, 15.0, 25.0]]))
    torch.testing.assert_close(deltas, torch.tensor([[5.0, 10.0, 0.0, math.log(2.0) / 0.2]]))


def test_encode_decode_round_trip_float64():
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(100, 2, generator=gen, dtype=torch.float64) * 100
    boxes = torch.cat([xy, xy + torch.rand(100, 2, generator=gen, dtype=torch.float64) * 50 + 1], 1)
    gt_xy = torch.rand(100, 2, generator=gen, dtype=torch.float64) * 100
    gt = torch.cat([gt_xy, gt_xy + torch.rand(100, 2, generator=gen, dtype=torch.float64) * 50 + 1], 1)
    for coder in (DeltaXYWHBoxCoder(), DeltaXYWHBoxCoder(means=(0.1, -0.2, 0.05, 0.0), stds=(0.1, 0.1, 0.2, 0.2))):
        decoded = coder.decode(boxes, coder.encode(boxes, gt))
        torch.testing.assert_close(decoded, gt, rtol=0, atol=1e-9)


def test_decode_clamps_large_dw_dh():
    coder = DeltaXYWHBoxCoder()
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0]], dtype=torch.float64)
    decoded = coder.decode(boxes, torch.tensor([[0.0, 0.0, 10.0, -10.0]], dtype=torch.float64))
    width, height = decoded[0, 2] - decoded[0, 0], decoded[0, 3] - decoded[0, 1]
    assert width.item() == pytest.approx(1000.0)  # 16 * exp(ln(1000 / 16))
    assert height.item() == pytest.approx(16.0 * 16.0 / 1000.0)
    assert coder.max_ratio == pytest.approx(4.135, abs=1e-3)


def test_decode_clips_to_max_shape_h_w():
    coder = DeltaXYWHBoxCoder()
    boxes = torch.tensor([[90.0, 40.0, 110.0, 60.0]])
    decoded = coder.decode(boxes, torch.zeros(1, 4), max_shape=(50, 100))
    assert torch.equal(decoded, torch.tensor([[90.0, 40.0, 100.0, 50.0]]))


def test_decode_broadcasts_over_classes():
    coder = DeltaXYWHBoxCoder(stds=(0.1, 0.1, 0.2, 0.2))
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 25.0, 15.0]])
    deltas = torch.zeros(2, 3, 4)
    deltas[:, 1, 0] = 1.0  # class 1 shifts x by 0.1 * width
    decoded = coder.decode(boxes[:, None, :], deltas)
    assert decoded.shape == (2, 3, 4)
    torch.testing.assert_close(decoded[:, 0], boxes)
    torch.testing.assert_close(decoded[1, 1], torch.tensor([7.0, 5.0, 27.0, 15.0]))


def test_coder_rejects_bad_stds():
    with pytest.raises(ValueError):
        DeltaXYWHBoxCoder(stds=(0.1, 0.1, 0.0, 0.2))


def test_encode_matched_targets_only_the_kept_rows():
    coder = DeltaXYWHBoxCoder(stds=(0.1, 0.1, 0.2, 0.2))
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 25.0], [0.0, 0.0, 4.0, 4.0]])
    gts = torch.tensor([[1.0, 1.0, 11.0, 12.0], [0.0, 0.0, 0.0, 0.0]])  # gt 1 is degenerate: inf deltas
    index = torch.tensor([0, -1, 1])
    keep = torch.tensor([True, False, False])
    targets = coder.encode_matched(boxes, gts, index, keep)
    torch.testing.assert_close(targets[0], coder.encode(boxes[:1], gts[:1])[0])
    assert (targets[1:] == 0).all() and torch.isfinite(targets).all()
    assert (coder.encode_matched(boxes, gts[:0], index, keep) == 0).all()  # no gt: all zero
