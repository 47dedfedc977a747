"""Uniform random sampling on masks, without host synchronisation.

This file is also the toolbox of the other samplers in this folder: they rank
candidates with :func:`random_ranks` and take "the first k of each group" with
:func:`random_sample_per_group`.

How it stays on the device: instead of gathering candidate indices (which
needs ``nonzero()``, whose output size must be read back to the host), every
element gets a random key ``torch.rand(N)``. Sorting by ``(group, key)`` with
non-candidates last gives each candidate a uniformly random rank among the
candidates of its group; "choose k uniformly without replacement" is then just
``rank < k``. All shapes are static (``N``), so ``k`` may be a Python int or a
tensor already on the device (e.g. the number of sampled positives).

Under random sampling each of the M candidates is chosen with probability
p = N / M (paper Eq. 1).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _random_keys(num: int, device: torch.device, generator: torch.Generator | None) -> Tensor:
    """``[num]`` float64 keys uniform in [0, 1), drawn on the generator's device."""
    rand_device = generator.device if generator is not None else device
    return torch.rand(num, generator=generator, device=rand_device).to(device=device, dtype=torch.float64)


def dense_group_ids(groups: Tensor) -> Tensor:
    """Relabel arbitrary int64 group ids as ``0..num_groups-1`` (order preserved).

    Args:
        groups: ``[N]`` integer group id of each element.

    Returns:
        ``[N]`` int64 ids in ``[0, N)`` with equal ids for equal groups.
    """
    order = torch.argsort(groups, stable=True)
    sorted_groups = groups[order]
    is_new_group = torch.ones_like(sorted_groups, dtype=torch.bool)
    is_new_group[1:] = sorted_groups[1:] != sorted_groups[:-1]
    dense_sorted = torch.cumsum(is_new_group.to(torch.long), dim=0) - 1
    return torch.empty_like(dense_sorted).scatter_(0, order, dense_sorted)


def count_per_group(mask: Tensor, group_ids: Tensor) -> Tensor:
    """For each element, how many elements of its group are set in ``mask``.

    Args:
        mask: ``[N]`` bool.
        group_ids: ``[N]`` int64 dense ids in ``[0, N)`` (see :func:`dense_group_ids`).

    Returns:
        ``[N]`` int64 counts.
    """
    counts = torch.zeros(mask.shape[0], dtype=torch.long, device=mask.device)
    counts.scatter_add_(0, group_ids, mask.to(torch.long))
    return counts[group_ids]


def random_ranks(
    candidates: Tensor, group_ids: Tensor | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """A uniformly random rank of each candidate among the candidates of its group.

    Args:
        candidates: ``[N]`` bool.
        group_ids: ``[N]`` int64 dense ids in ``[0, N)``, or None for a single group.
        generator: optional RNG for reproducible draws.

    Returns:
        ``[N]`` int64: for candidates a random permutation of ``0..m_g-1`` within each
        group g of m_g candidates; meaningless (but >= 0) for non-candidates.
    """
    num = candidates.shape[0]
    device = candidates.device
    keys = _random_keys(num, device, generator)
    if group_ids is None:
        group_ids = torch.zeros(num, dtype=torch.long, device=device)
    # Sort by (group, key): group ids are integers and keys lie in [0, 1), so their
    # sum orders by group first; float64 holds it exactly. Non-candidates go last.
    sort_key = torch.where(candidates, group_ids.to(torch.float64) + keys, torch.full_like(keys, float("inf")))
    order = torch.argsort(sort_key)
    position = torch.empty_like(order).scatter_(0, order, torch.arange(num, device=device))
    # Candidates of group g occupy positions [start_g, start_g + m_g) of the sorted order.
    counts = torch.zeros(num, dtype=torch.long, device=device).scatter_add_(0, group_ids, candidates.to(torch.long))
    starts = torch.cumsum(counts, dim=0) - counts
    return position - starts[group_ids]


def random_sample_per_group(
    candidates: Tensor,
    group_ids: Tensor | None,
    quota: int | Tensor,
    generator: torch.Generator | None = None,
) -> Tensor:
    """In each group, choose ``min(#candidates, quota)`` candidates uniformly without replacement.

    Args:
        candidates: ``[N]`` bool.
        group_ids: ``[N]`` int64 dense ids in ``[0, N)``, or None for a single group.
        quota: int, 0-dim int64 tensor, or ``[N]`` tensor giving each element's group quota.
        generator: optional RNG.

    Returns:
        ``[N]`` bool, a subset of ``candidates``.
    """
    return candidates & (random_ranks(candidates, group_ids, generator) < quota)


def random_sample(
    candidates: Tensor, num_expected: int | Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """Choose ``min(#candidates, num_expected)`` candidates uniformly without replacement (Eq. 1).

    Args:
        candidates: ``[N]`` bool mask of the elements that may be chosen.
        num_expected: how many to choose: Python int or 0-dim int64 tensor on the device.
        generator: optional ``torch.Generator`` for reproducible draws.

    Returns:
        ``[N]`` bool mask of the chosen elements (a subset of ``candidates``).
    """
    if candidates.dim() != 1 or candidates.dtype != torch.bool:
        raise ValueError(f"candidates must be a [N] bool mask, got {candidates.dtype} {tuple(candidates.shape)}")
    return random_sample_per_group(candidates, None, num_expected, generator)


class RandomSampler(nn.Module):
    """Module form of :func:`random_sample`: the baseline sampler of both positives and negatives
    (MMDetection ``RandomSampler``). The sampler interface every sampler module of this folder
    implements (so a head can take any of them, and a new one is one file plus a preset entry)::

        sampler(candidates [N] bool, num_expected int | 0-dim tensor, *, gt_inds [N] int64,
                max_overlaps [N] float, labels [N] int64 | None, generator) -> [N] bool

    returning a subset of ``candidates`` of at most ``num_expected`` elements, on the device
    without host synchronisation. ``gt_inds`` (-1 ignored, 0 negative, ``i + 1`` gt i),
    ``max_overlaps`` and ``labels`` are the assignment's; a sampler reads what it needs.
    """

    def forward(
        self,
        candidates: Tensor,
        num_expected: int | Tensor,
        *,
        gt_inds: Tensor | None = None,
        max_overlaps: Tensor | None = None,
        labels: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        return random_sample(candidates, num_expected, generator)
