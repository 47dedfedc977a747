"""Training checkpoints: atomic writes, loads with clear errors, and a model-identity check.

A checkpoint is one ``torch.save``d dict::

    {"format": "libra-checkpoint", "version": 1,
     "model": state_dict, "optimizer": ..., "optimizer_type": "SGD" | "AdamW" | ...,
     "scheduler": ..., "scaler": ... | None,
     "epoch": completed epochs, "iteration": completed iterations,
     "model_name": preset name, "num_classes": int, "class_names": [str, ...],
     "args": dict of the command line,
     # written by the trainer (``libra.engine.trainer``):
     "iter_in_epoch": int, "iters_per_epoch": int, "rng_states": [per rank: torch/cuda/random/numpy]}

``class_names`` and ``optimizer_type`` are absent from older checkpoints; they still load (the
class count alone is compared then).

A checkpoint holds tensors and plain Python values only (``args`` and ``model_config`` are made
plain by :func:`plain_value`, the generator states by :mod:`libra.engine.rng`), so it is read with
``torch.load(weights_only=True)`` (:func:`load_checkpoint_file`): a file that needs more, e.g. a
crafted one whose unpickling would run code, is refused before any of it runs unless the user passes
``--trust-checkpoint`` (checkpoints of libra before this format: their NumPy generator state).

Checkpoints are written with :mod:`libra.atomic_io` (a temporary file renamed over the
destination, Ctrl-C deferred until the write is complete), so an interrupted save never leaves a
truncated checkpoint where a good one was; its functions are re-exported here.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch

from libra.atomic_io import (  # noqa: F401  (re-exported: the engine's writers)
    atomic_save,
    atomic_write,
    atomic_write_text,
    deferred_interrupts,
    is_atomic_temp_file,
    remove_stale_temp_files,
)

from libra.safe_load import TRUST_FLAG, UntrustedCheckpointError, load_torch_file  # noqa: F401  (re-exported)

CHECKPOINT_FORMAT = "libra-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, unreadable, or of another model)."""


def load_checkpoint_file(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", trust: bool = False, trust_hint: str = TRUST_FLAG
) -> dict:
    """Read any ``.pth`` file into a dict, turning the usual failures into one-line ``CheckpointError``s.

    The file is read with ``weights_only=True`` (:func:`libra.safe_load.load_torch_file`): one that
    holds more than tensors and plain values is refused (:class:`~libra.safe_load.UntrustedCheckpointError`,
    a ValueError) before any of it runs, unless ``trust`` (``--trust-checkpoint``).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = load_torch_file(path, map_location=map_location, trust=trust, trust_hint=trust_hint)
    except UntrustedCheckpointError:
        raise
    except Exception as error:  # truncated file, not a torch file, ...
        text = " ".join(str(error).split())[:300]
        raise CheckpointError(f"cannot read checkpoint {path}: {type(error).__name__}: {text}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    return obj


def is_libra_checkpoint(obj: dict) -> bool:
    return obj.get("format") == CHECKPOINT_FORMAT and "model" in obj


def check_model_identity(
    checkpoint: dict,
    model_name: str,
    num_classes: int,
    path: str | os.PathLike = "checkpoint",
    class_names: Sequence[str] | None = None,
) -> None:
    """Raise ``CheckpointError`` when ``checkpoint`` was written for another model, class count or
    class list. ``class_names`` (the dataset's, in label order) is compared with the checkpoint's
    when both are known; checkpoints written before class names were recorded compare the count only."""
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
    saved_names = checkpoint.get("class_names")
    if saved_names is not None and class_names is not None:
        saved_names, class_names = [str(n) for n in saved_names], [str(n) for n in class_names]
        if saved_names != class_names:
            if len(saved_names) != len(class_names):
                raise CheckpointError(
                    f"{path} was trained for {len(saved_names)} classes but this dataset has {len(class_names)}: "
                    "use a checkpoint of the same dataset"
                )
            differing = [i for i, (a, b) in enumerate(zip(saved_names, class_names)) if a != b]
            shown = ", ".join(f"{i}: {saved_names[i]!r} vs {class_names[i]!r}" for i in differing[:3])
            more = f" ({len(differing)} of {len(class_names)} differ)" if len(differing) > 3 else ""
            raise CheckpointError(
                f"{path} was trained on other classes than this dataset's (label {shown}{more}; checkpoint vs "
                "dataset): use a checkpoint of the same dataset"
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
    class_names: Sequence[str] | None = None,
    model_config: dict | None = None,
    label_to_cat_id: Sequence[int] | None = None,
) -> dict:
    """Assemble the checkpoint dict (unwraps DistributedDataParallel). ``model_config`` is the
    complete config the model was built from (``libra.presets.preset_config``): ``eval.py``,
    ``analyze.py``, ``--resume`` and ``load_detector`` rebuild the model from it."""
    module = model.module if hasattr(model, "module") else model
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model": module.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "optimizer_type": type(optimizer).__name__ if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "epoch": int(epoch),
        "iteration": int(iteration),
        "model_name": model_name,
        "num_classes": int(num_classes),
        "class_names": [str(n) for n in class_names] if class_names is not None else None,
        "args": plain_value(dict(args)) if args is not None else {},
        "model_config": _plain_config(model_config) if model_config is not None else None,
        # The dataset's category id of each label (results files of predict.py use them).
        "label_to_cat_id": [int(c) for c in label_to_cat_id] if label_to_cat_id is not None else None,
    }


def _plain_config(config: dict) -> dict:
    """The config with plain values only (names, numbers, tuples): a module given from Python (a
    custom backbone or sampler) cannot be rebuilt from a file and is recorded by its class name."""
    return {k: (f"<module {type(v).__name__}>" if isinstance(v, torch.nn.Module) else plain_value(v)) for k, v in config.items()}


_PLAIN = (type(None), bool, int, float, str, bytes, torch.Tensor, torch.Size, torch.dtype)


def plain_value(value: Any) -> Any:
    """``value`` with only what ``torch.load(weights_only=True)`` reads (numbers, strings, tensors,
    lists, tuples, dicts with such keys); anything else becomes its ``str`` (a ``Path``, a NumPy
    scalar as its Python number)."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, dict):
        return {plain_value(k): plain_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [plain_value(v) for v in value]
        return items if isinstance(value, list) else tuple(items)
    if hasattr(value, "item") and callable(value.item):  # NumPy / torch scalars
        try:
            return plain_value(value.item())
        except (TypeError, ValueError):
            pass
    return str(value)


def checkpoint_model_config(checkpoint: dict, path: str | os.PathLike = "checkpoint") -> dict:
    """The complete model config a libra checkpoint was built from: its ``model_config``, or for a
    checkpoint written before configs were recorded, the config its recorded command line resolves
    to (preset, ``overrides`` and backbone flags, as libra resolved them then)."""
    from libra.presets import preset_config

    name = checkpoint.get("model_name") or (checkpoint.get("args") or {}).get("model")
    record = checkpoint.get("model_config")
    try:
        if record is not None:
            return preset_config(name, **record)
        args = checkpoint.get("args") or {}
        overrides = dict(args.get("overrides") or {})
        for key in ("frozen_stages", "backbone_norm", "width_per_group", "stage_blocks"):
            if args.get(key) is not None:
                overrides[key] = args[key]
        return preset_config(name, **overrides)
    except ValueError as error:
        raise CheckpointError(f"{path}: its model config does not build with this libra: {error}") from None
