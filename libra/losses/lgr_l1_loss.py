"""LGR-L1: logarithmic gradient re-weighting of smooth L1 (Sec. 3.3.2, Eq. 11-14).

An equivalent variant of the balanced L1 loss: instead of integrating the promoted
gradient G_b (Eq. 8) into a new loss, keep smooth L1 (Eq. 11, gradient G_s, Eq. 12) and
multiply it by the *detached* ratio rho = G_b / G_s (Eq. 13). The gradient of
rho * L_s is then rho * G_s = G_b, the balanced L1 gradient (Eq. 14), while the loss
value stays that of a re-weighted smooth L1.

Depends on torch only, so this file can be copied into another code base.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["lgr_l1_loss", "LGRL1Loss"]

# Added to G_s so that rho stays finite at x = 0 (where G_b is 0 as well, so rho -> 0 there).
_EPS = 1e-6


def _check_parameters(alpha: float, gamma: float, beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0 (it is the inlier/outlier threshold), got {beta}")
    if not alpha > 0 or not gamma > 0:
        raise ValueError(f"alpha and gamma must be > 0, got alpha={alpha}, gamma={gamma}")


def lgr_l1_loss(
    pred: Tensor, target: Tensor, alpha: float = 0.5, gamma: float = 1.5, beta: float = 1.0
) -> Tensor:
    """Elementwise LGR-L1 loss rho * smoothL1(x) (Eq. 14), x = |pred - target|.

    smoothL1(x) = 0.5 x^2 / beta for x < beta, else x - 0.5 beta (Eq. 11);
    G_s = x / beta for x < beta, else 1 (Eq. 12);
    G_b = alpha * ln(b x / beta + 1) for x < beta, else gamma (Eq. 8), b = e^(gamma/alpha) - 1;
    rho = G_b / (G_s + 1e-6), detached (Eq. 13).

    The gradient w.r.t. pred is sign(pred - target) * G_b * G_s / (G_s + 1e-6), i.e. the
    balanced L1 gradient of Eq. 8 up to the 1e-6.

    Args:
        pred, target: tensors of the same shape, e.g. [N, 4] box deltas.
        alpha, gamma, beta: as in the balanced L1 loss (defaults 0.5, 1.5, 1.0).

    Returns:
        Tensor with the shape of ``pred``: the unreduced loss.
    """
    _check_parameters(alpha, gamma, beta)
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    b = math.exp(gamma / alpha) - 1.0  # Eq. 10
    x = torch.abs(pred - target)
    is_inlier = x < beta
    smooth_l1 = torch.where(is_inlier, 0.5 * x * x / beta, x - 0.5 * beta)  # Eq. 11
    with torch.no_grad():  # rho is a constant for the optimiser (Eq. 13, "detach")
        grad_smooth_l1 = torch.where(is_inlier, x / beta, torch.ones_like(x))  # Eq. 12
        grad_balanced_l1 = torch.where(is_inlier, alpha * torch.log1p(b * x / beta), torch.full_like(x, gamma))
        rho = grad_balanced_l1 / (grad_smooth_l1 + _EPS)
    return rho * smooth_l1


def _weighted_sum(loss: Tensor, weight: Tensor | None, avg_factor: float | Tensor | None) -> Tensor:
    """sum(loss * weight) / avg_factor; the mean over elements when avg_factor is None.

    ``weight`` has the shape of ``loss`` or its leading dims (broadcast over the rest).
    ``avg_factor`` is clamped to a tiny positive number so an empty batch gives 0, not NaN.
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


class LGRL1Loss(nn.Module):
    """LGR-L1 loss module: loss_weight * sum(rho * L_s * weight) / avg_factor (Eq. 14)."""

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
        loss = lgr_l1_loss(pred, target, self.alpha, self.gamma, self.beta)
        return self.loss_weight * _weighted_sum(loss, weight, avg_factor)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, beta={self.beta}, loss_weight={self.loss_weight}"
