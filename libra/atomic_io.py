"""Atomic file writes: a file is either its old or its new content, never half written.

Writes go to a temporary file in the destination directory followed by ``os.replace``
(atomic on POSIX within one file system), so an interrupted save never leaves a
truncated file where a good one was. Ctrl-C / SIGTERM during a write is deferred until
the write is complete (a second one aborts it, removing the temporary file) and then raised as
usual, so it never surfaces as an error of ``torch.save``'s writer. Temporary files that a killed
process could not remove (``.NAME.XXXXXXXX.tmp``) are removed by :func:`remove_stale_temp_files`.

A write that fails (disk full, read-only file system, a file where the folder should be) raises
:class:`WriteError`, an ``OSError`` whose message is one line naming the file and the reason, and
leaves the destination as it was; :func:`prepare_output_dir` checks an output folder before the
work whose results go there (:class:`OutputLocationError`, a ValueError).

The bottom floor of libra's file writing (it depends on torch only): checkpoints
(``libra.engine``), proposal files (``libra.data``), figures and results (``libra.analysis``,
``libra.evaluation``) all write through it.
"""
from __future__ import annotations

import errno
import os
import re
import signal
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Sequence

import torch

__all__ = [
    "OutputLocationError", "WriteError", "atomic_save", "atomic_write", "atomic_write_text", "deferred_interrupts",
    "is_atomic_temp_file", "os_error_reason", "prepare_output_dir", "remove_empty_dirs", "remove_stale_temp_files",
    "writing",
]


# ------------------------------------------------------------------------------ write failures
def os_error_reason(error: BaseException | None) -> str:
    """Why an OS call failed, in words: ``no space left on device (ENOSPC)``, ``read-only file system
    (EROFS)``, ``permission denied (EACCES)``, ``not a directory (ENOTDIR)``, ... (``os.strerror``)."""
    code = getattr(error, "errno", None)
    if isinstance(code, int) and code > 0:
        name = errno.errorcode.get(code)
        return os.strerror(code)[:1].lower() + os.strerror(code)[1:] + (f" ({name})" if name else "")
    text = " ".join(str(error or "").split())
    return text or type(error).__name__


class WriteError(OSError):
    """A file could not be written (disk full, read-only file system, a file where a folder should
    be, ...). ``str()`` is one line: what, where and why; ``errno`` is the failed call's. The
    destination is untouched (the atomic writers leave the previous file as it was)."""

    def __init__(self, path: str | os.PathLike, error: BaseException | None = None, what: str = "") -> None:
        super().__init__(getattr(error, "errno", None), os_error_reason(error))
        self.path = Path(path)
        self.what = what
        self.reason = os_error_reason(error)

    def __str__(self) -> str:
        what = f"{self.what} " if self.what else ""
        return f"cannot write {what}{self.path}: {self.reason}"


@contextmanager
def writing(path: str | os.PathLike, what: str = "") -> Iterator[None]:
    """Turn an ``OSError`` raised in the block (a write to ``path``) into a :class:`WriteError`."""
    try:
        yield
    except WriteError:
        raise
    except OSError as error:
        raise WriteError(path, error, what) from None


class OutputLocationError(ValueError):
    """An output location that cannot be used, found before any work (one line: where, why, what to do)."""


def _parent_problem(path: Path) -> str | None:
    """Why folders cannot be created at ``path``: an existing file at it or above it."""
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            if not candidate.is_dir():
                return f"{candidate} is a file, not a folder" if candidate != path else "it is a file, not a folder"
            return None
    return None


def prepare_output_dir(path: str | os.PathLike, what: str = "output folder") -> list[Path]:
    """Create ``path`` (and its parents) and prove that a file can be written in it (a small probe
    file, written, flushed to disk and removed), before any work whose results go there.

    Returns the folders it created (deepest last), for :func:`remove_empty_dirs` when the run ends
    without writing anything. Raises :class:`OutputLocationError` (one line: the flag or role
    ``what``, the folder and why: a file in the way, read-only file system, permission denied,
    no space left on device).
    """
    path = Path(path)
    problem = _parent_problem(path)
    if problem is not None:
        raise OutputLocationError(f"cannot use {what} {path}: {problem}; pass another folder")
    missing = []
    for candidate in (path, *path.parents):
        if candidate.is_dir():
            break
        missing.append(candidate)
    created = []
    try:
        for folder in reversed(missing):
            folder.mkdir(exist_ok=True)
            created.append(folder)
        fd, probe = tempfile.mkstemp(prefix=".libra_probe.", suffix=".tmp", dir=path)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(b"libra write probe\n")
                handle.flush()
                os.fsync(handle.fileno())
        finally:
            os.unlink(probe)
    except OSError as error:
        remove_empty_dirs(created)
        raise OutputLocationError(f"cannot write to {what} {path}: {os_error_reason(error)}; pass a writable folder"
                                  ) from None
    return created


def remove_empty_dirs(folders: Sequence[str | os.PathLike]) -> None:
    """Remove ``folders`` (deepest first) where they are empty; what holds anything stays."""
    for folder in reversed([Path(f) for f in folders]):
        try:
            folder.rmdir()
        except OSError:
            break


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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        problem = _parent_problem(path.parent)
        raise WriteError(path, OSError(error.errno, problem) if problem else error) from None
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
            failure = sys.exc_info()[1]
            if isinstance(failure, OSError) and not isinstance(failure, WriteError):
                raise WriteError(path, failure) from None
            if isinstance(failure, RuntimeError) and _disk_error_in(failure) is not None:
                raise WriteError(path, _disk_error_in(failure)) from None  # torch.save's C++ writer
            raise
    return path


def _disk_error_in(error: BaseException) -> OSError | None:
    """The OSError behind an error of torch.save's C++ writer (it reports a failed write as a
    RuntimeError, "[enforce fail at inline_container.cc] ... unexpected pos ..."; the Python handle's
    OSError is its cause or context), or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError):
            return error
        error = error.__cause__ or error.__context__
    return None


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
