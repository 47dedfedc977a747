"""Shared test fixtures: a tiny stand-in backbone, a single-threaded mode, and the checks of a
script's exit (``assert_ok``, ``error_line``, ``assert_clean_error``) the fault tests share.

Tests import :class:`TinyBackbone` with ``from conftest import TinyBackbone`` (pytest puts this
folder on ``sys.path``) and opt into :func:`single_thread` with
``pytestmark = pytest.mark.usefixtures("single_thread")``.
"""

from __future__ import annotations

from collections.abc import Sequence

import subprocess

import pytest
import torch
from torch import nn


class TinyBackbone(nn.Module):
    """Five stride-2 convs + ReLU: C2..C5 at strides 4..32 with few channels (a test stand-in for
    ResNet that exercises every detector component except the ResNet itself).

    Args:
        out_channels: channels of C2..C5.
    """

    def __init__(self, out_channels: Sequence[int] = (16, 32, 64, 128)) -> None:
        super().__init__()
        self.out_channels = list(out_channels)
        channels = [3, self.out_channels[0], *self.out_channels]
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels[i], channels[i + 1], 3, stride=2, padding=1), nn.ReLU())
            for i in range(5)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for index, stage in enumerate(self.stages):
            x = stage(x)
            if index >= 1:
                outputs.append(x)
        return outputs


@pytest.fixture
def single_thread():
    """Run single-threaded, restoring the setting afterwards. The shared CI cores are
    oversubscribed: measured here, two intra-op threads made the detector tests 4-10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"


def error_line(stderr: str) -> str:
    """The one 'error: ...' line of a failed run (and no traceback)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


def assert_clean_error(result: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    """Exit ``code`` with exactly one 'error: ...' line holding every fragment (and no traceback)."""
    assert result.returncode == code, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    line = error_line(result.stderr)
    for fragment in fragments:
        assert fragment in line, line
    return line
