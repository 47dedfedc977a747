"""Divergence forensics: when training produces NaN / inf, say what diverged and where.

A non-finite loss or gradient, and any error of the forward / backward pass that comes with
non-finite weights or activations (e.g. NaN proposals reaching an op that rejects them), raise
:class:`NonFiniteLossError` ("training diverged ...": exit code 3 in ``train.py``) naming the
iteration, the quantity and, for activations, the first module whose output is not finite.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from libra.structures import Batch

from .rng import get_rng_state, set_rng_state


class NonFiniteLossError(RuntimeError):
    """Training diverged (a loss, gradient, weight or activation became NaN or infinite): training stops.

    ``rank_local`` is True when only this process found it (an error of its own forward pass);
    otherwise every process raises it together (the checks run on all-reduced values).
    """

    def __init__(self, message: str, rank_local: bool = False) -> None:
        super().__init__(message)
        self.rank_local = rank_local


def _first_non_finite(obj: Any, depth: int = 0) -> str | None:
    """Describe the first NaN / inf floating tensor inside ``obj`` (tensors, sequences, dicts, simple
    objects such as dataclasses); None when all are finite."""
    if depth > 4:
        return None
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and obj.numel() and not bool(torch.isfinite(obj).all()):
            kind = "NaN" if bool(torch.isnan(obj).any()) else "inf"
            return f"{kind} in a {list(obj.shape)} tensor"
        return None
    if isinstance(obj, dict):
        items = obj.values()
    elif isinstance(obj, (list, tuple)):
        items = obj
    elif hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)):
        items = vars(obj).values()
    else:
        return None
    for item in items:
        found = _first_non_finite(item, depth + 1)
        if found:
            return found
    return None


def max_parameter_norm(model: torch.nn.Module) -> float:
    """The largest parameter norm (inf when any is not finite): one fused norm, one host sync."""
    with torch.no_grad():
        norms = torch.stack(torch._foreach_norm([p.detach().float() for p in model.parameters()]))
    return float(norms.max()) if bool(torch.isfinite(norms).all()) else math.inf

def first_non_finite_output(model: torch.nn.Module, batch: Batch, rng: dict | None, device: torch.device, amp: bool) -> str | None:
    """Run the failed forward pass again (the generator states of its start when known, no autograd,
    no DDP) with a hook on every module; the first (innermost) module whose output holds NaN / inf."""
    from .trainer import autocast_context  # the loop's own autocast policy (the trainer imports this module)

    module = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    names = {m: n or type(module).__name__ for n, m in module.named_modules()}
    found: list[str] = []

    def hook(mod, inputs, output):  # noqa: ARG001
        if not found:
            what = _first_non_finite(output)
            if what:
                found.append(f"{names.get(mod, type(mod).__name__)} ({what})")

    handles = [m.register_forward_hook(hook) for m in module.modules()]
    after = get_rng_state(device)
    try:
        if rng is not None:
            set_rng_state(rng, device)
        with torch.no_grad(), autocast_context(device, amp):
            module.loss(batch)
    except Exception:  # noqa: BLE001 - expected: it is the failing pass
        pass
    finally:
        for handle in handles:
            handle.remove()
        set_rng_state(after, device)
    return found[0] if found else None

def raise_if_diverged(
    model: torch.nn.Module,
    iteration: int,
    epoch: int,
    error: BaseException,
    where: str,
    batch: Batch | None = None,
    rng: dict | None = None,
    device: torch.device | None = None,
    amp: bool = False,
) -> None:
    """An error of the forward / backward pass is reported as divergence (``NonFiniteLossError``)
    when there is evidence of non-finite values: non-finite or huge weights, a non-finite
    gradient, or a module whose output holds NaN / inf when the pass is run again on the same
    (finite) inputs, e.g. NaN proposals that an op downstream rejects. Without such evidence it
    returns and the caller re-raises the error as it is (a bad input's message, or a bug's
    traceback): the error text alone is not trusted (input checks also say "not finite")."""
    text = " ".join(str(error).split()) or type(error).__name__
    if len(text) > 300:
        text = text[:300] + " ..."
    head = f"training diverged at iteration {iteration + 1} (epoch {epoch + 1})"
    advice = "lower --lr or set --grad-clip"
    max_norm = max_parameter_norm(model)
    if not math.isfinite(max_norm) or max_norm > 1e15:
        raise NonFiniteLossError(
            f"{head}: the weights are non-finite or huge (max parameter norm {max_norm:.3g}) and the {where} failed "
            f"({text}); {advice}",
            rank_local=True,
        ) from error
    if where == "backward pass":
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if grads and not bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()):
            raise NonFiniteLossError(
                f"{head}: non-finite gradients and the backward pass failed ({text}); {advice}", rank_local=True
            ) from error
    # Non-finite inputs are the data's fault (the detector rejects them: exit code 1, "bad input").
    if batch is not None and bool(torch.isfinite(batch.images).all()) and _first_non_finite(batch.targets) is None:
        culprit = first_non_finite_output(model, batch, rng, device, amp)
        if culprit is not None:
            raise NonFiniteLossError(
                f"{head}: non-finite activations (first in the output of {culprit}; weights finite, max parameter "
                f"norm {max_norm:.3g}) and the {where} failed ({text}); {advice}",
                rank_local=True,
            ) from error

def check_gradients(model: torch.nn.Module, iteration: int, epoch: int) -> None:
    """Stop before the step when a gradient is NaN/inf although the loss was finite.

    One fused per-tensor norm (``torch._foreach_norm``) and one host sync; the names of
    the offending parameters are only looked up when something is wrong.
    """
    named = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
    if not named:
        return
    norms = torch.stack(torch._foreach_norm([g for _, g in named]))
    if bool(torch.isfinite(norms).all()):
        return
    finite = torch.isfinite(norms).tolist()
    names = [n for (n, _), ok in zip(named, finite) if not ok]
    raise NonFiniteLossError(
        f"training diverged: non-finite gradient at iteration {iteration + 1} (epoch {epoch + 1}) in "
        f"{', '.join(names[:3])}{' ...' if len(names) > 3 else ''} ({len(names)} parameters); "
        "lower --lr, set --grad-clip, or check the data"
    )
