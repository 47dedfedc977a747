"""The random generators of a training process: seeding, and the states a checkpoint records.

``--resume`` continues bit-identically because every epoch re-seeds all generators from
(seed, epoch, rank) (:func:`epoch_seed`) and every checkpoint holds each rank's generator states as
they were after its last iteration (:func:`get_rng_state`), which a run resumed inside an epoch
restores before its first batch (:func:`set_rng_state`).

The states are stored in a form ``torch.load(weights_only=True)`` reads (tensors and plain Python
values only, no NumPy array): NumPy's ``('MT19937', keys[624], pos, has_gauss, cached_gaussian)``
is kept as ``{"kind", "keys": int64 tensor, "pos", "has_gauss", "cached_gaussian"}``. The tuple form
of older checkpoints is still restored (they load only with ``--trust-checkpoint``).
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
    state = {"torch": torch.get_rng_state(), "random": random.getstate(), "numpy": _numpy_state_plain()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    """Restore what :func:`get_rng_state` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["random"])
    np.random.set_state(_numpy_state_tuple(state["numpy"]))
    if device is not None and device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def _numpy_state_plain() -> dict:
    """NumPy's global generator state with its key array as a tensor (weights_only-safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _numpy_state_tuple(state) -> tuple:
    """The tuple ``np.random.set_state`` takes, from :func:`_numpy_state_plain`'s dict (or an old tuple)."""
    if isinstance(state, dict):
        keys = np.asarray(state["keys"].numpy() if isinstance(state["keys"], torch.Tensor) else state["keys"], dtype=np.uint32)
        return (state["kind"], keys, int(state["pos"]), int(state["has_gauss"]), float(state["cached_gaussian"]))
    return tuple(state)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A distinct, reproducible seed per (run seed, epoch, rank)."""
    return (int(seed) * 1_000_003 + int(epoch) * 10_007 + int(rank)) % (2**31)
