"""Sampler tests. Statistical checks use a seeded generator, so they are deterministic."""

import pytest
import torch

from libra.samplers import (
    ClassBalancedPosSampler,
    InstanceBalancedPosSampler,
    IoUBalancedNegSampler,
    class_balanced_pos_sample,
    instance_balanced_pos_sample,
    iou_balanced_neg_sample,
    random_sample,
    sample_pos_neg,
)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def chi_square_uniform(counts: torch.Tensor) -> float:
    expected = counts.float().mean()
    return float(((counts.float() - expected) ** 2 / expected).sum())


# ---------------------------------------------------------------- random sampler (Eq. 1)


def test_random_sample_exact_count_subset_and_uniform():
    candidates = torch.zeros(300, dtype=torch.bool)
    candidates[::3] = True  # 100 candidates
    gen = seeded()
    counts = torch.zeros(300)
    for _ in range(2000):
        chosen = random_sample(candidates, 20, generator=gen)
        assert int(chosen.sum()) == 20
        assert not (chosen & ~candidates).any()
        counts += chosen
    # Eq. 1: p = N / M = 0.2 for every candidate.
    assert counts[~candidates].sum() == 0
    cand_counts = counts[candidates]
    assert abs(cand_counts.mean() - 400) < 1e-6
    # Without replacement the statistic is about (M - 1) * (1 - p) = 79; far above means non-uniform.
    assert 30 < chi_square_uniform(cand_counts) < 150


def test_random_sample_takes_all_when_short_and_accepts_tensor_count():
    candidates = torch.tensor([True, False, True, True])
    assert torch.equal(random_sample(candidates, 10), candidates)
    chosen = random_sample(candidates, torch.tensor(2), generator=seeded())
    assert int(chosen.sum()) == 2 and not (chosen & ~candidates).any()
    assert int(random_sample(candidates, 0).sum()) == 0
    assert random_sample(torch.zeros(0, dtype=torch.bool), 5).shape == (0,)


def test_random_sample_is_deterministic_with_a_generator():
    candidates = torch.ones(1000, dtype=torch.bool)
    first = random_sample(candidates, 100, generator=seeded(3))
    again = random_sample(candidates, 100, generator=seeded(3))
    other = random_sample(candidates, 100, generator=seeded(4))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


# ---------------------------------------------------------------- IoU-balanced negatives (Eq. 2)


def make_negatives(bin_sizes: list[int], num_zero: int, max_iou: float = 0.9):
    """Negatives with IoU inside each of 3 bins of [0, max_iou], IoU-0 ones, and one positive at max_iou."""
    width = max_iou / 3
    ious = []
    for k, size in enumerate(bin_sizes):
        ious.append(torch.linspace(k * width + 0.01, (k + 1) * width - 0.01, size))
    ious.append(torch.zeros(num_zero))
    ious.append(torch.tensor([max_iou]))  # the positive that sets the top of the bin range
    max_overlaps = torch.cat(ious)
    neg_mask = torch.ones_like(max_overlaps, dtype=torch.bool)
    neg_mask[-1] = False
    bin_ids = torch.cat([torch.full((size,), k) for k, size in enumerate(bin_sizes)] + [torch.full((num_zero + 1,), -1)])
    return neg_mask, max_overlaps, bin_ids


def test_iou_balanced_gives_each_bin_n_over_k_and_is_uniform_within_bins():
    neg_mask, max_overlaps, bin_ids = make_negatives([300, 100, 50], num_zero=400)
    gen = seeded()
    counts = torch.zeros(neg_mask.shape[0])
    draws = 2000
    for _ in range(draws):
        chosen = iou_balanced_neg_sample(neg_mask, max_overlaps, 90, generator=gen)
        per_bin = [int((chosen & (bin_ids == k)).sum()) for k in range(3)]
        assert per_bin == [30, 30, 30]  # Eq. 2: N / K per bin
        assert not (chosen & (max_overlaps == 0)).any()  # IoU-0 negatives are only a fill
        assert not chosen[-1]  # never a positive
        counts += chosen
    # Eq. 2: p_k = (N / K) / M_k, uniform inside each bin.
    for k, size in enumerate([300, 100, 50]):
        in_bin = counts[bin_ids == k]
        assert abs(in_bin.mean() - draws * 30 / size) < 1e-3
        statistic = chi_square_uniform(in_bin)
        expected = (size - 1) * (1 - 30 / size)  # without replacement
        assert 0.6 * expected < statistic < 1.5 * expected, (k, statistic, expected)


def test_iou_balanced_small_bin_taken_whole_and_shortfall_filled_uniformly():
    neg_mask, max_overlaps, bin_ids = make_negatives([270, 70, 10], num_zero=400)
    gen = seeded(1)
    counts = torch.zeros(neg_mask.shape[0])
    draws = 300
    for _ in range(draws):
        chosen = iou_balanced_neg_sample(neg_mask, max_overlaps, 90, generator=gen)
        assert int(chosen.sum()) == 90
        assert int((chosen & (bin_ids == 2)).sum()) == 10  # the small bin is taken whole
        assert int((chosen & (bin_ids == 0)).sum()) >= 30 and int((chosen & (bin_ids == 1)).sum()) >= 30
        assert not (chosen & (max_overlaps == 0)).any()
        counts += chosen
    # The 20 extra come uniformly from the 240 + 40 left over: bin 0 gets 30 + 20 * 240 / 280 on average.
    mean_bin0 = counts[bin_ids == 0].sum() / draws
    assert abs(mean_bin0 - (30 + 20 * 240 / 280)) < 0.5


def test_iou_zero_negatives_only_fill_when_positive_iou_set_is_exhausted():
    neg_mask, max_overlaps, bin_ids = make_negatives([20, 15, 5], num_zero=400)
    gen = seeded(2)
    for _ in range(50):
        chosen = iou_balanced_neg_sample(neg_mask, max_overlaps, 90, generator=gen)
        assert int(chosen.sum()) == 90
        assert bool(chosen[bin_ids >= 0].all())  # all 40 IoU > 0 negatives
        assert int((chosen & (max_overlaps == 0)).sum()) == 50


def test_iou_balanced_takes_all_negatives_when_few():
    neg_mask, max_overlaps, _ = make_negatives([10, 5, 1], num_zero=20)
    assert torch.equal(iou_balanced_neg_sample(neg_mask, max_overlaps, 90), neg_mask)
    assert torch.equal(iou_balanced_neg_sample(neg_mask, max_overlaps, torch.tensor(36)), neg_mask)


def test_iou_balanced_floor_fraction_and_floor_thr():
    neg_mask, max_overlaps, bin_ids = make_negatives([300, 100, 50], num_zero=400)
    gen = seeded(3)
    chosen = iou_balanced_neg_sample(neg_mask, max_overlaps, 90, floor_fraction=0.5, generator=gen)
    assert int(chosen.sum()) == 90
    assert int((chosen & (max_overlaps == 0)).sum()) == 45  # int(90 * 0.5) reserved for the floor set
    assert [int((chosen & (bin_ids == k)).sum()) for k in range(3)] == [15, 15, 15]
    # floor_thr > 0: everything below it is the floor set, bins span [floor_thr, max_iou].
    chosen = iou_balanced_neg_sample(neg_mask, max_overlaps, 90, floor_thr=0.6, generator=gen)
    assert int(chosen.sum()) == 90
    assert bool(chosen[bin_ids == 2].all())  # the 50 negatives >= 0.6 are all the IoU-sampling set
    # floor_thr < 0: no floor set, IoU-0 negatives are binned with the rest of [0, 0.3).
    counts = torch.zeros(neg_mask.shape[0])
    for _ in range(100):
        chosen = iou_balanced_neg_sample(neg_mask, max_overlaps, 90, floor_thr=-1.0, generator=gen)
        assert int((chosen & ((bin_ids == 0) | (max_overlaps == 0))).sum()) == 30
        counts += chosen
    assert counts[max_overlaps == 0].sum() > 0


def test_iou_balanced_module_and_validation():
    neg_mask, max_overlaps, bin_ids = make_negatives([300, 100, 50], num_zero=10)
    sampler = IoUBalancedNegSampler(num_bins=3)
    assert "num_bins=3" in repr(sampler)
    chosen = sampler(neg_mask, 60, max_overlaps=max_overlaps, generator=seeded())
    assert [int((chosen & (bin_ids == k)).sum()) for k in range(3)] == [20, 20, 20]
    with pytest.raises(ValueError, match="num_bins"):
        iou_balanced_neg_sample(neg_mask, max_overlaps, 10, num_bins=0)
    with pytest.raises(ValueError, match="shape"):
        iou_balanced_neg_sample(neg_mask, max_overlaps[:-1], 10)
    # More bins than boxes still works.
    few = iou_balanced_neg_sample(torch.tensor([True, True]), torch.tensor([0.1, 0.2]), 1, num_bins=5)
    assert int(few.sum()) == 1


# ---------------------------------------------------------------- instance / class balanced positives


def gt_inds_with_counts(counts: list[int], num_negatives: int = 50) -> torch.Tensor:
    parts = [torch.full((c,), i + 1) for i, c in enumerate(counts)]
    return torch.cat(parts + [torch.zeros(num_negatives, dtype=torch.long), torch.tensor([-1, -1])])


def test_instance_balanced_quota_and_fill():
    gt_inds = gt_inds_with_counts([100, 5, 3, 50])
    gen = seeded()
    for _ in range(200):
        chosen = instance_balanced_pos_sample(gt_inds, 64, generator=gen)
        assert int(chosen.sum()) == 64
        assert not (chosen & (gt_inds <= 0)).any()
        per_gt = [int((chosen & (gt_inds == i)).sum()) for i in range(1, 5)]
        # quota round(64 / 4) + 1 = 17: small gts give all, the 22 missing come from the big ones.
        assert per_gt[1] == 5 and per_gt[2] == 3
        assert per_gt[0] >= 17 and per_gt[3] >= 17


def test_instance_balanced_cut_keeps_each_gt_within_quota():
    gt_inds = gt_inds_with_counts([20] * 8)
    gen = seeded(1)
    counts = torch.zeros(gt_inds.shape[0])
    for _ in range(200):
        chosen = instance_balanced_pos_sample(gt_inds, 64, generator=gen)
        assert int(chosen.sum()) == 64
        per_gt = torch.tensor([int((chosen & (gt_inds == i)).sum()) for i in range(1, 9)])
        assert (per_gt <= 9).all()  # quota round(64 / 8) + 1 = 9, then cut to 64
        counts += chosen
    assert 30 < counts[gt_inds > 0].min()  # every positive gets drawn sometimes


def test_instance_balanced_takes_all_when_few_and_tensor_count():
    gt_inds = gt_inds_with_counts([3, 4])
    assert torch.equal(instance_balanced_pos_sample(gt_inds, 64), gt_inds > 0)
    assert torch.equal(instance_balanced_pos_sample(gt_inds, torch.tensor(7)), gt_inds > 0)
    assert int(instance_balanced_pos_sample(gt_inds, torch.tensor(5), seeded()).sum()) == 5
    assert int(instance_balanced_pos_sample(torch.zeros(10, dtype=torch.long), 5).sum()) == 0


def test_class_balanced_gives_rare_class_its_quota():
    counts = [60] * 5 + [30]  # gts 1..5: frequent class 0; gt 6: rare class 1
    gt_inds = gt_inds_with_counts(counts)
    labels = torch.where(gt_inds == 6, 1, torch.where(gt_inds > 0, 0, -1))
    gen = seeded()
    for _ in range(100):
        chosen = class_balanced_pos_sample(gt_inds, labels, 64, generator=gen)
        assert int(chosen.sum()) == 64
        # class quota round(64 / 2) + 1 = 33 >= 30: the rare class is taken whole.
        assert int((chosen & (gt_inds == 6)).sum()) == 30
    # Instance balancing alone gives the rare gt only about a sixth.
    rare = [int((instance_balanced_pos_sample(gt_inds, 64, generator=gen) & (gt_inds == 6)).sum()) for _ in range(20)]
    assert max(rare) < 30


def test_class_balanced_instance_balanced_within_class():
    counts = [100, 2, 100]  # gts 1, 2: class 5; gt 3: class 9
    gt_inds = gt_inds_with_counts(counts)
    labels = torch.where(gt_inds == 3, 9, torch.where(gt_inds > 0, 5, -1))
    gen = seeded(1)
    small_gt_total = 0
    for _ in range(100):
        chosen = class_balanced_pos_sample(gt_inds, labels, 40, generator=gen)
        per_gt = [int((chosen & (gt_inds == i)).sum()) for i in range(1, 4)]
        # class quota round(40 / 2) + 1 = 21; inside class 5 gt quota round(21 / 2) + 1 = 12:
        # gt 2 gives both, gt 1 gives 12 and fills its class to 21; gt 3 gives 21; total 42 cut to 40.
        assert sum(per_gt) == 40
        assert per_gt[0] <= 19 and per_gt[2] <= 21 and per_gt[0] + per_gt[1] <= 21
        small_gt_total += per_gt[1]
    assert small_gt_total > 170  # both of gt 2's positives survive the final cut with p = 40 / 42


def test_class_balanced_validates_labels():
    with pytest.raises(ValueError, match="labels"):
        class_balanced_pos_sample(torch.tensor([1, 0]), torch.tensor([0.0, 1.0]), 1)


# ---------------------------------------------------------------- sample_pos_neg


def test_sample_pos_neg_neg_pos_ub_cap():
    gt_inds = torch.cat([torch.tensor([1, 1, 2]), torch.zeros(1000, dtype=torch.long), torch.full((20,), -1)])
    max_overlaps = torch.rand(gt_inds.shape[0], generator=seeded()) * 0.3
    pos, neg = sample_pos_neg(gt_inds, max_overlaps, 256, 0.5, neg_pos_ub=5, generator=seeded())
    assert int(pos.sum()) == 3 and int(neg.sum()) == 15
    assert not (pos & neg).any() and not ((pos | neg) & (gt_inds < 0)).any()
    pos, neg = sample_pos_neg(gt_inds, max_overlaps, 256, 0.5, generator=seeded())
    assert int(pos.sum()) == 3 and int(neg.sum()) == 253
    no_pos = torch.zeros(1000, dtype=torch.long)
    pos, neg = sample_pos_neg(no_pos, torch.zeros(1000), 256, 0.5, neg_pos_ub=5)
    assert int(pos.sum()) == 0 and int(neg.sum()) == 5  # max(1, #pos) * 5


def test_sample_pos_neg_libra_rcnn_setting():
    gt_inds = torch.cat([torch.full((300,), 1), torch.full((10,), 2), torch.zeros(2000, dtype=torch.long)])
    max_overlaps = torch.cat([torch.full((310,), 0.8), torch.rand(2000, generator=seeded()) * 0.5])
    max_overlaps[:300:50] = 1.0
    max_overlaps[310:1310] = 0.0
    pos, neg = sample_pos_neg(
        gt_inds, max_overlaps, 512, 0.25, InstanceBalancedPosSampler(), IoUBalancedNegSampler(num_bins=3), generator=seeded()
    )
    assert int(pos.sum()) == 128 and int(neg.sum()) == 384
    assert int((pos & (gt_inds == 2)).sum()) == 10
    assert not (neg & (max_overlaps == 0)).any()  # 1000 IoU > 0 negatives suffice
    # Same seed, same result.
    again = sample_pos_neg(
        gt_inds, max_overlaps, 512, 0.25, InstanceBalancedPosSampler(), IoUBalancedNegSampler(num_bins=3), generator=seeded()
    )
    assert torch.equal(pos, again[0]) and torch.equal(neg, again[1])


def test_sample_pos_neg_errors():
    gt_inds = torch.tensor([1, 0, 0])
    max_overlaps = torch.tensor([0.9, 0.1, 0.0])
    with pytest.raises(ValueError, match="pos_sampler must be a sampler module"):
        sample_pos_neg(gt_inds, max_overlaps, 2, 0.5, pos_sampler="ohem")
    with pytest.raises(ValueError, match="neg_sampler must be a sampler module"):
        sample_pos_neg(gt_inds, max_overlaps, 2, 0.5, neg_sampler="ohem")
    with pytest.raises(ValueError, match="labels"):
        sample_pos_neg(gt_inds, max_overlaps, 2, 0.5, pos_sampler=ClassBalancedPosSampler())
    pos, neg = sample_pos_neg(gt_inds, max_overlaps, 2, 0.5, ClassBalancedPosSampler(), labels=torch.tensor([0, -1, -1]))
    assert pos.tolist() == [True, False, False] and int(neg.sum()) == 1


# ---------------------------------------------------------------- no host sync on CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_samplers_and_assigner_run_without_host_sync_on_cuda():
    from libra.max_iou_assigner import MaxIoUAssigner

    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    xy = torch.rand(2000, 2, device=device, generator=gen) * 200
    boxes = torch.cat([xy, xy + torch.rand(2000, 2, device=device, generator=gen) * 100 + 1], 1)
    gt_boxes = boxes[:7] + 2.0
    gt_labels = torch.tensor([0, 1, 1, 2, 3, 3, 3], device=device)
    assigner = MaxIoUAssigner(0.5, 0.5, 0.5, match_low_quality=False)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        result = assigner.assign(boxes, gt_boxes, gt_labels, ignore_boxes=gt_boxes[:1], validate=False)
        outputs = [
            random_sample(result.gt_inds == 0, 100, generator=gen),
            iou_balanced_neg_sample(result.gt_inds == 0, result.max_overlaps, 300, generator=gen),
            instance_balanced_pos_sample(result.gt_inds, 128, generator=gen),
            class_balanced_pos_sample(result.gt_inds, result.labels, 128, generator=gen),
            *sample_pos_neg(result.gt_inds, result.max_overlaps, 512, 0.25, InstanceBalancedPosSampler(),
                            IoUBalancedNegSampler(), neg_pos_ub=5, generator=gen),
            *sample_pos_neg(result.gt_inds, result.max_overlaps, 512, 0.25, generator=None),
        ]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(out.device.type == "cuda" and out.dtype == torch.bool for out in outputs)
    assert int(outputs[0].sum()) == min(100, int((result.gt_inds == 0).sum()))
