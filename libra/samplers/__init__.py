"""Samplers: choose which assigned boxes enter the losses (one concept per file).

All are stateless functions on ``[N]`` masks that run on the inputs' device
without host synchronisation, with an optional ``torch.Generator``.
"""

from .class_balanced_pos_sampler import class_balanced_pos_sample
from .instance_balanced_pos_sampler import instance_balanced_pos_sample
from .iou_balanced_neg_sampler import IoUBalancedNegSampler, iou_balanced_neg_sample
from .random_sampler import random_sample
from .sample_pos_neg import sample_pos_neg

__all__ = [
    "IoUBalancedNegSampler",
    "class_balanced_pos_sample",
    "instance_balanced_pos_sample",
    "iou_balanced_neg_sample",
    "random_sample",
    "sample_pos_neg",
]
