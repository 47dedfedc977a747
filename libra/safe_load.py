"""Reading ``.pth`` files without running code from them.

``torch.load(weights_only=False)`` unpickles arbitrary Python objects, and unpickling can call any
function the file names (Python's ``pickle`` documentation: "It is possible to construct malicious
pickle data which will execute arbitrary code during unpickling. Never unpickle data that could
have come from an untrusted source"). Every checkpoint loader of libra (``train.py --resume``,
``eval.py`` / ``analyze.py --checkpoint``, ``libra.engine.loading.load_detector``,
``load_mmdet_checkpoint``, ``--pretrained``) therefore goes through :func:`load_torch_file`, which
reads with ``weights_only=True``: tensors, numbers, strings, lists, tuples, dicts (torch's
allow-list, https://pytorch.org/docs/stable/notes/serialization.html#weights-only). libra's own
checkpoints hold nothing else. A file that needs more (a checkpoint of an older libra, whose NumPy
generator state is an array; an MMDetection 3.x checkpoint with mmengine objects; a crafted file)
is refused with :class:`UntrustedCheckpointError`, one line that names the objects and the opt-in:
``trust=True`` (the scripts' ``--trust-checkpoint``) for a file you trust.

Depends on torch only (like :mod:`libra.atomic_io`, the bottom floor).
"""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

__all__ = ["TRUST_FLAG", "UntrustedCheckpointError", "load_torch_file"]

# The command-line opt-in of every script (train.py, eval.py, analyze.py): one name everywhere.
TRUST_FLAG = "--trust-checkpoint"


class UntrustedCheckpointError(ValueError):
    """A ``.pth`` file that holds Python objects beyond tensors and plain values: loading it would run
    code from the file. The message is one line naming the objects and the opt-in."""


def _unsafe_globals(path: Path) -> list[str]:
    """The globals the file's pickle names that ``weights_only`` does not allow (read, not executed)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(os.fspath(path)))
    except Exception:  # noqa: BLE001 - an older torch, a legacy-format file: the names are a courtesy
        return []


def load_torch_file(path: str | os.PathLike, map_location: Any = "cpu", trust: bool = False, what: str = "checkpoint",
                    trust_hint: str = TRUST_FLAG) -> Any:
    """``torch.load(path, weights_only=not trust)``.

    Raises:
        UntrustedCheckpointError: ``trust`` is False and the file holds more than tensors and plain
            values (nothing of the file has run). ``trust_hint`` is how the caller opts in
            (``--trust-checkpoint``, or ``trust_checkpoint=True`` from Python).
        Anything else ``torch.load`` raises for a damaged or foreign file (callers turn it into
        their one-line errors).
    """
    path = Path(path)
    try:
        return torch.load(os.fspath(path), map_location=map_location, weights_only=not trust)
    except pickle.UnpicklingError as error:
        text = str(error)
        if trust or "weights only" not in text.lower():
            raise
        names = _unsafe_globals(path)
        if not names and not re.search(r"unsupported (global|class)|GLOBAL ", text):
            # Not an object outside the allow-list but data the unpickler cannot read at all.
            inner = text.split("WeightsUnpickler error:")[-1].split("Check the documentation")[0]
            raise pickle.UnpicklingError(f"damaged, or not a torch file ({' '.join(inner.split())[:200]})") from None
        shown = ", ".join(names[:3]) + (f", ... ({len(names)} in all)" if len(names) > 3 else "") if names else ""
        holds = f"Python objects beyond tensors and plain values ({shown})" if shown else (
            "Python objects beyond tensors and plain values")
        raise UntrustedCheckpointError(
            f"{what} {path} holds {holds}: loading it would run code stored in the file (pickle), so it was not "
            f"loaded; if you trust this file (e.g. a checkpoint of an older libra, or an MMDetection 3.x one), pass "
            f"{trust_hint}"
        ) from None
