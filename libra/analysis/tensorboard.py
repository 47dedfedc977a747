"""Optional TensorBoard logging (``train.py --tensorboard``) beside the run's ``log.jsonl``.

:class:`TensorBoardLog` wraps the trainer's :class:`~libra.engine.metric_logger.JSONLinesLog`: every
record written to ``log.jsonl`` is also written as scalars to ``WORK_DIR/tensorboard`` (train
records under ``train/<name>``, evaluations under ``val/<name>``, at the record's iteration), so
``tensorboard --logdir WORK_DIR/tensorboard`` shows the same numbers. ``log.jsonl`` stays the
record of the run; the event files are a view of it. The writer is created on the first record,
so nothing is written before training starts.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

TENSORBOARD_HINT = "--tensorboard needs the tensorboard package: pip install tensorboard (or leave out --tensorboard)"

# Record fields that are bookkeeping, not curves.
_SKIPPED = ("mode", "epoch", "iter")


def require_tensorboard() -> None:
    """Raise ``ValueError`` with :data:`TENSORBOARD_HINT` when ``torch.utils.tensorboard`` cannot be used."""
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise ValueError(TENSORBOARD_HINT) from None


class TensorBoardLog:
    """A ``JSONLinesLog`` that also sends each record's numbers to TensorBoard.

    Args:
        log: the run's ``JSONLinesLog`` (``write`` / ``read`` / ``keep_until`` are passed on).
        log_dir: where the event files go (default ``<log folder>/tensorboard``).
    """

    def __init__(self, log, log_dir: str | os.PathLike | None = None) -> None:
        self.log = log
        self.log_dir = Path(log_dir) if log_dir is not None else Path(log.path).parent / "tensorboard"
        self._writer = None

    @property
    def path(self) -> Path:
        return self.log.path

    def read(self) -> list[dict]:
        return self.log.read()

    def keep_until(self, iteration: int) -> int:
        return self.log.keep_until(iteration)

    def write(self, record: dict) -> None:
        self.log.write(record)
        from libra.atomic_io import writing

        with writing(self.log_dir, "the TensorBoard events"):  # disk full, read-only: one-line WriteError
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(self.log_dir))
            prefix = "val" if record.get("mode") == "val" else "train"
            step = int(record.get("iter", 0) or 0)
            for name, value in record.items():
                if name in _SKIPPED or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                if math.isfinite(float(value)):
                    self._writer.add_scalar(f"{prefix}/{name}", float(value), step)
            self._writer.flush()  # a record every log interval: cheap, and a killed run keeps its curves

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
