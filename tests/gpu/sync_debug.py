"""Find host synchronisations on CUDA with ``torch.cuda.set_sync_debug_mode``.

Used by ``tests/test_cuda_sync.py`` (sync-free checks) and ``tests/gpu/count_syncs.py`` (syncs per
training iteration). Two tools:

- :func:`no_host_sync`: inside it, every synchronizing CUDA call raises ``RuntimeError`` (mode
  ``"error"``). On the CPU it does nothing, so a test written with it runs the same code path
  there ("logic mode": the outputs are checked, the syncs are not).
- :class:`SyncRecorder`: records every synchronizing call (mode ``"warn"``) with the Python stack
  at that moment, reduced to the innermost frame inside this repository (the *site*: file, line,
  function, source line) and the innermost frame outside it (the *op*, e.g.
  ``torch/cuda/__init__.py:synchronize``). On the CPU it records nothing (``available`` is False).

What the debug mode sees (PyTorch docs, "prototype"): ``.item()`` / ``bool()`` / ``.tolist()`` /
``.cpu()`` of CUDA tensors, ``nonzero``, boolean-mask indexing, ``torch.cuda.synchronize``, copies
from the host with ``non_blocking=False`` (e.g. ``torch.tensor(..., device="cuda")``) and other
calls that go through c10's ``stream_synchronize`` / ``memcpy_and_sync``. It does not see a
``non_blocking=True`` copy from pageable host memory (the driver stages it synchronously), nor
syncs inside third-party C++ that calls the CUDA runtime directly: a zero count is "none that the
debug mode can see". Warnings raised on autograd's worker threads are replayed by the engine at
the end of ``backward()``, so a sync of the backward pass is attributed to the line that called
``backward()``.
"""

from __future__ import annotations

import contextlib
import linecache
import os
import sys
import tempfile
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

REPO = Path(__file__).resolve().parents[2]
# The text of the warning / error that c10::cuda::warn_or_error_on_sync raises.
SYNC_MESSAGE = "called a synchronizing"
_THIS_FILE = str(Path(__file__).resolve())


def sync_debug_available(device: torch.device | str) -> bool:
    """True when ``device`` is a CUDA device that is actually present."""
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


@contextlib.contextmanager
def no_host_sync(device: torch.device | str) -> Iterator[None]:
    """Raise ``RuntimeError`` on any synchronizing CUDA call inside; a no-op on the CPU.

    Synchronises first so that work queued before the block (e.g. lazy initialisation) cannot be
    blamed on it, and restores the previous debug mode afterwards.
    """
    device = torch.device(device)
    if not sync_debug_available(device):
        yield
        return
    torch.cuda.synchronize(device)
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings():
        # set_sync_debug_mode warns once that the mode is a prototype: not a finding.
        warnings.filterwarnings("ignore", message=".*[Ss]ynchronization debug mode")
        torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def is_sync_error(error: BaseException) -> bool:
    """Whether ``error`` is the debug mode's "called a synchronizing CUDA operation"."""
    return SYNC_MESSAGE in str(error)


@dataclass
class SyncEvent:
    """One synchronizing call.

    Attributes:
        site: ``path:line`` of the innermost frame inside the repository (relative path).
        function: that frame's function.
        code: that frame's source line.
        op: ``path:line function`` of the innermost frame outside the repository (a torch
            function such as ``torch.cuda.synchronize``), or "" when the sync came straight from
            repository code (``.tolist()``, ``bool(t)``, ...).
        via: up to three outer repository frames, innermost first (``path:line function``).
        tag: what the recorder's ``tag`` function returned at that moment (e.g. the iteration).
    """

    site: str
    function: str
    code: str
    op: str = ""
    via: list[str] = field(default_factory=list)
    tag: Any = None

    def as_dict(self) -> dict:
        return asdict(self)


def _relative(filename: str, root: Path) -> str | None:
    try:
        return str(Path(filename).resolve().relative_to(root))
    except (ValueError, OSError):
        return None


def event_from_stack(frames: list[traceback.FrameSummary], root: Path = REPO, tag: Any = None) -> SyncEvent:
    """Reduce a stack (outermost first, as ``traceback.extract_stack`` returns it) to a :class:`SyncEvent`."""
    frames = [f for f in frames if str(Path(f.filename).resolve()) != _THIS_FILE and "/warnings.py" not in f.filename]
    inside = [(i, f) for i, f in enumerate(frames) if _relative(f.filename, root) is not None]
    if not inside:
        last = frames[-1] if frames else None
        where = f"{last.filename}:{last.lineno}" if last else "?"
        return SyncEvent(site=where, function=last.name if last else "?", code=(last.line or "") if last else "", tag=tag)
    index, frame = inside[-1]
    outside = frames[index + 1 :]
    op = ""
    if outside:
        inner = outside[-1]
        path = inner.filename
        marker = path.rfind("/torch/")
        path = path[marker + 1 :] if marker >= 0 else Path(path).name
        op = f"{path}:{inner.lineno} {inner.name}"
    code = (frame.line or linecache.getline(frame.filename, frame.lineno)).strip()
    via = [f"{_relative(f.filename, root)}:{f.lineno} {f.name}" for _, f in reversed(inside[:-1])][:3]
    return SyncEvent(
        site=f"{_relative(frame.filename, root)}:{frame.lineno}", function=frame.name, code=code, op=op, via=via, tag=tag
    )


# The compiled ops of libra._C. A warning raised inside a torch.ops call is not always turned into a
# Python warning (before pytorch/pytorch#193451 it went to the C++ log on stderr), so the recorder
# also reads the process's stderr and wraps these ops to attribute what appears there.
LIBRA_OPS = ("nms", "batched_nms", "roi_align", "_roi_align_backward")


class _StderrTap:
    """Redirect file descriptor 2 into a temporary file (C++ warnings are written there)."""

    def __enter__(self) -> _StderrTap:
        sys.stderr.flush()
        self.saved = os.dup(2)
        self.file = tempfile.TemporaryFile()
        os.dup2(self.file.fileno(), 2)
        return self

    def position(self) -> int:
        return os.fstat(self.file.fileno()).st_size

    def read(self, start: int, end: int) -> str:
        return os.pread(self.file.fileno(), max(0, end - start), start).decode("utf-8", "replace")

    def __exit__(self, *exc_info) -> None:
        sys.stderr.flush()
        text = self.read(0, self.position())
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.file.close()
        # Give back everything that was not a sync warning (other warnings, error messages).
        rest = "".join(line for line in text.splitlines(keepends=True) if SYNC_MESSAGE not in line)
        if rest:
            sys.stderr.write(rest)
            sys.stderr.flush()


class _OpProbe:
    """Stands in for ``torch.ops.libra.<name>``: calls it and attributes the C++ sync warnings it wrote."""

    def __init__(self, recorder: SyncRecorder, name: str, packet: Any) -> None:
        self._recorder, self._name, self._packet = recorder, name, packet

    def __call__(self, *args, **kwargs):
        try:
            return self._packet(*args, **kwargs)
        finally:
            self._recorder._collect_cpp(traceback.extract_stack()[:-1], f"torch.ops.libra.{self._name}")

    def __getattr__(self, name: str):
        return getattr(self._packet, name)


class SyncRecorder:
    """Record the synchronizing CUDA calls made inside a ``with`` block (``set_sync_debug_mode("warn")``).

    Args:
        device: the device the code runs on; on the CPU nothing is recorded (``available`` False).
        root: frames under this folder are "inside" (default: this repository).
        tag: called at each sync; its value is stored in :attr:`SyncEvent.tag`.

    Python-side syncs are caught as warnings, with the stack. C++ warnings written to stderr (those
    raised inside ``torch.ops`` calls on torch versions that do not convert them) are counted from
    a tap on file descriptor 2; inside the wrapped ``torch.ops.libra`` ops they get the caller's
    stack, elsewhere :meth:`flush_cpp` records them under the site ``"(C++ log)"``. Other warnings
    and stderr output are passed on.
    """

    CPP_SITE = "(C++ log)"

    def __init__(
        self, device: torch.device | str, root: Path | str = REPO, tag: Callable[[], Any] | None = None
    ) -> None:
        self.device = torch.device(device)
        self.root = Path(root).resolve()
        self.tag = tag or (lambda: None)
        self.available = sync_debug_available(self.device)
        self.events: list[SyncEvent] = []
        self._stack = contextlib.ExitStack()
        self._tap: _StderrTap | None = None
        self._consumed = 0

    # ---------------------------------------------------------------- capture
    def _show(self, message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ARG002
        if SYNC_MESSAGE in str(message):
            self.events.append(event_from_stack(traceback.extract_stack()[:-1], self.root, self.tag()))
        else:
            self._previous_show(message, category, filename, lineno, file, line)

    def _new_cpp_warnings(self) -> int:
        if self._tap is None:
            return 0
        sys.stderr.flush()
        end = self._tap.position()
        count = self._tap.read(self._consumed, end).count(SYNC_MESSAGE)
        self._consumed = end
        return count

    def _collect_cpp(self, frames: list[traceback.FrameSummary], op: str) -> None:
        for _ in range(self._new_cpp_warnings()):
            event = event_from_stack(frames, self.root, self.tag())
            event.op = op
            self.events.append(event)

    def flush_cpp(self) -> None:
        """Record the C++ sync warnings written since the last look that no wrapped op claimed."""
        for _ in range(self._new_cpp_warnings()):
            self.events.append(SyncEvent(site=self.CPP_SITE, function="?", code="", op="C++", tag=self.tag()))

    def __enter__(self) -> SyncRecorder:
        if not self.available:
            return self
        torch.cuda.synchronize(self.device)
        self._previous_mode = torch.cuda.get_sync_debug_mode()
        self._stack.enter_context(warnings.catch_warnings())
        # "always": Python would otherwise report a warning of one source line only once.
        warnings.filterwarnings("always", message=f".*{SYNC_MESSAGE}")
        warnings.filterwarnings("ignore", message=".*[Ss]ynchronization debug mode")
        self._previous_show = warnings.showwarning
        warnings.showwarning = self._show  # restored by catch_warnings on exit
        self._tap = self._stack.enter_context(_StderrTap())
        self._consumed = self._tap.position()
        namespace = torch.ops.libra
        for name in LIBRA_OPS:
            try:
                packet = getattr(namespace, name)
            except (AttributeError, RuntimeError):  # libra._C not built
                continue
            setattr(namespace, name, _OpProbe(self, name, packet))
            self._stack.callback(setattr, namespace, name, packet)
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc_info) -> None:
        if self.available:
            torch.cuda.set_sync_debug_mode(self._previous_mode)
            self.flush_cpp()
            self._tap = None
            self._stack.close()

    # ---------------------------------------------------------------- results
    def sites(self) -> dict[str, int]:
        """``{site: count}`` over the recorded events, most frequent first."""
        counts: dict[str, int] = {}
        for event in self.events:
            counts[event.site] = counts.get(event.site, 0) + 1
        return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))

    def files(self) -> set[str]:
        """The repository files (relative paths) in which the recorded syncs were made."""
        return {event.site.rsplit(":", 1)[0] for event in self.events}
