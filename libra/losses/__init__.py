"""Losses of Libra R-CNN (Sec. 3.3) and the standard detection losses.

Regression losses are elementwise functions plus modules with
``forward(pred[N,4], target[N,4], weight, avg_factor) -> scalar``; classification
losses take ``(logits[N,C+1], labels[N], weight[N], avg_factor)`` and return a scalar
(the sigmoid focal loss of RetinaNet takes ``logits[..., C]`` without a background column).
Each file depends on torch only.
"""
from .balanced_l1_loss import BalancedL1Loss, balanced_l1_loss
from .basic import (
    CrossEntropyLoss,
    L1Loss,
    SigmoidCrossEntropyLoss,
    SmoothL1Loss,
    binary_cross_entropy_with_logits,
    cross_entropy,
    l1_loss,
    smooth_l1_loss,
    weighted_sum,
)
from .bucketed_class_reweighting import (
    BCR_SAMPLES,
    BCRSigmoidCrossEntropyLoss,
    bcr_sigmoid_cross_entropy,
    bucketed_class_weights,
)
from .focal_loss import SigmoidFocalLoss, sigmoid_focal_loss
from .lgr_cross_entropy_loss import LGRCrossEntropyLoss, lgr_ce_sample_weight, lgr_cross_entropy
from .lgr_l1_loss import LGRL1Loss, lgr_l1_loss

__all__ = [
    "BalancedL1Loss",
    "balanced_l1_loss",
    "LGRL1Loss",
    "lgr_l1_loss",
    "LGRCrossEntropyLoss",
    "lgr_cross_entropy",
    "lgr_ce_sample_weight",
    "SigmoidFocalLoss",
    "sigmoid_focal_loss",
    "BCRSigmoidCrossEntropyLoss",
    "bcr_sigmoid_cross_entropy",
    "BCR_SAMPLES",
    "bucketed_class_weights",
    "SmoothL1Loss",
    "L1Loss",
    "CrossEntropyLoss",
    "SigmoidCrossEntropyLoss",
    "smooth_l1_loss",
    "l1_loss",
    "cross_entropy",
    "binary_cross_entropy_with_logits",
    "weighted_sum",
]
