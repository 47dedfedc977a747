"""The error every data loader raises for input it cannot use (a module of its own, so that the
loaders, the proposal files and the engine import it without importing each other)."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """The dataset on disk cannot be used as given; the message is one line naming the file or
    annotation and what to do (``libra.engine.builders`` re-exports it)."""
