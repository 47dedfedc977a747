"""Standard detection losses: smooth L1, L1, softmax CE and sigmoid (binary) CE.

Conventions shared by all losses of ``libra.losses``:

* Regression functions (``smooth_l1_loss``, ``l1_loss``) are elementwise: they return
  the unreduced loss with the shape of ``pred``; their modules reduce.
* Classification functions (``cross_entropy``, ``binary_cross_entropy_with_logits``)
  take ``weight`` and ``avg_factor`` and return a scalar.
* Reduction is ``sum(loss * weight) / avg_factor``, or the mean over elements when
  ``avg_factor`` is None (see ``weighted_sum``). Modules multiply by ``loss_weight``.

Depends on torch only, so this file can be copied into another code base.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "weighted_sum",
    "smooth_l1_loss",
    "l1_loss",
    "cross_entropy",
    "binary_cross_entropy_with_logits",
    "SmoothL1Loss",
    "L1Loss",
    "CrossEntropyLoss",
]


def weighted_sum(loss: Tensor, weight: Tensor | None = None, avg_factor: float | Tensor | None = None) -> Tensor:
    """sum(loss * weight) / avg_factor; the mean over elements when avg_factor is None.

    Args:
        loss: unreduced loss, e.g. [N, 4] or [N].
        weight: None, the shape of ``loss``, or its leading dimensions (e.g. [N] for an
            [N, 4] loss, broadcast over the trailing ones).
        avg_factor: python number or 0-dim tensor (kept on the device, no host sync).
            It is clamped to a tiny positive number so that an empty batch
            (avg_factor 0, sum 0) gives 0 instead of NaN. The mean of an empty loss is 0.

    Returns:
        Scalar tensor.
    """
    if weight is not None:
        if weight.shape != loss.shape:
            if weight.dim() > loss.dim() or weight.shape != loss.shape[: weight.dim()]:
                raise ValueError(
                    f"weight shape {tuple(weight.shape)} must equal the loss shape {tuple(loss.shape)} "
                    "or its leading dimensions"
                )
            weight = weight.reshape(weight.shape + (1,) * (loss.dim() - weight.dim()))
        loss = loss * weight
    if avg_factor is None:
        return loss.sum() / max(loss.numel(), 1)
    if isinstance(avg_factor, Tensor):
        return loss.sum() / avg_factor.to(loss.dtype).clamp(min=torch.finfo(loss.dtype).tiny)
    return loss.sum() / max(float(avg_factor), torch.finfo(loss.dtype).tiny)


def _check_same_shape(pred: Tensor, target: Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}"
        )


def smooth_l1_loss(pred: Tensor, target: Tensor, beta: float = 1.0) -> Tensor:
    """Elementwise smooth L1 (Eq. 11 with threshold beta): 0.5 x^2 / beta if x < beta, else x - 0.5 beta.

    pred, target: same shape; returns the unreduced loss. beta must be > 0 (use ``l1_loss`` for 0).
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0 (use l1_loss for plain L1), got {beta}")
    _check_same_shape(pred, target)
    x = torch.abs(pred - target)
    return torch.where(x < beta, 0.5 * x * x / beta, x - 0.5 * beta)


def l1_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Elementwise |pred - target| (the RPN box loss). Returns the unreduced loss."""
    _check_same_shape(pred, target)
    return torch.abs(pred - target)


def cross_entropy(
    logits: Tensor, labels: Tensor, weight: Tensor | None = None, avg_factor: float | Tensor | None = None
) -> Tensor:
    """Softmax cross-entropy reduced to a scalar.

    Args:
        logits: [N, C+1] (background is the last column).
        labels: [N] int64 in [0, C].
        weight: [N] per-sample weights or None.
        avg_factor: divisor of the weighted sum; None means the mean over the N samples.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, C+1], got shape {tuple(logits.shape)}")
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0] or labels.dtype != torch.int64:
        raise ValueError(
            f"labels must be int64 [N] with N = {logits.shape[0]}, got {labels.dtype} {tuple(labels.shape)}"
        )
    if weight is not None and weight.shape != labels.shape:
        raise ValueError(f"weight must be [N] = {tuple(labels.shape)}, got {tuple(weight.shape)}")
    loss = F.cross_entropy(logits, labels, reduction="none")
    return weighted_sum(loss, weight, avg_factor)


def binary_cross_entropy_with_logits(
    logits: Tensor, targets: Tensor, weight: Tensor | None = None, avg_factor: float | Tensor | None = None
) -> Tensor:
    """Sigmoid binary cross-entropy reduced to a scalar (e.g. the RPN objectness loss).

    Args:
        logits: any shape, e.g. [N] anchor scores.
        targets: same shape, float in [0, 1].
        weight: same shape (or its leading dims) or None, e.g. the sampled-anchor mask.
        avg_factor: divisor of the weighted sum; None means the mean over elements.
    """
    _check_same_shape(logits, targets)
    loss = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none")
    return weighted_sum(loss, weight, avg_factor)


class SmoothL1Loss(nn.Module):
    """loss_weight * sum(smooth_l1(pred, target) * weight) / avg_factor."""

    def __init__(self, beta: float = 1.0, loss_weight: float = 1.0):
        super().__init__()
        if not beta > 0:
            raise ValueError(f"beta must be > 0 (use L1Loss for plain L1), got {beta}")
        self.beta = beta
        self.loss_weight = loss_weight

    def forward(
        self, pred: Tensor, target: Tensor, weight: Tensor | None = None, avg_factor: float | Tensor | None = None
    ) -> Tensor:
        """pred, target: [N, 4]; weight: [N, 4] or [N] or None; returns a scalar."""
        return self.loss_weight * weighted_sum(smooth_l1_loss(pred, target, self.beta), weight, avg_factor)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, loss_weight={self.loss_weight}"


class L1Loss(nn.Module):
    """loss_weight * sum(|pred - target| * weight) / avg_factor."""

    def __init__(self, loss_weight: float = 1.0):
        super().__init__()
        self.loss_weight = loss_weight

    def forward(
        self, pred: Tensor, target: Tensor, weight: Tensor | None = None, avg_factor: float | Tensor | None = None
    ) -> Tensor:
        """pred, target: [N, 4]; weight: [N, 4] or [N] or None; returns a scalar."""
        return self.loss_weight * weighted_sum(l1_loss(pred, target), weight, avg_factor)

    def extra_repr(self) -> str:
        return f"loss_weight={self.loss_weight}"


class CrossEntropyLoss(nn.Module):
    """loss_weight * softmax cross-entropy (see ``cross_entropy``)."""

    def __init__(self, loss_weight: float = 1.0):
        super().__init__()
        self.loss_weight = loss_weight

    def forward(
        self, logits: Tensor, labels: Tensor, weight: Tensor | None = None, avg_factor: float | Tensor | None = None
    ) -> Tensor:
        """logits: [N, C+1]; labels: [N] int64; weight: [N] or None; returns a scalar."""
        return self.loss_weight * cross_entropy(logits, labels, weight, avg_factor)

    def extra_repr(self) -> str:
        return f"loss_weight={self.loss_weight}"


class SigmoidCrossEntropyLoss(nn.Module):
    """loss_weight * sigmoid cross-entropy over all C + 1 outputs (one-vs-all, summed per sample).

    The classification loss that bucketed class re-weighting (paper Sec. 3.3.3, Eq. 20) re-weights;
    with all class weights 1 the two are equal. ``use_sigmoid`` tells the R-CNN head to score
    detections with per-class sigmoids instead of a softmax.
    """

    use_sigmoid = True

    def __init__(self, loss_weight: float = 1.0):
        super().__init__()
        self.loss_weight = loss_weight

    def forward(
        self, logits: Tensor, labels: Tensor, weight: Tensor | None = None, avg_factor: float | Tensor | None = None
    ) -> Tensor:
        """logits: [N, C+1] (background last); labels: [N] int64 in [0, C]; weight: [N] or None."""
        # scatter rather than F.one_hot: one_hot reads labels.max() on the host
        targets = torch.zeros_like(logits).scatter_(1, labels.long()[:, None], 1.0)
        per_sample = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(dim=1)
        return self.loss_weight * weighted_sum(per_sample, weight, avg_factor)

    def extra_repr(self) -> str:
        return f"loss_weight={self.loss_weight}"
