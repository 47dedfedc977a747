"""Instance-balanced sampling of positives (paper Sec. 3.1, the complement of Eq. 2;
MMDetection `libra-faster-rcnn_r50_fpn_1x_coco`: `train_cfg.rcnn.sampler.pos_sampler`
`type='InstanceBalancedPosSampler'`).

A large object overlaps many more proposals than a small one, so sampling
positives at random (Eq. 1) over-represents big instances. Here every gt with
positives gets the same quota

    quota = round(N_pos / #gts_with_positives) + 1      (MMDetection's ``num_per_gt``)

of its positives, drawn uniformly; a shortfall (gts with fewer positives than
their quota) is filled uniformly from the positives not yet chosen, and an
excess is cut back to N_pos uniformly. With at most N_pos positives all are
taken. Unlike MMDetection's fill, no positive can be chosen twice (masks).

Everything is masks and static-size sorts on the input's device: no host sync.
Depends on ``random_sampler.py`` from this folder.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .random_sampler import dense_group_ids, random_ranks, random_sample


def balanced_quota(num_expected: int | Tensor, num_groups: Tensor) -> Tensor:
    """``round(num_expected / num_groups) + 1`` (round half to even, as Python's round()).

    Args:
        num_expected: int or int64 tensor (0-dim or ``[N]``).
        num_groups: int64 tensor (0-dim or ``[N]``); 0 is treated as 1 (no candidates anyway).

    Returns:
        int64 tensor of the broadcast shape.
    """
    if not isinstance(num_expected, Tensor):
        num_expected = torch.tensor(float(num_expected), dtype=torch.float64)
    ratio = num_expected.to(torch.float64) / num_groups.clamp(min=1).to(torch.float64)
    return torch.round(ratio).to(torch.long) + 1


def instance_balanced_pos_sample(
    gt_inds: Tensor, num_expected: int | Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """Choose ``min(#positives, num_expected)`` positives, balanced over gt instances.

    Args:
        gt_inds: ``[N]`` int64 assigned gt index per box (-1 ignored, 0 negative,
            ``i + 1`` positive for gt i).
        num_expected: number of positives wanted; Python int or 0-dim int64 tensor.
        generator: optional ``torch.Generator`` for reproducible draws.

    Returns:
        ``[N]`` bool mask of the chosen positives.
    """
    if gt_inds.dim() != 1 or gt_inds.is_floating_point() or gt_inds.dtype == torch.bool:
        raise ValueError(f"gt_inds must be a [N] int64 tensor, got {gt_inds.dtype} {tuple(gt_inds.shape)}")
    positive = gt_inds > 0
    gt_ids = dense_group_ids(gt_inds)
    rank_in_gt = random_ranks(positive, gt_ids, generator)
    num_gts = (positive & (rank_in_gt == 0)).sum()  # one rank-0 positive per gt with positives
    chosen = positive & (rank_in_gt < balanced_quota(num_expected, num_gts).to(gt_inds.device))
    # Fill a shortfall from positives not yet chosen, then cut an excess, both uniformly.
    chosen = chosen | random_sample(positive & ~chosen, num_expected - chosen.sum(), generator)
    chosen = random_sample(chosen, num_expected, generator)
    return torch.where(positive.sum() <= num_expected, positive, chosen)


class InstanceBalancedPosSampler(nn.Module):
    """Module form of :func:`instance_balanced_pos_sample` (Libra R-CNN's positives, Sec. 3.1;
    MMDetection ``InstanceBalancedPosSampler``); the sampler interface of
    :class:`~libra.samplers.random_sampler.RandomSampler`. The candidates are the positives
    (``gt_inds > 0``), which it reads from ``gt_inds``."""

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
        return instance_balanced_pos_sample(gt_inds, num_expected, generator) & candidates
