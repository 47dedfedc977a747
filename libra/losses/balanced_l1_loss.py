"""Balanced L1 loss (Libra R-CNN, Sec. 3.3.1, Eq. 8-10).

The loss is built from the gradient it should have (Eq. 8): inliers (|x| < beta) get a
logarithmically *promoted* gradient alpha * ln(b|x|/beta + 1) instead of smooth L1's |x|,
outliers keep a constant gradient gamma. Integrating Eq. 8 gives Eq. 9, and requiring
both pieces to meet at |x| = beta fixes b through Eq. 10: alpha * ln(b + 1) = gamma.

Depends on torch only, so this file can be copied into another code base.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["balanced_l1_loss", "BalancedL1Loss"]


def _check_parameters(alpha: float, gamma: float, beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0 (it is the inlier/outlier threshold), got {beta}")
    if not alpha > 0 or not gamma > 0:
        raise ValueError(f"alpha and gamma must be > 0, got alpha={alpha}, gamma={gamma}")


def balanced_l1_loss(
    pred: Tensor, target: Tensor, alpha: float = 0.5, gamma: float = 1.5, beta: float = 1.0
) -> Tensor:
    """Elementwise balanced L1 loss (Eq. 9, with the threshold generalised to beta).

    With x = |pred - target| and b = e^(gamma/alpha) - 1 (Eq. 10):

        x < beta:  alpha/b * (b*x + 1) * ln(b*x/beta + 1) - alpha*x
        else:      gamma*x + gamma/b - alpha*beta

    The two pieces agree at x = beta for every beta. For beta = 1 the gradient is
    exactly Eq. 8 (alpha*ln(b*x + 1) below 1, gamma above). For beta != 1 this is the
    formula of the authors' released code as written (used with beta 0.11 in Libra
    RetinaNet); its gradient at 0+ is then alpha/beta - alpha rather than 0.

    Args:
        pred, target: tensors of the same shape, e.g. [N, 4] box deltas.
        alpha: inlier gradient promotion (smaller alpha, larger inlier gradients).
        gamma: outlier gradient (upper bound of the gradient).
        beta: inlier/outlier threshold, > 0.

    Returns:
        Tensor with the shape of ``pred``: the unreduced loss.
    """
    _check_parameters(alpha, gamma, beta)
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    b = math.exp(gamma / alpha) - 1.0  # Eq. 10: alpha * ln(b + 1) = gamma
    x = torch.abs(pred - target)
    # Both branches are finite everywhere (x >= 0), so torch.where gives clean gradients.
    inlier = alpha / b * (b * x + 1) * torch.log1p(b * x / beta) - alpha * x
    outlier = gamma * x + gamma / b - alpha * beta
    return torch.where(x < beta, inlier, outlier)


def _weighted_sum(loss: Tensor, weight: Tensor | None, avg_factor: float | Tensor | None) -> Tensor:
    """sum(loss * weight) / avg_factor; the mean over elements when avg_factor is None.

    ``weight`` has the shape of ``loss`` or its leading dims (e.g. [N] for an [N, 4]
    loss, broadcast over the trailing dims). ``avg_factor`` is clamped to a tiny
    positive number so that an empty batch (avg_factor 0, sum 0) gives 0, not NaN,
    without a host sync. The mean of an empty loss is 0 as well.
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


class BalancedL1Loss(nn.Module):
    """Balanced L1 loss module: loss_weight * sum(L_b * weight) / avg_factor (Eq. 6, 9).

    Defaults are the paper's (alpha 0.5, gamma 1.5, beta 1.0).
    """

    def __init__(self, alpha: float = 0.5, gamma: float = 1.5, beta: float = 1.0, loss_weight: float = 1.0):
        super().__init__()
        _check_parameters(alpha, gamma, beta)
        self.alpha = alpha
        self.gamma = gamma
        self.beta = beta
        self.loss_weight = loss_weight

    def forward(
        self,
        pred: Tensor,
        target: Tensor,
        weight: Tensor | None = None,
        avg_factor: float | Tensor | None = None,
    ) -> Tensor:
        """pred, target: [N, 4]; weight: [N, 4] or [N] or None; returns a scalar."""
        loss = balanced_l1_loss(pred, target, self.alpha, self.gamma, self.beta)
        return self.loss_weight * _weighted_sum(loss, weight, avg_factor)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, beta={self.beta}, loss_weight={self.loss_weight}"
