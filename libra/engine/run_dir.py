"""The run directory of ``train.py``: what a run writes there, refusing to mix two runs, resuming.

A work dir holding a run (``config.json``, ``last_checkpoint``, ``log.jsonl`` or a checkpoint) is
refused unless ``--resume`` continues it or ``--overwrite`` starts over (removing libra's own files
only). A running ``train.py`` (or ``eval.py``) holds an exclusive lock on its work dir
(:class:`WorkDirLock`, taken before anything else is read or written), so a second run into the
same folder is refused at once, naming the running one, even when both start together. A resume is refused, naming the difference, when its settings would make the continuation
meaningless: another model config, dataset, optimizer, total batch, or (inside an epoch) another
number of processes; deliberate changes (lr, seed, ...) are noted.
"""
from __future__ import annotations

import argparse
import datetime
import errno
import json
import os
import re
import shlex
import signal
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .checkpoint import CheckpointError, checkpoint_model_config, remove_stale_temp_files
from .distributed import DistributedContext, interrupt_signal, torchrun_environment

if TYPE_CHECKING:
    from .trainer import Trainer

class WorkDirError(ValueError):
    """The work dir cannot be used as given (it holds another run)."""


class WorkDirBusyError(WorkDirError):
    """Another running process holds the work dir's lock."""


LOCK_NAME = ".libra.lock"


class WorkDirLock:
    """An exclusive lock on a work dir, held by the one process that writes it (``train.py``'s launcher
    or rank 0, ``eval.py``'s), from before the first file is read until the process exits.

    ``fcntl.flock`` on ``WORK_DIR/.libra.lock`` (Linux ``flock(2)``: the lock belongs to the open file
    and the kernel drops it when the process exits in any way, ``kill -9`` and crashes included; on
    NFS Linux emulates it with a POSIX byte-range lock over the whole file). The file records who
    holds it (process id, host, start time, command) so that a refused second run can name the
    running one. A clean exit removes the file; a file that is left but not locked is the trace of a
    run that was killed or crashed: :meth:`acquire` takes it over and returns a note naming that run.

    Folders created for the lock are removed again on release when nothing else was written in
    them, so a run refused for bad input leaves no trace.
    """

    def __init__(self, work_dir: str | os.PathLike, script: str = "train.py", command: str = "") -> None:
        self.work_dir = Path(work_dir)
        self.path = self.work_dir / LOCK_NAME
        self.script = script
        self.command = command
        self.created: list[Path] = []
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock or raise :class:`WorkDirBusyError` / :class:`WorkDirError` (one line). Returns a
        note when the lock file of a killed or crashed run was taken over (or when the file system has
        no locks: the run goes on unguarded), else None."""
        import fcntl

        from libra.atomic_io import OutputLocationError, prepare_output_dir

        try:
            self.created = prepare_output_dir(self.work_dir, "--work-dir")
        except OutputLocationError as error:
            raise WorkDirError(str(error)) from None
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as error:
                self._remove_created()
                raise WorkDirError(f"cannot create the lock file {self.path}: {_reason(error)}") from None
            unlocked, failure = None, None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    # A file system without locks (some network mounts): run, and say what goes unchecked.
                    unlocked = (f"cannot lock --work-dir {self.work_dir} ({_reason(error)}): a second run started into "
                                "it would not be refused")
                else:
                    failure = error
            if failure is not None:
                holder = _read_holder(fd)
                os.close(fd)
                if failure.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    self._remove_created()
                    raise WorkDirError(f"cannot lock --work-dir {self.work_dir} ({self.path}): {_reason(failure)}") from None
                raise WorkDirBusyError(
                    f"--work-dir {self.work_dir} is in use by another run ({_describe_holder(holder)}): wait for it "
                    "to finish (or stop it), or pass another --work-dir"
                ) from None
            # The holder before us may have removed the file between our open and our lock: the lock
            # must be on the file the path names now.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            previous = _read_lock(fd)
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(self._record(), sort_keys=True) + "\n").encode("utf-8"), 0)
                os.fsync(fd)
            except OSError as error:
                os.close(fd)
                self.release_file()
                raise WorkDirError(f"cannot write to --work-dir {self.work_dir} ({self.path}): {_reason(error)}") from None
            self._fd = fd
            if unlocked is not None:
                return unlocked
            if previous:
                return (f"{self.path} was left by a run that did not end cleanly ({_describe_holder(previous)}; killed "
                        "or crashed): this run takes the work dir over")
            return None
        raise WorkDirBusyError(f"--work-dir {self.work_dir}: could not take its lock {self.path} (it keeps changing)")

    def _record(self) -> dict:
        return {
            "pid": os.getpid(), "host": socket.gethostname(), "script": self.script, "command": self.command,
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
        }

    def release(self) -> None:
        """Remove the lock file and drop the lock (and the folders created for it when they are empty)."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # while still locked: a waiting process re-checks the path (acquire)
        except OSError:
            pass
        try:
            os.close(self._fd)
        except OSError:
            pass
        self._fd = None
        self._remove_created()

    def release_file(self) -> None:
        try:
            os.unlink(self.path)
        except OSError:
            pass
        self._remove_created()

    def _remove_created(self) -> None:
        from libra.atomic_io import remove_empty_dirs

        remove_empty_dirs(self.created)
        self.created = []

    def __enter__(self) -> "WorkDirLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _reason(error: OSError) -> str:
    from libra.atomic_io import os_error_reason

    return os_error_reason(error)


def _read_lock(fd: int) -> dict | None:
    try:
        data = os.pread(fd, 4096, 0)
    except OSError:
        return None
    if not data.strip():
        return None
    try:
        record = json.loads(data.decode("utf-8", "replace"))
    except json.JSONDecodeError:
        return {"raw": data.decode("utf-8", "replace").strip()[:200]}
    return record if isinstance(record, dict) else None


def _read_holder(fd: int, wait_s: float = 2.0) -> dict | None:
    """The record of the run that holds the lock. It writes the record just after taking the lock
    (truncate, then write), so a run started at the same moment can find the file empty: give the
    holder a moment before saying it left no record."""
    deadline = time.monotonic() + wait_s
    while True:
        record = _read_lock(fd)
        if record or time.monotonic() >= deadline:
            return record
        time.sleep(0.05)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _describe_holder(record: dict | None) -> str:
    """``train.py, process 1234 on host h since 2024-05-01T12:00:00: python train.py ...``."""
    if not record:
        return "a process that left no record"
    if "raw" in record:
        return record["raw"]
    parts = [str(record.get("script") or "a libra run")]
    where = f"process {record.get('pid')}" + (f" on {record['host']}" if record.get("host") else "")
    if record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int) and not _pid_alive(record["pid"]):
        where += " (no longer running; its data-loader workers may still be exiting: try again in a few seconds)"
    parts.append(where)
    if record.get("started"):
        parts.append(f"since {record['started']}")
    text = ", ".join(parts)
    return text + (f": {record['command']}" if record.get("command") else "")


def claim_work_dir(args: argparse.Namespace, script: str = "train.py") -> WorkDirLock:
    """Lock ``args.work_dir`` (:class:`WorkDirLock`), then refuse (``WorkDirError``) a work dir holding
    another run (:func:`check_work_dir`); the lock is released again when refused. Prints the note
    about a lock left by a killed run."""
    if getattr(args, "overwrite", False) and getattr(args, "resume", None):
        raise WorkDirError("--overwrite starts the run in --work-dir over and --resume continues it: pass only one")
    lock = WorkDirLock(args.work_dir, script, shlex.join([script, *(getattr(args, "argv", None) or [])]))
    note = lock.acquire()
    try:
        check_work_dir(args)
    except BaseException:
        lock.release()
        raise
    if note:
        print(f"note: {note}", file=sys.stderr, flush=True)
    return lock


# What a libra run writes into its work dir; a folder holding one of the first group holds a run.
RUN_MARKERS = ("config.json", "last_checkpoint", "log.jsonl")
RUN_CHECKPOINT = re.compile(r"^(epoch|iter)_\d+\.pth$")
RUN_OUTPUTS = ("losses.png", "metrics.json", "per_class.json", "detections.json", "segm_detections.json")

# Settings that define what a checkpoint continues: --resume with other values is refused.
RESUME_IDENTITY = (
    ("model", "--model"),
    ("dataset", "--dataset"),
    ("optimizer", "--optimizer"),
    ("repeat_factor_sampling", "--repeat-factor-sampling"),
    ("repeat_rounding", "--repeat-rounding"),
    ("recipe", "--recipe"),
)
# The model itself is compared through its complete config (checkpoint ``model_config``).
RESUME_IDENTITY_SYNTHETIC = (
    ("synthetic_num_train", "--synthetic-num-train"),
    ("synthetic_image_size", "--synthetic-image-size"),
)
# Settings a resumed run may change on purpose; the change is noted (the run then differs from
# the uninterrupted one).
RESUME_NOTED = (
    ("lr", "--lr"), ("momentum", "--momentum"), ("weight_decay", "--weight-decay"), ("warmup_iters", "--warmup-iters"),
    ("warmup_ratio", "--warmup-ratio"), ("grad_clip", "--grad-clip"), ("lr_steps", "--lr-steps"), ("amp", "--amp"),
    ("seed", "--seed"), ("min_size", "--min-size"), ("max_size", "--max-size"), ("multi_scale", "--multi-scale"),
)


def find_resume_checkpoint(args: argparse.Namespace) -> Path:
    if args.resume != "auto":
        return Path(args.resume)
    pointer = Path(args.work_dir) / "last_checkpoint"
    if not pointer.is_file():
        raise CheckpointError(f"--resume without a path needs {pointer} (no checkpoint in {args.work_dir} yet)")
    name = pointer.read_text().strip()
    path = Path(args.work_dir) / name
    if not name or not path.is_file():
        found = sorted(p.name for p in Path(args.work_dir).iterdir() if RUN_CHECKPOINT.match(p.name))
        raise CheckpointError(
            f"{pointer} names {name or 'nothing'!r}, which is not a file in {args.work_dir}: pass --resume PATH"
            + (f" (checkpoints there: {', '.join(found[-3:])})" if found else "")
        )
    return path


def previous_run_files(work_dir: Path) -> list[Path]:
    """The files of a libra run in ``work_dir`` (markers and checkpoints; outputs only with them)."""
    if not work_dir.is_dir():
        return []
    marks = [work_dir / n for n in RUN_MARKERS if (work_dir / n).is_file()]
    marks += sorted(p for p in work_dir.iterdir() if RUN_CHECKPOINT.match(p.name) and p.is_file())
    return marks


def check_work_dir(args: argparse.Namespace) -> None:
    """Refuse to mix a new run into a work dir holding another one (before anything is written)."""
    if args.overwrite and args.resume:
        raise WorkDirError("--overwrite starts the run in --work-dir over and --resume continues it: pass only one")
    work_dir = Path(args.work_dir)
    if work_dir.exists() and not work_dir.is_dir():
        raise WorkDirError(f"--work-dir {work_dir} is a file, not a folder")
    existing = work_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.is_dir() and not os.access(existing, os.W_OK | os.X_OK):
        raise WorkDirError(f"cannot write to --work-dir {work_dir} ({existing} is not writable)")
    if args.resume or args.overwrite:
        return
    found = previous_run_files(work_dir)
    if found:
        names = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
        raise WorkDirError(
            f"work dir {work_dir} already holds a libra run ({names}): continue it with --resume, start over with "
            "--overwrite (removes that run's files), or pass another --work-dir"
        )


def clear_previous_run(work_dir: Path) -> list[Path]:
    """``--overwrite``: remove libra's own files of the previous run (nothing else) and stale temp files."""
    removed = []
    if not work_dir.is_dir():
        return removed
    for path in sorted(work_dir.iterdir()):
        if path.is_file() and (path.name in RUN_MARKERS or path.name in RUN_OUTPUTS or RUN_CHECKPOINT.match(path.name)):
            path.unlink()
            removed.append(path)
    return removed + remove_stale_temp_files(work_dir)


def _normalized(value):
    return json.dumps(value, sort_keys=True, default=str)


def check_resume_settings(checkpoint: dict, args: argparse.Namespace, path: Path) -> list[str]:
    """Refuse (``CheckpointError``) a resume whose settings make the checkpoint's continuation
    meaningless; returns notes about deliberate changes (lr, seed, ...). Settings the checkpoint
    did not record (older checkpoints) are not compared."""
    saved = checkpoint.get("args") or {}
    current = vars(args)
    keys = RESUME_IDENTITY + (RESUME_IDENTITY_SYNTHETIC if args.dataset == "synthetic" else ())
    differences = [
        _difference(flag, saved[key], current.get(key))
        for key, flag in keys
        if key in saved and _normalized(saved[key]) != _normalized(current.get(key))
    ]
    saved_config = checkpoint_model_config(checkpoint, path)
    if _normalized(saved_config) != _normalized(args.model_config):
        differences.append(_difference("the model config (flags / --set)", saved_config, args.model_config))
    if differences:
        advice = "resume with the checkpoint's settings, or start a new --work-dir without --resume"
        if any(d.startswith("--optimizer ") for d in differences):
            advice = f"resume with --optimizer {saved['optimizer']}, or start a new --work-dir without --resume"
        raise CheckpointError(f"{path} was trained with {'; '.join(differences[:3])}: {advice}")
    saved_batch, saved_world = saved.get("batch_size"), checkpoint.get("world_size", saved.get("world_size"))
    mid_epoch = int(checkpoint.get("iter_in_epoch", 0)) > 0
    notes = []
    if saved_batch is not None and saved_world is not None:
        if int(saved_batch) * int(saved_world) != args.batch_size * args.world_size:
            raise CheckpointError(
                f"{path} was trained with {saved_batch} images per process x {saved_world} processes "
                f"({int(saved_batch) * int(saved_world)} per iteration) but this run has {args.batch_size} x "
                f"{args.world_size}: the lr schedule and the iteration counts would not continue; resume with "
                f"--batch-size {saved_batch} on {saved_world} processes, or start a new --work-dir without --resume"
            )
        if int(saved_world) != args.world_size:
            if mid_epoch:
                raise CheckpointError(
                    f"{path} was written inside an epoch by {saved_world} processes; this run has {args.world_size}: "
                    f"resume it with {saved_world} processes (--gpus {saved_world}), or resume from an epoch_N.pth "
                    "checkpoint"
                )
            notes.append(f"{saved_world} processes -> {args.world_size} (the same total batch)")
    for key, flag in RESUME_NOTED:
        if key in saved and _normalized(saved[key]) != _normalized(current.get(key)):
            notes.append(f"changed {flag} {_show(saved[key])} -> {_show(current.get(key))}")
    return notes


def _difference(flag: str, saved, current) -> str:
    """``--optimizer sgd (this run: adamw)``; for a dict (the detector switches) only the keys that differ."""
    if isinstance(saved, dict) and isinstance(current, dict):
        keys = sorted(k for k in set(saved) | set(current) if _normalized(saved.get(k)) != _normalized(current.get(k)))
        unset = "(preset default)"
        return (
            f"{flag} " + ",".join(f"{k}={_show(saved[k]) if k in saved else unset}" for k in keys)
            + " (this run: " + ",".join(f"{k}={_show(current[k]) if k in current else unset}" for k in keys) + ")"
        )
    return f"{flag} {_show(saved)} (this run: {_show(current)})"


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value) if value else "[]"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in sorted(value.items())) or "{}"
    return str(value)


def say(ctx: DistributedContext | None, message: str) -> None:
    if ctx is None or ctx.is_main:
        print(message, flush=True)


def command_for(args: argparse.Namespace, *, resume: str | None = None, overwrite: bool = False) -> str:
    """This run's command line without --resume / --overwrite, plus the ones asked for."""
    argv = list(getattr(args, "argv", None) or [])
    kept = []
    index = 0
    while index < len(argv):
        token = argv[index]
        index += 1
        if token == "--resume":
            if index < len(argv) and not argv[index].startswith("-"):
                index += 1  # its value
            continue
        if token.startswith("--resume=") or token == "--overwrite":
            continue
        kept.append(token)
    if resume == "auto":
        kept.append("--resume")
    elif resume:
        kept += ["--resume", resume]
    if overwrite:
        kept.append("--overwrite")
    script = getattr(args, "script", None) or "train.py"
    launcher = "the same launcher with: " if torchrun_environment() else "python "
    return launcher + shlex.join([script, *kept])


def last_checkpoint(args: argparse.Namespace, trainer: Trainer | None) -> tuple[Path | None, str | Path | None]:
    """``(the last checkpoint of the run, what --resume takes for it: "auto" or the path)``, or
    ``(None, None)`` when there is none yet."""
    work_dir = Path(args.work_dir)
    pointer = work_dir / "last_checkpoint"
    try:
        name = pointer.read_text().strip() if pointer.is_file() else ""
    except OSError:
        name = ""
    if name and (work_dir / name).is_file():
        return work_dir / name, "auto"
    if trainer is not None and trainer.last_checkpoint is not None and (
        trainer.last_checkpoint.is_file() or not trainer.ctx.is_main  # rank 0 wrote it, maybe on another node
    ):
        return trainer.last_checkpoint, trainer.last_checkpoint
    if args.resume and args.resume != "auto" and Path(args.resume).is_file():
        return Path(args.resume), Path(args.resume)
    return None, None


def _at(trainer: Trainer | None, checkpoint: Path) -> str:
    if trainer is not None and trainer.last_checkpoint == checkpoint and trainer.last_checkpoint_iteration is not None:
        return f" (iteration {trainer.last_checkpoint_iteration})"
    return ""


def resume_hint(args: argparse.Namespace, trainer: Trainer | None) -> str:
    """``the last checkpoint is X (iteration N); resume with: <command>`` or, before the first
    checkpoint, ``no checkpoint was written yet; start again with: <command>``."""
    checkpoint, resume = last_checkpoint(args, trainer)
    if checkpoint is not None:
        return (f"the last checkpoint is {checkpoint}{_at(trainer, checkpoint)}; resume with: "
                + command_for(args, resume=str(resume) if resume != "auto" else "auto"))
    wrote = bool(previous_run_files(Path(args.work_dir)))
    return "no checkpoint was written yet; start again with: " + command_for(args, overwrite=wrote)


def write_failure_message(args: argparse.Namespace, trainer: Trainer | None, error: BaseException) -> str:
    """One line for an output that could not be written (``WriteError``): what, where, why, that the
    files written before are intact, and how to go on."""
    code = getattr(error, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        what = "free space on that disk (or move the work dir to one with space), then "
    elif code in (errno.EROFS, errno.EACCES, errno.EPERM):
        what = "make the work dir writable (or move it), then "
    else:
        what = ""
    return f"{one_line_text(error)}; the files written before are intact; {what}{resume_hint(args, trainer)}"


def peer_lost_message(args: argparse.Namespace, trainer: Trainer | None, error: BaseException) -> str:
    """One line for a collective that failed because another process of the run is gone: what was
    seen, that the process (or its node) may have left no message, and how to resume."""
    seen = one_line_text(error)[:160]
    return (f"another process of the run is gone ({seen}): it was killed (kill -9, the out-of-memory killer) or its "
            "node failed or lost the network, so it may have left no message (if it failed on its own, its error is "
            f"in its node's output); {resume_hint(args, trainer)}")


def one_line_text(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def interrupt_message(args: argparse.Namespace, trainer: Trainer | None, error: BaseException) -> str:
    """One line: where the interrupt found the run, the last checkpoint, and the command that resumes."""
    signum = getattr(error, "signum", None) or interrupt_signal() or signal.SIGINT
    what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
    work_dir = Path(args.work_dir)
    if trainer is None:
        where = "before training started"
    else:
        if trainer.epoch >= trainer.config.num_epochs or trainer.iteration >= trainer.config.max_iters:
            where = f"after the last iteration ({trainer.iteration})"
        else:
            where = f"at iteration {trainer.iteration} (epoch {trainer.epoch + 1})"
        if trainer.writing_checkpoint is not None:
            where += f" while writing {trainer.writing_checkpoint} (not written)"
        elif trainer.stage == "evaluating":
            where += " during the evaluation"
    checkpoint, resume = last_checkpoint(args, trainer)
    if checkpoint is not None:
        return (
            f"interrupted ({what}) {where}; the last checkpoint is {checkpoint}{_at(trainer, checkpoint)}; resume with: "
            + command_for(args, resume=str(resume) if resume != "auto" else "auto")
        )
    wrote = bool(previous_run_files(work_dir))
    first = "" if trainer is None else f" (the first is written after epoch {min(args.checkpoint_interval, args.epochs)})"
    return (
        f"interrupted ({what}) {where}; no checkpoint was written yet{first}; start again with: "
        + command_for(args, overwrite=wrote)
    )
