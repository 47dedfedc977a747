"""Training-progress bookkeeping: smoothed values, ETA, a JSON-lines log and a loss plot.

Only rank 0 writes (the caller decides); values are plain floats, already reduced
over processes by ``libra.engine.distributed.all_reduce_dict``.
"""
from __future__ import annotations

import datetime
import errno
import json
import math
import os
import resource
import sys
import time
from collections import deque
from pathlib import Path
from typing import Iterable

import torch

from libra.atomic_io import atomic_write, writing


class SmoothedValue:
    """A series of floats with its median / mean over the last ``window`` values and its global mean."""

    def __init__(self, window: int = 20) -> None:
        self.values: deque[float] = deque(maxlen=window)
        self.total = 0.0
        self.count = 0

    def update(self, value: float, n: int = 1) -> None:
        self.values.append(float(value))
        self.total += float(value) * n
        self.count += n

    @property
    def median(self) -> float:
        if not self.values:
            return float("nan")
        ordered = sorted(self.values)
        middle = len(ordered) // 2
        return ordered[middle] if len(ordered) % 2 else 0.5 * (ordered[middle - 1] + ordered[middle])

    @property
    def avg(self) -> float:
        return sum(self.values) / len(self.values) if self.values else float("nan")

    @property
    def global_avg(self) -> float:
        return self.total / self.count if self.count else float("nan")

    @property
    def latest(self) -> float:
        return self.values[-1] if self.values else float("nan")


def format_duration(seconds: float) -> str:
    """``3725.2 -> '1:02:05'``; '?' when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    return str(datetime.timedelta(seconds=int(round(seconds))))


def estimate_eta(seconds_per_iter: float, iteration: int, max_iters: int) -> float:
    """Seconds left when ``iteration`` of ``max_iters`` iterations are done at ``seconds_per_iter`` each."""
    return max(0, max_iters - iteration) * seconds_per_iter


def max_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: CUDA ``max_memory_allocated`` on a GPU, peak resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


class MetricLogger:
    """Collects per-iteration values and formats a log line with ETA.

    ``update(**values)`` adds smoothed series (losses, lr, times); ``format_line`` prints
    the window medians of the losses (robust to a spike) and the averages of the times.
    """

    def __init__(self, max_iters: int, window: int = 20) -> None:
        self.max_iters = int(max_iters)
        self.window = window
        self.meters: dict[str, SmoothedValue] = {}

    def update(self, **values: float) -> None:
        for name, value in values.items():
            self.meters.setdefault(name, SmoothedValue(self.window)).update(float(value))

    def eta_seconds(self, iteration: int) -> float:
        """ETA from the mean iteration time over the whole run so far (``iteration`` = iterations
        completed): a window of the last iterations swings with every slow or fast stretch (a
        shared machine, an evaluation), the run's mean settles."""
        meter = self.meters.get("time")
        if meter is None or not meter.count:
            return float("nan")
        return estimate_eta(meter.global_avg, iteration, self.max_iters)

    def summary(self) -> dict[str, float]:
        """Window median of every series except times / lr (averaged / latest)."""
        result = {}
        for name, meter in self.meters.items():
            if name in ("time", "data_time"):
                result[name] = meter.avg
            elif name == "lr":
                result[name] = meter.latest
            else:
                result[name] = meter.median
        return result

    def format_line(self, epoch: int, num_epochs: int, iteration: int, memory_mb: float) -> str:
        values = self.summary()
        losses = "  ".join(
            f"{name}: {value:.4f}" for name, value in values.items() if name not in ("time", "data_time", "lr")
        )
        return (
            f"epoch {epoch + 1}/{num_epochs}  iter {iteration}/{self.max_iters}  "
            f"eta {format_duration(self.eta_seconds(iteration))}  lr {values.get('lr', float('nan')):.6f}  "
            f"{losses}  time {values.get('time', float('nan')):.3f}s  data {values.get('data_time', float('nan')):.3f}s  "
            f"mem {memory_mb:.0f}MB"
        )


class JSONLinesLog:
    """Appends one JSON object per line (flushed at once, so a crash keeps everything logged).

    Each record is one ``write`` of a complete line; a line that a killed process left incomplete
    is skipped by :meth:`read` (and dropped by :meth:`keep_until`).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        with writing(self.path.parent, "the folder of the training log"):
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        line = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
        with writing(self.path, "the training log"):  # disk full, read-only: one-line WriteError
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                if os.fstat(fd).st_size and not self._ends_with_newline(fd):
                    line = b"\n" + line  # after a partial line of a killed run
                written = os.write(fd, line)
                if written != len(line):  # a short write: the disk filled up within the line
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            finally:
                os.close(fd)

    @staticmethod
    def _ends_with_newline(fd: int) -> bool:
        size = os.fstat(fd).st_size
        return os.pread(fd, 1, size - 1) == b"\n" if size else True

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        records = []
        with open(self.path) as handle:
            for line in handle:
                line = line.strip()
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a partial line (killed while writing)
                    continue
                if isinstance(record, dict):
                    records.append(record)
        return records

    def drop(self, mode: str, iteration: int) -> int:
        """Drop the records of ``mode`` at ``iteration`` (an evaluation repeated there replaces its
        record), atomically. Returns how many were dropped."""
        if not self.path.is_file():
            return 0
        records = self.read()
        kept = [r for r in records if not (r.get("mode") == mode and int(r.get("iter", -1) or 0) == iteration)]
        if len(kept) == len(records):
            return 0
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept)
        atomic_write(self.path, lambda handle: handle.write(text.encode("utf-8")))
        return len(records) - len(kept)

    def keep_until(self, iteration: int) -> int:
        """Drop the records after ``iteration`` (those of iterations a resumed run repeats), atomically.
        Returns how many were dropped."""
        if not self.path.is_file():
            return 0
        records = self.read()
        kept = [r for r in records if int(r.get("iter", 0) or 0) <= iteration]
        with open(self.path, "rb") as handle:
            lines = sum(1 for line in handle if line.strip())
        if len(kept) == lines:
            return 0
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept)
        atomic_write(self.path, lambda handle: handle.write(text.encode("utf-8")))
        return lines - len(kept)


_plot_warned = False


def plot_losses(records: Iterable[dict], path: str | os.PathLike, width: int = 800, height: int = 480) -> Path | None:
    """Draw the training curves of the log records (every ``loss*`` series, the lr and the
    evaluation metrics against the iteration) into a ``width`` x ``height`` PNG with matplotlib,
    written atomically (:func:`libra.analysis.training_curves.plot_training_curves`).

    Returns the path written, or None when there is nothing to plot (no finite loss) or matplotlib
    is not installed (a warning says so once; training goes on).
    """
    global _plot_warned
    from libra.analysis._io import MATPLOTLIB_HINT, AnalysisError
    from libra.analysis.training_curves import plot_training_curves

    try:
        return plot_training_curves(records, path, width=width, height=height)
    except AnalysisError as error:
        if str(error) != MATPLOTLIB_HINT:
            raise
        if not _plot_warned:
            _plot_warned = True
            print(f"warning: {path} is not drawn: {MATPLOTLIB_HINT}", file=sys.stderr, flush=True)
        return None


class Timer:
    """Wall-clock timer that synchronises CUDA first (so GPU time is measured, not launch time)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.start = self.now()

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self) -> float:
        current = self.now()
        elapsed = current - self.start
        self.start = current
        return elapsed
