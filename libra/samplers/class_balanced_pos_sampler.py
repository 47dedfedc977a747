"""Class-balanced sampling of positives, for long-tailed data such as LVIS
(paper Sec. 3.1, last paragraph: "first sample an equal number of positive samples for each class").

The class-level version of instance-balanced sampling (paper Sec. 3.1): frequent
classes own most positives, so first every class with positives gets the same
allowance

    class_quota = round(N_pos / #classes_with_positives) + 1,

then inside a class the allowance is shared instance-balanced: each of its gts
gets ``round(class_quota / #gts_of_that_class) + 1`` positives drawn uniformly,
the class's shortfall is filled uniformly from its other positives and its
excess cut back to ``class_quota``. Finally, as for instances, the total is
filled up to N_pos from positives not yet chosen and cut to N_pos, uniformly.
With at most N_pos positives all are taken.

Everything is masks and static-size sorts on the input's device: no host sync.
Depends on ``random_sampler.py`` and ``instance_balanced_pos_sampler.py`` from this folder.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .instance_balanced_pos_sampler import balanced_quota
from .random_sampler import count_per_group, dense_group_ids, random_ranks, random_sample, random_sample_per_group


def class_balanced_pos_sample(
    gt_inds: Tensor, labels: Tensor, num_expected: int | Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """Choose ``min(#positives, num_expected)`` positives, balanced over classes, then instances.

    Args:
        gt_inds: ``[N]`` int64 assigned gt index per box (``> 0`` for positives).
        labels: ``[N]`` int64 class of each box's gt (only read for positives).
        num_expected: number of positives wanted; Python int or 0-dim int64 tensor.
        generator: optional ``torch.Generator`` for reproducible draws.

    Returns:
        ``[N]`` bool mask of the chosen positives.
    """
    if gt_inds.dim() != 1 or gt_inds.is_floating_point() or gt_inds.dtype == torch.bool:
        raise ValueError(f"gt_inds must be a [N] int64 tensor, got {gt_inds.dtype} {tuple(gt_inds.shape)}")
    if labels.shape != gt_inds.shape or labels.is_floating_point():
        raise ValueError(
            f"labels must be an int64 tensor shaped like gt_inds {tuple(gt_inds.shape)}, "
            f"got {labels.dtype} {tuple(labels.shape)}"
        )
    positive = gt_inds > 0
    device = gt_inds.device
    class_ids = dense_group_ids(torch.where(positive, labels.to(torch.long), torch.full_like(gt_inds, -1)))
    gt_ids = dense_group_ids(gt_inds)

    # Class allowance: equal for every class that has positives.
    rank_in_class = random_ranks(positive, class_ids, generator)
    num_classes = (positive & (rank_in_class == 0)).sum()
    class_quota = balanced_quota(num_expected, num_classes).to(device)

    # Instance-balanced inside each class: per-gt quota out of the class allowance.
    rank_in_gt = random_ranks(positive, gt_ids, generator)
    gts_in_class = count_per_group(positive & (rank_in_gt == 0), class_ids)  # [N], per element's class
    chosen = positive & (rank_in_gt < balanced_quota(class_quota, gts_in_class))
    # Fill each class up to its allowance, then cut it back to the allowance.
    class_shortfall = class_quota - count_per_group(chosen, class_ids)
    chosen = chosen | random_sample_per_group(positive & ~chosen, class_ids, class_shortfall, generator)
    chosen = random_sample_per_group(chosen, class_ids, class_quota, generator)

    # Fill the total up to num_expected, then cut it to num_expected.
    chosen = chosen | random_sample(positive & ~chosen, num_expected - chosen.sum(), generator)
    chosen = random_sample(chosen, num_expected, generator)
    return torch.where(positive.sum() <= num_expected, positive, chosen)


class ClassBalancedPosSampler(nn.Module):
    """Module form of :func:`class_balanced_pos_sample` (the LVIS positives of Sec. 3.1); the
    sampler interface of :class:`~libra.samplers.random_sampler.RandomSampler`. Needs ``labels``."""

    def forward(
        self,
        candidates: Tensor,
        num_expected: int | Tensor,
        *,
        gt_inds: Tensor,
        max_overlaps: Tensor | None = None,
        labels: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        if labels is None:
            raise ValueError("the class-balanced positive sampler needs labels (the gt label of each box)")
        return class_balanced_pos_sample(gt_inds, labels, num_expected, generator) & candidates
