"""Sample the positives and negatives of one image for a loss (balanced samplers: paper Sec. 3.1).

MMDetection's sampler semantics, on masks:

    num_pos = min(#positives, int(num * pos_fraction))      (sampled by pos_sampler)
    num_neg = num - num_pos                                  (sampled by neg_sampler)
    num_neg = min(num_neg, int(neg_pos_ub * max(1, num_pos)))  if neg_pos_ub >= 0

(Libra R-CNN's RPN uses neg_pos_ub = 5, the R-CNN stage -1, i.e. no cap: MMDetection
`libra-faster-rcnn_r50_fpn_1x_coco`: `train_cfg.rpn.sampler.neg_pos_ub=5`; the base
`faster-rcnn_r50_fpn.py` has `train_cfg.rpn.sampler num=256 pos_fraction=0.5` and
`train_cfg.rcnn.sampler num=512 pos_fraction=0.25 neg_pos_ub=-1`.)
Positives are boxes with gt index > 0, negatives those with 0; ignored (-1)
boxes are never sampled. Counts stay tensors on the device: no host sync.
Adding ground-truth boxes as proposals is the caller's job (do it before
assignment or append them with IoU 1.0).

The samplers are modules passed in (``libra.presets`` builds them from the preset's ``sampler``,
``pos_sampler`` and ``neg_sampler``); any module with the interface of
:class:`~libra.samplers.random_sampler.RandomSampler` plugs in.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .random_sampler import RandomSampler


def sample_pos_neg(
    gt_inds: Tensor,
    max_overlaps: Tensor,
    num: int,
    pos_fraction: float,
    pos_sampler: nn.Module | None = None,
    neg_sampler: nn.Module | None = None,
    neg_pos_ub: float = -1,
    labels: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Choose the positives and negatives of one image.

    Args:
        gt_inds: ``[N]`` int64 assignment (-1 ignored, 0 negative, ``i + 1`` gt i).
        max_overlaps: ``[N]`` float max IoU of each box (read by the IoU-balanced sampler).
        num: total number of samples wanted (RPN 256, R-CNN 512).
        pos_fraction: largest share of positives (RPN 0.5, R-CNN 0.25).
        pos_sampler, neg_sampler: sampler modules (the interface of
            :class:`~libra.samplers.random_sampler.RandomSampler`); None: random.
        neg_pos_ub: cap negatives at ``neg_pos_ub * max(1, #sampled positives)``; < 0 disables.
        labels: ``[N]`` int64 gt label per box (read by the class-balanced positive sampler).
        generator: optional ``torch.Generator`` for reproducible draws.

    Returns:
        ``(pos_mask, neg_mask)``, two disjoint ``[N]`` bool masks.
    """
    if gt_inds.dim() != 1 or gt_inds.is_floating_point() or gt_inds.dtype == torch.bool:
        raise ValueError(f"gt_inds must be a [N] int64 tensor, got {gt_inds.dtype} {tuple(gt_inds.shape)}")
    if max_overlaps.shape != gt_inds.shape:
        raise ValueError(
            f"max_overlaps must have the shape of gt_inds {tuple(gt_inds.shape)}, got {tuple(max_overlaps.shape)}"
        )
    if num < 0 or not 0.0 <= pos_fraction <= 1.0:
        raise ValueError(f"need num >= 0 and 0 <= pos_fraction <= 1, got num={num}, pos_fraction={pos_fraction}")
    for name, sampler in (("pos_sampler", pos_sampler), ("neg_sampler", neg_sampler)):
        if sampler is not None and not callable(sampler):
            raise ValueError(f"{name} must be a sampler module (libra.samplers), got {type(sampler).__name__}")
    pos_sampler = pos_sampler if pos_sampler is not None else _RANDOM
    neg_sampler = neg_sampler if neg_sampler is not None else _RANDOM
    assignment = dict(gt_inds=gt_inds, max_overlaps=max_overlaps, labels=labels, generator=generator)

    num_expected_pos = int(num * pos_fraction)
    pos_mask = pos_sampler(gt_inds > 0, num_expected_pos, **assignment)

    num_pos = pos_mask.sum()  # a device tensor: the negative count is computed without a sync
    num_expected_neg = num - num_pos
    if neg_pos_ub >= 0:
        neg_upper_bound = torch.floor(num_pos.clamp(min=1).to(torch.float64) * neg_pos_ub).to(torch.long)
        num_expected_neg = torch.minimum(num_expected_neg, neg_upper_bound)
    neg_mask = neg_sampler(gt_inds == 0, num_expected_neg, **assignment)
    return pos_mask, neg_mask


_RANDOM = RandomSampler()
