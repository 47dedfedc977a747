"""The random generators of a training process: seeding, and the states a checkpoint records.

``--resume`` continues bit-identically because every epoch re-seeds all generators from
(seed, epoch, rank) (:func:`epoch_seed`) and every checkpoint holds each rank's generator states as
they were after its last iteration (:func:`get_rng_state`), which a run resumed inside an epoch
restores before its first batch (:func:`set_rng_state`).
"""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) generators."""
    seed = int(seed) % (2**31)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_rng_state(device: torch.device | None = None) -> dict:
    """The global generators' states: torch CPU (and CUDA of ``device``), ``random``, NumPy."""
    state = {"torch": torch.get_rng_state(), "random": random.getstate(), "numpy": np.random.get_state()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    """Restore what :func:`get_rng_state` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    if device is not None and device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A distinct, reproducible seed per (run seed, epoch, rank)."""
    return (int(seed) * 1_000_003 + int(epoch) * 10_007 + int(rank)) % (2**31)
