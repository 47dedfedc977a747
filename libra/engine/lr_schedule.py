"""Learning-rate schedule of the paper's training recipe: linear warmup, then epoch steps.

The paper (Sec. 4.1.2) trains "for 12 epochs with an initial learning rate of 0.02, and
decrease it by 0.1 after 8 and 11 epochs"; the warmup follows mmdetection's defaults
(`configs/_base_/schedules/schedule_1x.py`: `param_scheduler` `LinearLR start_factor=0.001
by_epoch=False end=500`; `MultiStepLR milestones=[8, 11] gamma=0.1`): over the first 500
iterations the lr rises linearly from 0.001 x lr to lr. Steps happen at epoch boundaries
(an epoch's length may vary, e.g. with LVIS repeat-factor sampling); the warmup counts
iterations.

The lr is a pure function of (iteration, epoch), so resuming from a checkpoint only needs
those two counters: there is no hidden scheduler state to restore.
"""
from __future__ import annotations

from bisect import bisect_right
from typing import Sequence

import torch


def warmup_multistep_factor(
    iteration: int,
    epoch: int,
    step_epochs: Sequence[int],
    gamma: float = 0.1,
    warmup_iters: int = 500,
    warmup_ratio: float = 0.001,
) -> float:
    """Multiplier of the base lr for global ``iteration`` (0-based) inside ``epoch`` (0-based).

    step factor = gamma ** (number of milestones <= epoch): with milestones (8, 11) epochs
    0..7 use lr, 8..10 use 0.1 lr, 11 uses 0.01 lr ("decrease by 0.1 after 8 and 11 epochs").
    During warmup (iteration < warmup_iters) the stepped lr is scaled by
    ``warmup_ratio + (1 - warmup_ratio) * iteration / warmup_iters``: exactly ``warmup_ratio``
    at iteration 0, reaching 1 at ``warmup_iters``.
    """
    if iteration < 0 or epoch < 0:
        raise ValueError(f"iteration and epoch must be >= 0, got {iteration}, {epoch}")
    factor = gamma ** bisect_right(sorted(step_epochs), epoch)
    if warmup_iters > 0 and iteration < warmup_iters:
        factor *= warmup_ratio + (1.0 - warmup_ratio) * iteration / warmup_iters
    return factor


class WarmupMultiStepLR:
    """Sets ``optimizer``'s lr from the (iteration, epoch) counters before every step.

    Args:
        optimizer: its param groups' lr at construction is the base lr.
        step_epochs: epochs after which the lr is multiplied by ``gamma`` ((8, 11) for 1x, (16, 22) for 2x).
        gamma, warmup_iters, warmup_ratio: see ``warmup_multistep_factor``.

    Usage: ``scheduler.set_position(iteration, epoch)`` before ``optimizer.step()``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        step_epochs: Sequence[int],
        gamma: float = 0.1,
        warmup_iters: int = 500,
        warmup_ratio: float = 0.001,
    ) -> None:
        self.optimizer = optimizer
        self.step_epochs = [int(s) for s in step_epochs]
        self.gamma = float(gamma)
        self.warmup_iters = int(warmup_iters)
        self.warmup_ratio = float(warmup_ratio)
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        self.iteration = 0
        self.epoch = 0
        self.set_position(0, 0)

    def factor(self, iteration: int, epoch: int) -> float:
        return warmup_multistep_factor(
            iteration, epoch, self.step_epochs, self.gamma, self.warmup_iters, self.warmup_ratio
        )

    def set_position(self, iteration: int, epoch: int) -> None:
        """Write the lr of ``iteration`` in ``epoch`` into every param group."""
        self.iteration, self.epoch = int(iteration), int(epoch)
        factor = self.factor(self.iteration, self.epoch)
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base_lr * factor

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {
            "iteration": self.iteration,
            "epoch": self.epoch,
            "base_lrs": list(self.base_lrs),
            "step_epochs": list(self.step_epochs),
            "gamma": self.gamma,
            "warmup_iters": self.warmup_iters,
            "warmup_ratio": self.warmup_ratio,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the counters. The schedule itself (base lr, steps) comes from the current run's
        arguments, so e.g. a longer ``--epochs`` on resume is honoured."""
        self.set_position(int(state["iteration"]), int(state.get("epoch", 0)))
