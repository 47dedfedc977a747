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

Writes go to a temporary file in the destination directory followed by ``os.replace``
(atomic on POSIX within one file system), so an interrupted save never leaves a
truncated checkpoint where a good one was. Ctrl-C / SIGTERM during a write is deferred until
the write is complete (a second one aborts it, removing the temporary file) and then raised as
usual, so it never surfaces as an error of ``torch.save``'s writer. Temporary files that a killed
process could not remove (``.NAME.XXXXXXXX.tmp``) are removed by :func:`remove_stale_temp_files`.
"""
from __future__ import annotations

import os
import re
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Sequence

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


_INTERRUPT_SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s is not None)
_deferral: dict[str, Any] = {"depth": 0, "pending": []}


@contextmanager
def deferred_interrupts() -> Iterator[list[int]]:
    """Hold back SIGINT / SIGTERM for the duration of the block (a checkpoint write).

    A signal that arrives inside the block is recorded and delivered to the handler that was
    installed before (KeyboardInterrupt for Ctrl-C, libra's interrupt handler, or the default
    action) right after the block, so the write in progress completes. A *second* signal inside
    the block raises ``KeyboardInterrupt`` at once (the user insists): the write in progress is
    then aborted by :func:`atomic_write`, which removes its temporary file. Nested blocks share
    the outermost one's deferral. Outside the main thread (no signal handlers there) it does
    nothing. Yields the list of signal numbers received so far.
    """
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    if _deferral["depth"] > 0:
        _deferral["depth"] += 1
        try:
            yield _deferral["pending"]
        finally:
            _deferral["depth"] -= 1
        return
    pending: list[int] = []

    def record(signum, frame):  # noqa: ARG001
        pending.append(signum)
        if len(pending) > 1:
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} during a checkpoint write")

    previous = {}
    for signum in _INTERRUPT_SIGNALS:
        handler = signal.getsignal(signum)
        if handler is signal.SIG_IGN or handler is None:  # ignored (or set from C): leave it alone
            continue
        previous[signum] = handler
        signal.signal(signum, record)
    _deferral.update(depth=1, pending=pending)
    try:
        yield pending
    finally:
        _deferral.update(depth=0, pending=[])
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if pending:
            # Deliver the first held-back signal to the restored handler: KeyboardInterrupt (or
            # libra's Interrupted) is raised here, after the write; SIG_DFL terminates as usual.
            signal.raise_signal(pending[0])


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(handle)`` on a temporary file beside ``path``, then rename it over ``path``.

    The temporary file (``.NAME.XXXXXXXX.tmp``) is in the same directory (hence the same file
    system) and is renamed only after ``write`` completed and the data was flushed to disk. On
    any failure the temporary file is removed and ``path`` is untouched. SIGINT / SIGTERM are
    deferred until the file is complete (see :func:`deferred_interrupts`); a second one aborts
    the write and is raised as ``KeyboardInterrupt`` (not as the error it caused inside
    ``write``, e.g. ``torch.save``'s "RuntimeError: [enforce fail ...]").
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with deferred_interrupts() as pending:
        tmp_name = None
        try:
            fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            with os.fdopen(fd, "wb") as handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp_name, _default_file_mode())
            os.replace(tmp_name, path)
        except BaseException:
            if tmp_name is not None:
                try:
                    os.unlink(tmp_name)
                except FileNotFoundError:
                    pass
            if len(pending) > 1:  # aborted by a repeated interrupt: report the interrupt, not its side effect
                raise KeyboardInterrupt(f"writing {path} was interrupted; the file was not written") from None
            raise
    return path


# mkstemp's names: the prefix, 8 characters of [a-z0-9_], the suffix.
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")


def is_atomic_temp_file(path: str | os.PathLike) -> bool:
    """True for the temporary files of :func:`atomic_write` (``.NAME.XXXXXXXX.tmp``)."""
    return _TEMP_NAME.match(Path(path).name) is not None


def remove_stale_temp_files(directory: str | os.PathLike, names: Sequence[str] | None = None) -> list[Path]:
    """Remove the temporary files that interrupted :func:`atomic_write` calls left in ``directory``
    (only files matching its own pattern; with ``names``, only those of these destination names,
    glob patterns allowed). Call it when no other process writes there. Returns what was removed."""
    import fnmatch

    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in directory.iterdir():
        match = _TEMP_NAME.match(entry.name)
        if match is None or not entry.is_file():
            continue
        if names is not None and not any(fnmatch.fnmatchcase(match.group("name"), n) for n in names):
            continue
        try:
            entry.unlink()
            removed.append(entry)
        except FileNotFoundError:
            pass
    return removed


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
        "args": dict(args) if args is not None else {},
        "model_config": _plain_config(model_config) if model_config is not None else None,
    }


def _plain_config(config: dict) -> dict:
    """The config with plain values only (names, numbers, tuples): a module given from Python (a
    custom backbone or sampler) cannot be rebuilt from a file and is recorded by its class name."""
    return {k: (f"<module {type(v).__name__}>" if isinstance(v, torch.nn.Module) else v) for k, v in config.items()}


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
