"""IoU-balanced sampling of negatives (paper Sec. 3.1, Eq. 1-2; MMDetection
`libra-faster-rcnn_r50_fpn_1x_coco`: `train_cfg.rcnn.sampler.neg_sampler` `IoUBalancedNegSampler
floor_thr=-1 floor_fraction=0 num_bins=3`).

Random sampling picks each of M negative candidates with probability N / M
(Eq. 1), so the few hard negatives (high IoU with a gt) are buried under the
many easy ones. IoU-balanced sampling splits the IoU range into K equal bins,
gives each bin N / K of the N demanded negatives and draws uniformly inside a
bin, so a candidate in bin k is chosen with probability

    p_k = (N / K) * (1 / M_k)                                          (Eq. 2)

where M_k is the number of candidates in bin k. A bin with fewer than N / K
candidates gives all of them, and the shortfall is filled uniformly from the
remaining candidates.

Floor set and ``floor_thr`` (the steady state of MMDetection's ``IoUBalancedNegSampler``).
The released Libra R-CNN checkpoints were trained with negatives of IoU exactly
0 kept out of the bins: they only fill what the bins could not. mmdet reaches
that state by mutating its sampler on the first call (``floor_thr`` -1 -> 0);
here the sampler is stateless and ``floor_thr`` is an explicit argument:

* ``floor_thr == 0`` (default): the floor set is IoU == 0; bins span
  ``[0, max_iou]`` over the IoU > 0 negatives;
* ``floor_thr > 0``: the floor set is IoU < floor_thr; bins span
  ``[floor_thr, max_iou]`` over the rest;
* ``floor_thr < 0``: no floor set; every negative is binned over ``[0, max_iou]``
  (plain Eq. 2, and what mmdet does on its very first call).

``max_iou`` is the max of ``max_overlaps`` over *all* boxes, positives included
(1.0 once the gts are added as proposals), so with the R-CNN's negative
threshold 0.5 and K = 3 only the first bin and part of the second hold
negatives. Bins are ``[lo, hi)`` except the last, which also includes ``max_iou``.

Algorithm, for N demanded negatives (``num_expected``):

1. If there are at most N negatives, take them all.
2. ``num_iou = int(N * (1 - floor_fraction))``. If the IoU-sampling set has more
   than ``num_iou`` negatives, each bin gets ``int(num_iou / K)`` (all of a bin
   with fewer), then the shortfall up to ``num_iou`` is filled uniformly from the
   IoU-sampling negatives not yet taken. Otherwise the whole IoU-sampling set is taken.
3. The floor set fills up to N uniformly.
4. If still short, any remaining negatives fill up to N.

The result has exactly ``min(#negatives, N)`` elements, and floor negatives are
used only to fill. Everything is masks and sorts of static size: no host sync.

Depends on ``random_sampler.py`` from this folder.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .random_sampler import dense_group_ids, random_sample, random_sample_per_group


def _scaled_count(count: int | Tensor, factor: float = 1.0, divisor: int = 1) -> int | Tensor:
    """``int(count * factor / divisor)`` for a Python int or a 0-dim tensor (truncates, as int())."""
    if isinstance(count, Tensor):
        return torch.floor(count.to(torch.float64) * factor / divisor).to(torch.long)
    return int(count * factor / divisor)


def iou_balanced_neg_sample(
    neg_mask: Tensor,
    max_overlaps: Tensor,
    num_expected: int | Tensor,
    num_bins: int = 3,
    floor_thr: float = 0.0,
    floor_fraction: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Choose ``min(#negatives, num_expected)`` negatives, balanced over IoU bins (Eq. 2).

    Args:
        neg_mask: ``[N]`` bool, the negative candidates (assigned gt index 0).
        max_overlaps: ``[N]`` float, max IoU of every box with the gts (all boxes, not
            only negatives: the top of the bin range is their max).
        num_expected: number of negatives wanted; Python int or 0-dim int64 tensor.
        num_bins: K, the number of equal IoU bins (3 in the paper).
        floor_thr: IoU below which (at or below, when 0) negatives form the floor set
            used only to fill; negative to disable the floor set. See the module docstring.
        floor_fraction: fraction of ``num_expected`` reserved for the floor set (0 in Libra R-CNN).
        generator: optional ``torch.Generator`` for reproducible draws.

    Returns:
        ``[N]`` bool mask of the chosen negatives.
    """
    if neg_mask.dim() != 1 or neg_mask.dtype != torch.bool:
        raise ValueError(f"neg_mask must be a [N] bool mask, got {neg_mask.dtype} {tuple(neg_mask.shape)}")
    if max_overlaps.shape != neg_mask.shape:
        raise ValueError(
            f"max_overlaps must have the shape of neg_mask {tuple(neg_mask.shape)}, got {tuple(max_overlaps.shape)}"
        )
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    if not 0.0 <= floor_fraction <= 1.0:
        raise ValueError(f"floor_fraction must be in [0, 1], got {floor_fraction}")
    if neg_mask.numel() == 0:
        return neg_mask.clone()

    iou = max_overlaps
    # Split the negatives into the floor set (only used to fill) and the IoU-sampling set.
    if floor_thr > 0:
        floor_set = neg_mask & (iou < floor_thr)
        bins_low = float(floor_thr)
    elif floor_thr == 0:
        floor_set = neg_mask & (iou <= 0)
        bins_low = 0.0
    else:
        floor_set = torch.zeros_like(neg_mask)
        bins_low = 0.0
    iou_set = neg_mask & ~floor_set

    # Bin index of every box: bin k covers [low + k * width, low + (k + 1) * width),
    # the last bin also holds max_iou. Counting crossed edges avoids a division.
    max_iou = iou.max()
    bin_width = (max_iou - bins_low) / num_bins
    bin_ids = torch.zeros_like(iou, dtype=torch.long)
    for k in range(1, num_bins):  # a loop over K bins, not over boxes
        bin_ids += (iou >= bins_low + k * bin_width).to(torch.long)
    if num_bins > neg_mask.shape[0]:
        bin_ids = dense_group_ids(bin_ids)  # group ids must lie in [0, N)

    # Step 2: N / K per bin (Eq. 2), all of a bin with fewer, then fill up to num_iou.
    num_iou = _scaled_count(num_expected, factor=1.0 - floor_fraction)
    per_bin = _scaled_count(num_iou, divisor=num_bins)
    binned = random_sample_per_group(iou_set, bin_ids, per_bin, generator)
    binned_fill = random_sample(iou_set & ~binned, num_iou - binned.sum(), generator)
    iou_taken = torch.where(iou_set.sum() > num_iou, binned | binned_fill, iou_set)

    # Step 3: the floor set (IoU 0 by default) fills up to num_expected.
    floor_taken = random_sample(floor_set, num_expected - iou_taken.sum(), generator)
    taken = iou_taken | floor_taken
    # Step 4: anything still missing comes from the remaining negatives.
    taken = taken | random_sample(neg_mask & ~taken, num_expected - taken.sum(), generator)

    # Step 1: with at most num_expected negatives, all of them.
    return torch.where(neg_mask.sum() <= num_expected, neg_mask, taken)


class IoUBalancedNegSampler(nn.Module):
    """Module form of :func:`iou_balanced_neg_sample` holding its hyper-parameters (no state); the
    sampler interface of :class:`~libra.samplers.random_sampler.RandomSampler` (it reads
    ``max_overlaps``).

    Args:
        num_bins: K, number of IoU bins (3).
        floor_thr: see :func:`iou_balanced_neg_sample` (0: IoU-0 negatives only fill).
        floor_fraction: share of negatives reserved for the floor set (0).
    """

    def __init__(self, num_bins: int = 3, floor_thr: float = 0.0, floor_fraction: float = 0.0) -> None:
        super().__init__()
        if num_bins < 1:
            raise ValueError(f"num_bins must be >= 1, got {num_bins}")
        self.num_bins = num_bins
        self.floor_thr = floor_thr
        self.floor_fraction = floor_fraction

    def forward(
        self,
        candidates: Tensor,
        num_expected: int | Tensor,
        *,
        max_overlaps: Tensor,
        gt_inds: Tensor | None = None,
        labels: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``[N]`` bool mask of sampled negatives among ``candidates``; see :func:`iou_balanced_neg_sample`."""
        return iou_balanced_neg_sample(
            candidates, max_overlaps, num_expected, self.num_bins, self.floor_thr, self.floor_fraction, generator
        )

    def extra_repr(self) -> str:
        return f"num_bins={self.num_bins}, floor_thr={self.floor_thr}, floor_fraction={self.floor_fraction}"
