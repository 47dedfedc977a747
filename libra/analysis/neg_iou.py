"""Fig. 3 of the paper: IoU distribution of randomly sampled, IoU-balanced sampled and hard negatives.

Paper Sec. 3.1: "more than 60% hard negatives have an overlap greater than 0.05, but random
sampling only provides us 30% training samples that are greater than the same threshold".
Per image (the model's own training-time RPN proposals, see :mod:`libra.analysis.sampling`):

- random: the negatives of random sampling (Eq. 1, the Faster R-CNN baseline);
- IoU-balanced: the negatives of IoU-balanced sampling (Eq. 2, K bins);
- hard: the same number of negatives as random sampling takes, chosen as the highest
  classification losses among all candidate negatives (OHEM-style hard mining).

The IoU of a negative is its IoU with the nearest gt (the assigner's ``max_overlaps``), in
``[0, neg_iou_thr)`` = ``[0, 0.5)``. Counts are gathered over all images, then turned into shares.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ._io import new_figure, save_outputs
from .sampling import hard_negatives, image_features, roi_candidates, sample_with, sampler_settings, training_proposals

# Fig. 3's x axis: IoU with the nearest gt, 0 .. 0.5 (the R-CNN negative threshold) in 0.05 steps.
DEFAULT_EDGES = tuple(round(0.05 * i, 2) for i in range(11))
HEADLINE_IOU = 0.05  # the threshold of the paper's ">60% vs 30%" statement (Sec. 3.1)
METHODS = ("random", "iou_balanced", "hard")
LABELS = {"random": "random sampling", "iou_balanced": "IoU-balanced sampling", "hard": "hard negatives"}
# Fig. 3 draws IoU-balanced sampling in green (Sec. 3.1: "shown by green color in Figure 3").
COLOURS = {"random": "#1f77b4", "iou_balanced": "#2ca02c", "hard": "#d62728"}


def iou_histogram(ious: Tensor | np.ndarray | Sequence[float], edges: Sequence[float] = DEFAULT_EDGES) -> list[int]:
    """Counts of ``ious`` ``[M]`` in the bins ``[edges[i], edges[i + 1])``; the last bin is closed.

    Values outside ``[edges[0], edges[-1]]`` are not counted (with the default edges every
    negative, IoU < 0.5, is counted).
    """
    values = torch.as_tensor(ious, dtype=torch.float64).reshape(-1).numpy()
    counts, _ = np.histogram(values, bins=np.asarray(edges, dtype=np.float64))
    return [int(c) for c in counts]


def share_above(ious: Tensor | np.ndarray | Sequence[float], threshold: float = HEADLINE_IOU) -> float:
    """Fraction of ``ious`` strictly greater than ``threshold`` (NaN when empty)."""
    values = torch.as_tensor(ious, dtype=torch.float64).reshape(-1)
    return float((values > threshold).double().mean()) if values.numel() else float("nan")


@dataclass
class NegativeIoUs:
    """IoUs (with the nearest gt) of the negatives each method chose, over all images seen."""

    ious: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in METHODS})
    candidates: list[float] = field(default_factory=list)  # every candidate negative's IoU
    images: int = 0

    def add(self, method: str, ious: Tensor) -> None:
        self.ious[method].extend(ious.detach().double().cpu().tolist())

    def summary(self, edges: Sequence[float] = DEFAULT_EDGES, threshold: float = HEADLINE_IOU) -> dict:
        """The figure's data: per method the counts, shares and the share above ``threshold``."""
        result = {"images": self.images, "edges": list(edges), "threshold": threshold, "methods": {}}
        for method, values in [*self.ious.items(), ("all_candidates", self.candidates)]:
            counts = iou_histogram(values, edges)
            total = len(values)
            result["methods"][method] = {
                "count": total,
                "counts": counts,
                "shares": [c / total if total else 0.0 for c in counts],
                "share_above_threshold": share_above(values, threshold),
                "mean_iou": float(np.mean(values)) if total else float("nan"),
            }
        return result


@torch.no_grad()
def collect_negative_ious(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, list[dict]]],
    generator: torch.Generator | None = None,
    iou_balanced: dict | None = None,
    progress: Callable[[int], None] | None = None,
) -> NegativeIoUs:
    """Run the model over ``batches`` and collect the IoUs of the negatives of each method.

    Args:
        model: a two-stage libra detector, in eval mode (it is not changed).
        batches: ``(images [B, 3, H, W], targets)`` as :func:`libra.data.transforms.collate` gives,
            targets with ``boxes`` / ``labels`` / ``img_shape`` (and ``ignore_boxes``).
        generator: RNG of the samplers (reproducible draws).
        iou_balanced: settings of the IoU-balanced sampler (default: the head's, else K=3 as in Libra R-CNN).
        progress: called with the number of images of each batch done.
    """
    device = next(model.parameters()).device
    roi_head = model.roi_head
    random_settings = sampler_settings(roi_head, "random")
    balanced_settings = sampler_settings(roi_head, "iou_balanced", iou_balanced)
    result = NegativeIoUs()
    for images, targets in batches:
        images = images.to(device)
        sizes = [tuple(int(v) for v in t["img_shape"]) for t in targets]
        features = image_features(model, images)
        proposals = training_proposals(model, features, sizes)
        for index, target in enumerate(targets):
            candidates = roi_candidates(roi_head, proposals.boxes[index], proposals.valid[index], target)
            _, random_neg = sample_with(candidates, random_settings, generator)
            _, balanced_neg = sample_with(candidates, balanced_settings, generator)
            hard_neg, _ = hard_negatives(roi_head, features, index, candidates, random_neg.sum())
            iou = candidates.max_overlaps
            result.add("random", iou[random_neg])
            result.add("iou_balanced", iou[balanced_neg])
            result.add("hard", iou[hard_neg])
            result.candidates.extend(iou[candidates.negatives].double().cpu().tolist())
            result.images += 1
        if progress is not None:
            progress(len(targets))
    return result


def plot_negative_ious(summary: dict, path: str | Path, title: str = "") -> tuple[Path, Path]:
    """Fig. 3 as grouped bars (share of each method's negatives per IoU bin); PNG + JSON."""
    edges = summary["edges"]
    centres = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
    width = (edges[1] - edges[0]) / 4
    figure = new_figure(7.5, 4.2)
    axes = figure.add_subplot(1, 1, 1)
    threshold = summary["threshold"]
    for offset, method in zip((-1, 0, 1), METHODS):
        data = summary["methods"][method]
        label = f"{LABELS[method]} ({100 * data['share_above_threshold']:.0f}% > {threshold:g})"
        axes.bar([c + offset * width for c in centres], [100 * s for s in data["shares"]], width=width,
                 color=COLOURS[method], label=label)
    axes.axvline(threshold, color="0.4", linestyle=":", linewidth=1)
    axes.set_xticks(edges)
    axes.set_xticklabels([f"{e:g}" for e in edges])
    axes.set_xlim(edges[0], edges[-1])
    axes.set_xlabel("IoU with the nearest ground truth")
    axes.set_ylabel("share of the negatives (%)")
    counts = sorted({summary["methods"][m]["count"] for m in METHODS})
    counted = f"{counts[0]} negatives per method" if len(counts) == 1 else "/".join(map(str, counts)) + " negatives"
    axes.set_title(title or f"IoU distribution of sampled negatives ({summary['images']} images, {counted})", fontsize=10)
    axes.legend(fontsize=9)
    axes.grid(axis="y", color="0.9")
    axes.set_axisbelow(True)
    figure.tight_layout()
    return save_outputs(figure, summary, path)
