"""Training checkpoints: atomic writes, loads with clear errors, and a model-identity check.

A checkpoint is one ``torch.save``d dict::

    {"format": "libra-checkpoint", "version": 1,
     "model": state_dict, "optimizer": ..., "scheduler": ..., "scaler": ... | None,
     "epoch": completed epochs, "iteration": completed iterations,
     "model_name": preset name, "num_classes": int, "args": dict of the command line}

Writes go to a temporary file in the destination directory followed by ``os.replace``
(atomic on POSIX within one file system), so an interrupted save never leaves a
truncated checkpoint where a good one was.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

CHECKPOINT_FORMAT = "libra-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, unreadable, or of another model)."""


def _default_file_mode() -> int:
    """0o666 minus the process umask: what ``open(path, "w")`` would have given (mkstemp uses 0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(handle)`` on a temporary file beside ``path``, then rename it over ``path``.

    The temporary file is in the same directory (hence the same file system) and is renamed
    only after ``write`` completed and the data was flushed to disk. On any failure the
    temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, _default_file_mode())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` that never leaves a partially written ``path``.

    The object is written to a temporary file beside ``path`` (same directory, hence the
    same file system) and renamed over ``path`` only after the write completed and was
    flushed to disk. On any failure the temporary file is removed and ``path`` is untouched.
    """
    atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """Write a UTF-8 text file atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def load_checkpoint_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read any ``.pth`` file into a dict, turning the usual failures into one-line ``CheckpointError``s."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        # weights_only=False: our checkpoints hold the argparse dict and optimizer state; only load
        # files you trust (as with any pickle).
        obj = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # truncated file, not a torch file, ...
        raise CheckpointError(f"cannot read checkpoint {path}: {type(error).__name__}: {error}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    return obj


def is_libra_checkpoint(obj: dict) -> bool:
    return obj.get("format") == CHECKPOINT_FORMAT and "model" in obj


def check_model_identity(
    checkpoint: dict, model_name: str, num_classes: int, path: str | os.PathLike = "checkpoint"
) -> None:
    """Raise ``CheckpointError`` when ``checkpoint`` was written for another model or class count."""
    saved_name = checkpoint.get("model_name")
    saved_classes = checkpoint.get("num_classes")
    if saved_name is not None and saved_name != model_name:
        raise CheckpointError(
            f"{path} is a checkpoint of model '{saved_name}', not '{model_name}': pass --model {saved_name} "
            "or another checkpoint"
        )
    if saved_classes is not None and int(saved_classes) != int(num_classes):
        raise CheckpointError(
            f"{path} was trained for {saved_classes} classes but this dataset has {num_classes}: "
            "use a checkpoint of the same dataset"
        )


def load_model_state(model: torch.nn.Module, state_dict: dict, path: str | os.PathLike = "checkpoint") -> None:
    """``model.load_state_dict(strict=True)`` with a short message listing what did not match."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and hasattr(state_dict[k], "shape") and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                shown = ", ".join(items[:3]) + (f", ... ({len(items)} in all)" if len(items) > 3 else "")
                parts.append(f"{title}: {shown}")
        raise CheckpointError(f"{path} does not fit this model ({'; '.join(parts)})")
    model.load_state_dict(state_dict, strict=True)


def make_checkpoint(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    scaler: Any | None,
    epoch: int,
    iteration: int,
    model_name: str,
    num_classes: int,
    args: dict | None = None,
) -> dict:
    """Assemble the checkpoint dict (unwraps DistributedDataParallel)."""
    module = model.module if hasattr(model, "module") else model
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model": module.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "epoch": int(epoch),
        "iteration": int(iteration),
        "model_name": model_name,
        "num_classes": int(num_classes),
        "args": dict(args) if args is not None else {},
    }
