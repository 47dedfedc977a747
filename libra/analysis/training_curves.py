"""Training curves from a run's ``log.jsonl``: losses, learning rate and AP per evaluation.

``log.jsonl`` (written by :class:`libra.engine.trainer.Trainer`) holds two kinds of records:

- ``{"mode": "train", "epoch", "iter", "loss", "loss_rpn_cls", ..., "acc", "lr", "time",
  "data_time", "memory_mb", "grad_norm"?}``: window medians every ``--log-interval`` iterations;
- ``{"mode": "val", "epoch", "iter", "AP", "AP50", ...}``: one per evaluation (COCO / LVIS names,
  ``mAP`` for VOC, ``AR@100`` ... for proposals).

:func:`plot_training_curves` draws the losses (left), the learning rate (top right) and the
evaluation metrics (bottom right); the trainer's ``losses.png`` is this figure
(:func:`libra.engine.metric_logger.plot_losses`).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable

from ._io import new_figure, save_figure

# Evaluation numbers drawn in the metrics panel: COCO box AP family, VOC mAP, proposal recall;
# the headline ones when present (the size-wise APs would crowd the small panel; the JSON has all).
_METRIC_PREFIXES = ("AP", "mAP", "AR")
_HEADLINE_METRICS = ("AP", "AP50", "AP75", "mAP", "AR@100", "AR@1000")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


def split_records(records: Iterable[dict]) -> tuple[list[dict], list[dict]]:
    """``(train records, val records)``, each sorted by iteration; records without ``iter`` are dropped."""
    train, val = [], []
    for record in records:
        if not isinstance(record, dict) or not _finite(record.get("iter")):
            continue
        (val if record.get("mode") == "val" else train).append(record)
    return sorted(train, key=lambda r: r["iter"]), sorted(val, key=lambda r: r["iter"])


def curve_data(records: Iterable[dict]) -> dict:
    """``{"losses": {name: [[iter, value], ...]}, "lr": [[iter, lr]], "metrics": {name: [[iter, value]]}}``."""
    train, val = split_records(records)
    names = sorted({k for r in train for k in r if k.startswith("loss") and _finite(r[k])})
    losses = {n: [[r["iter"], float(r[n])] for r in train if _finite(r.get(n))] for n in names}
    lr = [[r["iter"], float(r["lr"])] for r in train if _finite(r.get("lr"))]
    metric_names = sorted({k for r in val for k in r if k.startswith(_METRIC_PREFIXES) and _finite(r[k])})
    metrics = {n: [[r["iter"], float(r[n])] for r in val if _finite(r.get(n))] for n in metric_names}
    return {"losses": {n: v for n, v in losses.items() if v}, "lr": lr, "metrics": metrics}


def headline_metrics(metrics: dict) -> dict:
    """The headline subset of ``metrics`` (all of them when none of the headline names is there)."""
    chosen = {n: v for n, v in metrics.items() if n in _HEADLINE_METRICS}
    return chosen or metrics


def plot_training_curves(
    records: Iterable[dict], path: str | os.PathLike, width: int = 800, height: int = 480, title: str = ""
) -> Path | None:
    """Draw the curves of ``records`` into a ``width`` x ``height`` px PNG at ``path`` (atomically).

    Returns the path, or None when no record has a finite loss (nothing to plot).
    """
    data = curve_data(records)
    if not data["losses"]:
        return None
    figure = new_figure(width / 100, height / 100, dpi=100)
    grid = figure.add_gridspec(2, 3)
    loss_axes = figure.add_subplot(grid[:, :2])
    for name, points in data["losses"].items():
        xs, ys = zip(*points)
        style = {"color": "black", "linewidth": 2.0} if name == "loss" else {"linewidth": 1.2}
        loss_axes.plot(xs, ys, label=name, **style)
    loss_axes.set_xlabel("iteration")
    loss_axes.set_ylabel("loss (window median)")
    loss_axes.set_ylim(bottom=0)
    loss_axes.grid(color="0.9")
    loss_axes.legend(fontsize=7)
    loss_axes.set_title(title or "training losses", fontsize=9)

    lr_axes = figure.add_subplot(grid[0, 2])
    if data["lr"]:
        xs, ys = zip(*data["lr"])
        lr_axes.plot(xs, ys, color="#9467bd")
    lr_axes.set_title("learning rate", fontsize=9, loc="right")
    lr_axes.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    lr_axes.tick_params(labelsize=7)
    lr_axes.grid(color="0.9")

    metric_axes = figure.add_subplot(grid[1, 2], sharex=lr_axes)
    if data["metrics"]:
        for name, points in headline_metrics(data["metrics"]).items():
            xs, ys = zip(*points)
            metric_axes.plot(xs, ys, marker="o", markersize=3, label=name)
        metric_axes.legend(fontsize=6, ncol=2)
    else:
        metric_axes.text(0.5, 0.5, "no evaluation yet", ha="center", va="center", fontsize=8,
                         transform=metric_axes.transAxes)
    metric_axes.set_title("evaluation", fontsize=9)
    metric_axes.set_xlabel("iteration", fontsize=8)
    metric_axes.tick_params(labelsize=7)
    metric_axes.grid(color="0.9")
    # Fixed margins instead of tight_layout, which costs more than the drawing (this runs at every
    # log interval of a training).
    figure.subplots_adjust(left=0.07, right=0.98, bottom=0.1, top=0.94, wspace=0.45, hspace=0.45)
    return save_figure(figure, path)
