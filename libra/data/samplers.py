"""Index samplers for detection training: distributed shuffling, aspect-ratio grouping,
and LVIS repeat-factor sampling. Aspect-ratio grouping with 2 images per GPU is MMDetection's
(`configs/_base_/datasets/coco_detection.py`: `train_dataloader.batch_size=2`,
`batch_sampler=dict(type='AspectRatioBatchSampler')`); repeat-factor sampling is the LVIS
paper's (Gupta et al. 2019), which the paper's LVIS experiments use (Sec. 4.2, Table 9; MMDetection
`mask-rcnn_r50_fpn_sample1e-3_ms-1x_lvis-v1`: `ClassBalancedDataset oversample_thr=1e-3`). The two
round the repeat factor r(I) differently: the LVIS paper stochastically each epoch (floor(r) copies
plus one more with probability r - floor(r)), MMDetection's `ClassBalancedDataset` to ceil(r) copies
every epoch; `RepeatFactorSampler(rounding=...)` does either (`REPEAT_ROUNDINGS`).

All randomness is a pure function of ``(seed, epoch)``: no global RNG state, so every rank
and every resumed run draws the same stream. Samplers yield ``(index, epoch, ...)`` tuples
when ``with_epoch=True``; `libra.data.base.DetectionDataset` seeds each sample's augmentation
from that tuple, which stays correct with persistent DataLoader workers.

Typical use (one process per GPU):

    sampler = InfiniteOrEpochDistributedSampler(len(ds), num_replicas=world, rank=rank, seed=s, with_epoch=True)
    batches = GroupedBatchSampler(sampler, ds.aspect_ratio_flags, batch_size=2)
    loader = DataLoader(ds, batch_sampler=batches, collate_fn=collate, num_workers=4)
    for epoch in range(12):
        batches.set_epoch(epoch)
        for images, targets in loader: ...
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import Sampler


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(int(seed) * 1_000_003 + int(epoch))
    return generator


def _check_rank(num_replicas: int, rank: int) -> None:
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas}, {rank}")


class InfiniteOrEpochDistributedSampler(Sampler):
    """Per-rank share of a (shuffled) permutation of ``range(size)``.

    Each epoch: a permutation seeded by (seed, epoch), padded by wrapping around to a multiple
    of ``num_replicas`` (like torch's DistributedSampler, so every rank gets the same count),
    then rank ``r`` takes positions r, r + R, r + 2R, ...

    Args:
        size: dataset length.
        infinite: iterate epoch after epoch forever (epoch counter starts at `set_epoch`'s value).
        with_epoch: yield ``(index, epoch)`` instead of ``index``.
    """

    def __init__(
        self,
        size: int,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        infinite: bool = False,
        with_epoch: bool = False,
    ) -> None:
        if size <= 0:
            raise ValueError(f"sampler needs a non-empty dataset, got size {size}")
        _check_rank(num_replicas, rank)
        self.size, self.num_replicas, self.rank = int(size), int(num_replicas), int(rank)
        self.shuffle, self.seed, self.infinite, self.with_epoch = shuffle, int(seed), infinite, with_epoch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def indices_for_epoch(self, epoch: int) -> list[int]:
        if self.shuffle:
            order = torch.randperm(self.size, generator=_epoch_generator(self.seed, epoch)).tolist()
        else:
            order = list(range(self.size))
        total = int(math.ceil(self.size / self.num_replicas)) * self.num_replicas
        order = (order * int(math.ceil(total / self.size)))[:total]
        return order[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator:
        epoch = self.epoch
        while True:
            for i in self.indices_for_epoch(epoch):
                yield (i, epoch) if self.with_epoch else i
            if not self.infinite:
                return
            epoch += 1

    def __len__(self) -> int:
        if self.infinite:
            raise TypeError("an infinite sampler has no length")
        return int(math.ceil(self.size / self.num_replicas))


def _index_of(item) -> int:
    return int(item[0]) if isinstance(item, (tuple, list)) else int(item)


class GroupedBatchSampler(Sampler):
    """Batches whose images share an aspect-ratio group (w >= h vs w < h), so padding is small.

    Consumes any index sampler (ints or ``(index, ...)`` tuples) and keeps one buffer per group;
    a buffer that reaches ``batch_size`` is emitted. At the end of a finite pass the partial
    buffers are emitted one per group (every index exactly once, each batch homogeneous) unless
    ``drop_last``. ``merge_tail=True`` instead merges the leftovers into mixed batches so the
    number of batches is exactly ceil(n / batch_size), identical on every rank of
    `InfiniteOrEpochDistributedSampler` (useful for epoch-based multi-GPU training).

    Args:
        sampler: index sampler; its ``set_epoch`` is called by ours.
        group_ids: group of every dataset index (``dataset.aspect_ratio_flags``).
        attach_epoch: wrap plain int indices from ``sampler`` as ``(index, epoch)``.
    """

    def __init__(
        self,
        sampler: Sampler | Sequence,
        group_ids: Sequence[int],
        batch_size: int,
        drop_last: bool = False,
        merge_tail: bool = False,
        attach_epoch: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sampler = sampler
        self.group_ids = list(int(g) for g in group_ids)
        self.batch_size = int(batch_size)
        self.drop_last, self.merge_tail, self.attach_epoch = drop_last, merge_tail, attach_epoch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list]:
        buffers: dict[int, list] = defaultdict(list)
        for item in self.sampler:
            if self.attach_epoch and not isinstance(item, (tuple, list)):
                item = (int(item), self.epoch)
            group = self.group_ids[_index_of(item)]
            buffers[group].append(item)
            if len(buffers[group]) == self.batch_size:
                yield buffers.pop(group)
        if self.drop_last:
            return
        leftovers = [buffers[g] for g in sorted(buffers) if buffers[g]]
        if self.merge_tail:
            flat = [x for b in leftovers for x in b]
            for start in range(0, len(flat), self.batch_size):
                yield flat[start : start + self.batch_size]
        else:
            yield from leftovers

    def __len__(self) -> int:
        """Exact number of batches of the current epoch (runs the index sampler once)."""
        if getattr(self.sampler, "infinite", False):
            raise TypeError("batches over an infinite sampler have no length")
        counts: dict[int, int] = defaultdict(int)
        for item in self.sampler:
            counts[self.group_ids[_index_of(item)]] += 1
        full = sum(c // self.batch_size for c in counts.values())
        if self.drop_last:
            return full
        rest = [c % self.batch_size for c in counts.values() if c % self.batch_size]
        if self.merge_tail:
            return full + int(math.ceil(sum(rest) / self.batch_size))
        return full + len(rest)


# ---- LVIS repeat-factor sampling (Gupta et al. 2019; paper Sec. 4.2, Table 9) -----------------

def image_counts_per_class(image_labels: Sequence[Sequence[int]], num_classes: int) -> Tensor:
    """[C] int64: number of images that contain each class (a class counts once per image)."""
    counts = torch.zeros(num_classes, dtype=torch.int64)
    for labels in image_labels:
        present = sorted(set(int(c) for c in labels))
        if present and (present[0] < 0 or present[-1] >= num_classes):
            raise ValueError(f"labels {present} out of range for {num_classes} classes")
        if present:
            counts[torch.as_tensor(present)] += 1
    return counts


def compute_repeat_factors(
    image_labels: Sequence[Sequence[int]], num_classes: int, threshold: float = 0.001
) -> tuple[Tensor, Tensor]:
    """Repeat factors of LVIS (Gupta et al. 2019).

    r(c) = max(1, sqrt(threshold / f(c))) with f(c) the fraction of images containing c;
    r(I) = max over the classes of image I (1 for an image without labels).

    Returns:
        (image_factors [N] float64, class_factors [C] float64; classes in no image get 1).
    """
    num_images = len(image_labels)
    if num_images == 0:
        raise ValueError("compute_repeat_factors needs at least one image")
    counts = image_counts_per_class(image_labels, num_classes).double()
    freq = counts / num_images
    class_factors = torch.where(
        counts > 0, torch.sqrt(threshold / freq.clamp(min=1e-12)).clamp(min=1.0), torch.ones_like(freq)
    )
    image_factors = torch.ones(num_images, dtype=torch.float64)
    for i, labels in enumerate(image_labels):
        if len(labels):
            image_factors[i] = class_factors[torch.as_tensor(sorted(set(int(c) for c in labels)))].max()
    return image_factors, class_factors


# How a repeat factor becomes a number of copies: "stochastic" (the LVIS paper, Gupta et al. 2019)
# or "ceil" (MMDetection's ClassBalancedDataset: math.ceil of the image's factor, every epoch).
REPEAT_ROUNDINGS = ("stochastic", "ceil")


def ceil_repeats(repeat_factors: Tensor) -> Tensor:
    """[N] int64 repeat counts ceil(r): MMDetection's ``ClassBalancedDataset`` (the same every epoch)."""
    return torch.ceil(repeat_factors).long()


def stochastic_repeats(repeat_factors: Tensor, generator: torch.Generator) -> Tensor:
    """[N] int64 repeat counts: floor(r) + Bernoulli(r - floor(r)), so E[count] = r."""
    whole = torch.floor(repeat_factors)
    frac = repeat_factors - whole
    extra = torch.rand(repeat_factors.shape, generator=generator, dtype=torch.float64) < frac
    return whole.long() + extra.long()


class RepeatFactorSampler(Sampler):
    """Each epoch, image i appears ``stochastic_repeats(r)[i]`` times (``rounding="stochastic"``, the
    LVIS paper) or ``ceil(r[i])`` times (``rounding="ceil"``, MMDetection's ``ClassBalancedDataset``),
    shuffled, split across ranks.

    Draws depend only on (seed, epoch), so all ranks agree on the epoch's list before sharding.
    With ``with_epoch`` the items are ``(index, epoch, k)``: k (the position in the epoch)
    gives repeated copies of an image different augmentations.
    """

    def __init__(
        self,
        repeat_factors: Tensor | Sequence[float],
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        with_epoch: bool = False,
        rounding: str = "stochastic",
    ) -> None:
        _check_rank(num_replicas, rank)
        if rounding not in REPEAT_ROUNDINGS:
            raise ValueError(f"rounding must be one of {', '.join(REPEAT_ROUNDINGS)}, got {rounding!r}")
        self.rounding = rounding
        factors = torch.as_tensor(repeat_factors, dtype=torch.float64)
        if factors.dim() != 1 or factors.numel() == 0 or bool((factors < 0).any()) or not bool(torch.isfinite(factors).all()):
            raise ValueError("repeat_factors must be a non-empty 1-D sequence of finite values >= 0")
        self.repeat_factors = factors
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.shuffle, self.seed, self.with_epoch = shuffle, int(seed), with_epoch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's indices for ``epoch`` (padded by wrap-around to a multiple of the world size)."""
        generator = _epoch_generator(self.seed, epoch)
        if self.rounding == "ceil":
            counts = ceil_repeats(self.repeat_factors)
        else:
            counts = stochastic_repeats(self.repeat_factors, generator)
        indices = torch.repeat_interleave(torch.arange(len(counts)), counts)
        if len(indices) == 0:
            return []
        if self.shuffle:
            indices = indices[torch.randperm(len(indices), generator=generator)]
        order = indices.tolist()
        total = int(math.ceil(len(order) / self.num_replicas)) * self.num_replicas
        order = (order * int(math.ceil(total / len(order))))[:total]
        return order[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator:
        for k, i in enumerate(self.epoch_indices(self.epoch)):
            yield (i, self.epoch, k) if self.with_epoch else i

    def __len__(self) -> int:
        return len(self.epoch_indices(self.epoch))
