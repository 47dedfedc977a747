"""Sigmoid focal loss (Lin et al., "Focal Loss for Dense Object Detection", the paper's ref. [37]).

RetinaNet's classification loss, and the baseline that Libra R-CNN's logarithmic gradient
re-weighting argues against (paper Sec. 3.3.2): a one-stage detector scores ~100k anchors
per image without sampling, so the many easy negatives dominate the gradient unless their
loss is *down*-weighted, which is what the modulating factor ``(1 - p_t)^gamma`` does; LGR
(512 sampled RoIs, few easy samples) *up*-weights easy samples instead.

Per logit x with binary target t (one-vs-all over the C classes, no background column):

    p = sigmoid(x),  p_t = p if t = 1 else 1 - p,  alpha_t = alpha if t = 1 else 1 - alpha,
    FL = -alpha_t * (1 - p_t)^gamma * ln(p_t)          (Lin et al., Eq. 5)

computed as ``alpha_t * (1 - p_t)^gamma * BCE_with_logits(x, t)`` so that ``ln(p_t)`` never
sees a rounded-to-zero probability. Defaults alpha 0.25, gamma 2.0
(``retinanet_r50_fpn_1x_coco: model.bbox_head.loss_cls`` FocalLoss ``alpha=0.25, gamma=2.0``).

Depends on torch only, so this file can be copied into another code base.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["sigmoid_focal_loss", "SigmoidFocalLoss"]


def _check_parameters(alpha: float, gamma: float) -> None:
    if not (alpha < 0 or 0 <= alpha <= 1):
        raise ValueError(f"alpha must be in [0, 1] (or negative to disable the class weight), got {alpha}")
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Elementwise sigmoid focal loss (module docstring).

    Args:
        logits: any shape, e.g. ``[N, C]`` per-class logits.
        targets: same shape, float in ``[0, 1]`` (1 for the gt class of a positive, else 0).
        alpha: weight of the positive targets (``1 - alpha`` for the negatives); a negative
            value disables the weighting (``alpha_t = 1``), as torchvision's ``alpha=-1``.
        gamma: focusing parameter; 0 gives plain (alpha-weighted) binary cross-entropy.

    Returns:
        The unreduced loss, with the shape of ``logits``.
    """
    _check_parameters(alpha, gamma)
    if logits.shape != targets.shape:
        raise ValueError(
            f"logits and targets must have the same shape, got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    targets = targets.to(logits.dtype)
    probabilities = torch.sigmoid(logits)
    p_t = probabilities * targets + (1 - probabilities) * (1 - targets)
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * (1 - p_t).pow(gamma)
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss


class SigmoidFocalLoss(nn.Module):
    """``loss_weight * sum(FL(logits, one_hot(labels)) * weight) / avg_factor``.

    Args:
        alpha, gamma: see :func:`sigmoid_focal_loss` (0.25, 2.0).
        loss_weight: multiplies the reduced loss (1.0).

    ``use_sigmoid`` marks a loss whose test-time scores are per-class sigmoids.
    """

    use_sigmoid = True

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, loss_weight: float = 1.0) -> None:
        super().__init__()
        _check_parameters(alpha, gamma)
        self.alpha = alpha
        self.gamma = gamma
        self.loss_weight = loss_weight

    def forward(
        self,
        logits: Tensor,
        labels: Tensor,
        weight: Tensor | None = None,
        avg_factor: float | Tensor | None = None,
    ) -> Tensor:
        """Reduce the focal loss of every (sample, class) pair.

        Args:
            logits: ``[..., C]`` per-class logits (e.g. ``[B, N, C]`` for ``N`` anchors).
            labels: ``[...]`` int64 in ``[0, C]``; ``C`` is background (all C targets 0).
            weight: ``[...]`` per-sample weight (0 for ignored samples) or None; it applies to
                all C classes of the sample.
            avg_factor: divisor of the weighted sum (RetinaNet: the number of positives), a
                Python number or a 0-dim tensor (kept on the device); None: the mean over the
                ``[..., C]`` elements. Clamped to a tiny positive number, so that an empty
                batch gives 0 instead of NaN.

        Returns:
            Scalar tensor.
        """
        if labels.shape != logits.shape[:-1]:
            raise ValueError(
                f"labels must have shape {tuple(logits.shape[:-1])} (logits without the class dim), "
                f"got {tuple(labels.shape)}"
            )
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"labels must be integer class indices (background = C), got {labels.dtype}")
        num_classes = logits.shape[-1]
        # One column more for the background label, then dropped: a scatter, not F.one_hot,
        # which reads labels.max() back to the host.
        one_hot = logits.new_zeros((*labels.shape, num_classes + 1))
        one_hot.scatter_(-1, labels.long().unsqueeze(-1), 1.0)
        loss = sigmoid_focal_loss(logits, one_hot[..., :num_classes], self.alpha, self.gamma)
        if weight is not None:
            if weight.shape != labels.shape:
                raise ValueError(f"weight must have the shape of labels {tuple(labels.shape)}, got {tuple(weight.shape)}")
            loss = loss * weight.to(loss.dtype).unsqueeze(-1)
        if avg_factor is None:
            return self.loss_weight * loss.sum() / max(loss.numel(), 1)
        tiny = torch.finfo(loss.dtype).tiny
        if isinstance(avg_factor, Tensor):
            return self.loss_weight * loss.sum() / avg_factor.to(loss.dtype).clamp(min=tiny)
        return self.loss_weight * loss.sum() / max(float(avg_factor), tiny)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, loss_weight={self.loss_weight}"
