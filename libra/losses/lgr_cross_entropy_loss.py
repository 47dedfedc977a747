"""LGR-CE: logarithmic gradient re-weighting of softmax cross-entropy (Sec. 3.3.2, Eq. 15-19).

For softmax CE the gradient w.r.t. the ground-truth logit has norm q = 1 - p_label
(Eq. 17). LGR replaces that norm by alpha * ln(b*q + 1), i.e. scales the sample's loss by
the detached ratio (Eq. 18-19)

    rho = alpha * ln(b*q + 1) / q,    b = e^(gamma/alpha) - 1.

rho is decreasing in q: it is gamma (= 1 for the paper's alpha 0.8, gamma 1.0) for the
hardest samples (q = 1, since alpha * ln(b + 1) = gamma) and tends to alpha * b (about
1.99 for alpha 0.8) for the easiest (q -> 0). Easy samples are *up*-weighted: the
opposite of focal loss, which the paper attributes to the 512 sampled RoIs of a
two-stage detector not being dominated by easy samples.

Depends on torch only, so this file can be copied into another code base.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["lgr_cross_entropy", "lgr_ce_sample_weight", "LGRCrossEntropyLoss"]

# Added to q so that rho is finite when p_label rounds to exactly 1. For q below ~1e-5
# this pulls rho under its limit alpha*b (to 0 at q = 0), where the CE gradient q is ~0 anyway.
_EPS = 1e-6


def _check_parameters(alpha: float, gamma: float) -> None:
    if not alpha > 0 or not gamma > 0:
        raise ValueError(f"alpha and gamma must be > 0, got alpha={alpha}, gamma={gamma}")


def lgr_ce_sample_weight(hardness: Tensor, alpha: float = 0.8, gamma: float = 1.0) -> Tensor:
    """rho = alpha * ln(b*q + 1) / (q + 1e-6), b = e^(gamma/alpha) - 1 (Eq. 18).

    Args:
        hardness: q = 1 - p_label in [0, 1], any shape.

    Returns:
        rho with the shape of ``hardness`` (not detached: callers pass a detached q).
    """
    _check_parameters(alpha, gamma)
    b = math.exp(gamma / alpha) - 1.0
    return alpha * torch.log1p(b * hardness) / (hardness + _EPS)


def _check_classification_inputs(logits: Tensor, labels: Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, C+1], got shape {tuple(logits.shape)}")
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"labels must be [N] with N = logits.shape[0] = {logits.shape[0]}, got shape {tuple(labels.shape)}"
        )
    if labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64 class indices (background = C), got {labels.dtype}")


def _weighted_sum(loss: Tensor, weight: Tensor | None, avg_factor: float | Tensor | None) -> Tensor:
    """sum(loss * weight) / avg_factor over [N] per-sample losses; the mean when avg_factor is None.

    ``avg_factor`` is clamped to a tiny positive number so an empty batch gives 0, not NaN.
    """
    if weight is not None:
        if weight.shape != loss.shape:
            raise ValueError(f"weight must have shape {tuple(loss.shape)} (one per sample), got {tuple(weight.shape)}")
        loss = loss * weight
    if avg_factor is None:
        return loss.sum() / max(loss.numel(), 1)
    if isinstance(avg_factor, Tensor):
        return loss.sum() / avg_factor.to(loss.dtype).clamp(min=torch.finfo(loss.dtype).tiny)
    return loss.sum() / max(float(avg_factor), torch.finfo(loss.dtype).tiny)


def lgr_cross_entropy(
    logits: Tensor,
    labels: Tensor,
    weight: Tensor | None = None,
    avg_factor: float | Tensor | None = None,
    alpha: float = 0.8,
    gamma: float = 1.0,
) -> Tensor:
    """LGR-weighted softmax cross-entropy, reduced to a scalar (Eq. 19).

    Args:
        logits: [N, C+1] class scores (background is the last column).
        labels: [N] int64 in [0, C].
        weight: [N] per-sample weights or None.
        avg_factor: divisor of the weighted sum; None means the mean over the N samples.
        alpha, gamma: LGR parameters (paper's best 0.8, 1.0; Table 7).

    Returns:
        Scalar sum(rho * CE * weight) / avg_factor, rho detached.
    """
    _check_classification_inputs(logits, labels)
    ce = F.cross_entropy(logits, labels, reduction="none")
    with torch.no_grad():  # rho is a constant for the optimiser
        p_label = torch.softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1)
        rho = lgr_ce_sample_weight(1.0 - p_label, alpha, gamma)
    return _weighted_sum(rho * ce, weight, avg_factor)


class LGRCrossEntropyLoss(nn.Module):
    """LGR-CE loss module: loss_weight * lgr_cross_entropy(...)."""

    def __init__(self, alpha: float = 0.8, gamma: float = 1.0, loss_weight: float = 1.0):
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
        """logits: [N, C+1]; labels: [N] int64; weight: [N] or None; returns a scalar."""
        return self.loss_weight * lgr_cross_entropy(logits, labels, weight, avg_factor, self.alpha, self.gamma)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, loss_weight={self.loss_weight}"
