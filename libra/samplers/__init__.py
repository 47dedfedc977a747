"""Samplers: choose which assigned boxes enter the losses (one concept per file).

Each file holds a stateless function on ``[N]`` masks and its module form; the modules share one
interface (:class:`RandomSampler`), so heads take them as arguments and ``libra.presets`` composes
them (a positive and a negative sampler per stage). All run on the inputs' device without host
synchronisation, with an optional ``torch.Generator``.
"""

from .class_balanced_pos_sampler import ClassBalancedPosSampler, class_balanced_pos_sample
from .instance_balanced_pos_sampler import InstanceBalancedPosSampler, instance_balanced_pos_sample
from .iou_balanced_neg_sampler import IoUBalancedNegSampler, iou_balanced_neg_sample
from .random_sampler import RandomSampler, random_sample
from .sample_pos_neg import sample_pos_neg

__all__ = [
    "ClassBalancedPosSampler",
    "InstanceBalancedPosSampler",
    "IoUBalancedNegSampler",
    "RandomSampler",
    "class_balanced_pos_sample",
    "instance_balanced_pos_sample",
    "iou_balanced_neg_sample",
    "random_sample",
    "sample_pos_neg",
]
