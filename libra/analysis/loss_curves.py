"""Fig. 5 of the paper: gradient and loss curves of balanced L1 (and LGR-L1) against smooth L1,
and LGR-CE's re-weighted cross-entropy gradient against plain CE.

Every value is computed from libra's loss *modules* (``libra.losses``) by autograd, so the figure
checks the code, not a re-typed formula:

- the gradient of a regression loss at ``|x|`` is ``d loss / d pred`` for ``pred = x, target = 0``;
- the per-element loss value is ``d (sum_i w_i l_i) / d w_i`` (every libra loss is linear in its
  ``weight`` argument), so one backward pass gives all values without reducing them first;
- for classification, two logits ``(ln(1 - q), ln q)`` with label 0 give ``p_label = 1 - q``; the
  gradient norm on the label's logit is ``q`` for CE (Eq. 17) and ``alpha * ln(b q + 1)`` for
  LGR-CE (Eq. 18-19).

Closed forms they must match (Sec. 3.3.1, Eq. 8-10, with ``b = e^(gamma/alpha) - 1``): balanced L1
gradient ``alpha * ln(b|x|/beta + 1)`` for ``|x| < beta`` (Eq. 8 at beta 1), else ``gamma``; loss
``alpha/b (b|x| + 1) ln(b|x|/beta + 1) - alpha|x|``, else ``gamma|x| + gamma/b - alpha beta`` (Eq. 9).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from libra.losses import BalancedL1Loss, CrossEntropyLoss, LGRCrossEntropyLoss, LGRL1Loss, SmoothL1Loss

from ._io import new_figure, save_outputs


def regression_curve(loss: nn.Module, errors: Tensor) -> tuple[Tensor, Tensor]:
    """``(loss values [M], gradients [M])`` of a regression loss module at the errors ``|x|`` ``[M]``.

    The module is called once as ``loss(pred=x, target=0, weight=1, avg_factor=1)``; autograd
    gives the gradient with respect to ``pred`` (the curve of Fig. 5a) and with respect to
    ``weight`` (the elementwise loss, Fig. 5b).
    """
    pred = errors.detach().double().clone().requires_grad_(True)
    weight = torch.ones_like(pred, requires_grad=True)
    total = loss(pred, torch.zeros_like(pred), weight, 1.0)
    grad_pred, grad_weight = torch.autograd.grad(total, (pred, weight))
    return grad_weight.detach(), grad_pred.detach()


def classification_curve(loss: nn.Module, hardness: Tensor) -> tuple[Tensor, Tensor]:
    """``(loss values [M], gradient norms [M])`` of a softmax classification loss module at
    ``q = 1 - p_label`` ``[M]`` (in (0, 1)): the norm is ``|d loss / d z_label|``."""
    q = hardness.detach().double()
    logits = torch.stack([torch.log1p(-q), torch.log(q)], dim=1).requires_grad_(True)  # softmax -> (1 - q, q)
    labels = torch.zeros(q.shape[0], dtype=torch.int64)
    weight = torch.ones_like(q, requires_grad=True)
    total = loss(logits, labels, weight, 1.0)
    grad_logits, grad_weight = torch.autograd.grad(total, (logits, weight))
    return grad_weight.detach(), grad_logits[:, 0].abs().detach()


def loss_curves(
    alpha: float = 0.5,
    gamma: float = 1.5,
    beta: float = 1.0,
    ce_alpha: float = 0.8,
    ce_gamma: float = 1.0,
    extra_alphas: Sequence[float] = (),
    max_error: float | None = None,
    points: int = 301,
) -> dict:
    """The data of Fig. 5 (paper defaults: balanced L1 alpha 0.5, gamma 1.5, beta 1.0, Sec. 3.3.1;
    LGR-CE alpha 0.8, gamma 1.0, Table 7).

    Returns:
        ``{"parameters", "errors" [M], "regression": {name: {"loss", "gradient"}}, "hardness" [M2],
        "classification": {name: {"loss", "gradient", "weight"?}}}`` as lists.
    """
    max_error = max_error if max_error is not None else 2.0 * beta
    errors = torch.linspace(0.0, max_error, points, dtype=torch.float64)
    modules: dict[str, nn.Module] = {
        f"smooth L1 (beta={beta:g})": SmoothL1Loss(beta=beta),
        f"balanced L1 (alpha={alpha:g}, gamma={gamma:g})": BalancedL1Loss(alpha=alpha, gamma=gamma, beta=beta),
        f"LGR-L1 (alpha={alpha:g}, gamma={gamma:g})": LGRL1Loss(alpha=alpha, gamma=gamma, beta=beta),
    }
    for extra in extra_alphas:
        modules[f"balanced L1 (alpha={extra:g}, gamma={gamma:g})"] = BalancedL1Loss(alpha=extra, gamma=gamma, beta=beta)
    regression = {}
    for name, module in modules.items():
        values, grads = regression_curve(module, errors)
        regression[name] = {"loss": values.tolist(), "gradient": grads.tolist()}

    hardness = torch.linspace(0.005, 0.995, 199, dtype=torch.float64)
    classification = {}
    for name, module in (("CE", CrossEntropyLoss()), (f"LGR-CE (alpha={ce_alpha:g}, gamma={ce_gamma:g})",
                                                       LGRCrossEntropyLoss(alpha=ce_alpha, gamma=ce_gamma))):
        values, grads = classification_curve(module, hardness)
        classification[name] = {"loss": values.tolist(), "gradient": grads.tolist()}
    ce_name, lgr_name = list(classification)
    ce_grad = torch.tensor(classification[ce_name]["gradient"])
    classification[lgr_name]["weight"] = (torch.tensor(classification[lgr_name]["gradient"]) / ce_grad).tolist()
    return {
        "parameters": {"alpha": alpha, "gamma": gamma, "beta": beta, "ce_alpha": ce_alpha, "ce_gamma": ce_gamma,
                       "extra_alphas": list(extra_alphas)},
        "errors": errors.tolist(),
        "regression": regression,
        "hardness": hardness.tolist(),
        "classification": classification,
    }


def plot_loss_curves(data: dict, path: str | Path) -> tuple[Path, Path]:
    """Fig. 5 (a) gradient and (b) loss against ``|x|``, smooth L1 dashed; (c) the CE / LGR-CE
    gradient norm on the label logit against ``q = 1 - p_label`` and LGR-CE's weight rho; PNG + JSON."""
    errors = data["errors"]
    figure = new_figure(13.0, 4.0)
    grad_axes = figure.add_subplot(1, 3, 1)
    loss_axes = figure.add_subplot(1, 3, 2)
    colours = ["#1f77b4", "#d62728", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2"]
    for index, (name, curve) in enumerate(data["regression"].items()):
        smooth = name.startswith("smooth")
        style = {"color": "black", "linestyle": "--"} if smooth else {"color": colours[(index - 1) % len(colours)]}
        if name.startswith("LGR"):
            style["linestyle"] = ":"
            style["linewidth"] = 2.5
        grad_axes.plot(errors, curve["gradient"], label=name, **style)
        loss_axes.plot(errors, curve["loss"], label=name, **style)
    beta = data["parameters"]["beta"]
    for axes, what in ((grad_axes, "(a) gradient d L / d x"), (loss_axes, "(b) loss L(x)")):
        axes.axvline(beta, color="0.6", linewidth=0.8)
        axes.set_xlabel("regression error |x|")
        axes.set_title(what, fontsize=10)
        axes.grid(color="0.9")
        axes.legend(fontsize=7)
    cls_axes = figure.add_subplot(1, 3, 3)
    q = data["hardness"]
    for name, curve in data["classification"].items():
        style = {"color": "black", "linestyle": "--"} if name == "CE" else {"color": "#2ca02c"}
        cls_axes.plot(q, curve["gradient"], label=f"{name}: |d L / d z_label|", **style)
        if "weight" in curve:
            cls_axes.plot(q, curve["weight"], label=f"{name}: weight rho (Eq. 18)", color="#2ca02c", linestyle=":")
    cls_axes.set_xlabel("q = 1 - p_label (hardness)")
    cls_axes.set_title("(c) LGR-CE vs CE (Eq. 17-19)", fontsize=10)
    cls_axes.grid(color="0.9")
    cls_axes.legend(fontsize=7)
    figure.tight_layout()
    return save_outputs(figure, data, path)
