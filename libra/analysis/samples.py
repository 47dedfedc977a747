"""Fig. 6 of the paper: the training samples of an image under random and IoU-balanced sampling.

For each image the model's own training-time proposals are assigned and sampled twice, with
random sampling (Eq. 1) and with IoU-balanced sampling (Eq. 2) (:mod:`libra.analysis.sampling`);
the two sets are drawn side by side: ground truth dashed white, sampled positives yellow, sampled
negatives red, each with a thin dark rim so that they show on any background (a random subset of
each, the same number per sampler, so that the boxes stay readable). IoU-balanced sampling moves
the negatives from the empty background onto the objects' surroundings (Sec. 3.1).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ._io import new_figure, save_outputs
from .sampling import SAMPLERS, image_features, roi_candidates, sample_with, sampler_settings, training_proposals

TITLES = {"random": "random sampling", "iou_balanced": "IoU-balanced sampling"}


@torch.no_grad()
def collect_samples(
    model: nn.Module,
    images: Tensor,
    targets: list[dict],
    generator: torch.Generator | None = None,
    iou_balanced: dict | None = None,
) -> list[dict]:
    """The sampled RoIs of every image of one batch, for both samplers.

    Args:
        model: a two-stage libra detector in eval mode.
        images: ``[B, 3, H, W]`` normalised batch; targets: its target dicts.

    Returns:
        Per image ``{"image_id", "gt_boxes" [G][4], "samplers": {name: {"positives": [[x1, y1, x2, y2,
        iou], ...], "negatives": [...]}}}`` in resized image coordinates.
    """
    device = next(model.parameters()).device
    images = images.to(device)
    sizes = [tuple(int(v) for v in t["img_shape"]) for t in targets]
    features = image_features(model, images)
    proposals = training_proposals(model, features, sizes)
    out = []
    for index, target in enumerate(targets):
        candidates = roi_candidates(model.roi_head, proposals.boxes[index], proposals.valid[index], target)
        entry = {"image_id": int(target["image_id"]), "image_size": list(sizes[index]),
                 "gt_boxes": candidates.gt_boxes.cpu().tolist(), "samplers": {}}
        for name in SAMPLERS:
            positive, negative = sample_with(candidates, sampler_settings(model.roi_head, name, iou_balanced), generator)
            rows = torch.cat([candidates.boxes, candidates.max_overlaps[:, None]], dim=1).cpu()
            entry["samplers"][name] = {
                "positives": rows[positive.cpu()].tolist(),
                "negatives": rows[negative.cpu()].tolist(),
            }
        out.append(entry)
    return out


def _subset(rows: list, limit: int | None, rng: np.random.Generator) -> list:
    """A uniformly random subset of at most ``limit`` rows (all when ``limit`` is None)."""
    if limit is None or len(rows) <= limit:
        return rows
    keep = np.sort(rng.choice(len(rows), size=limit, replace=False))
    return [rows[i] for i in keep]


def plot_samples(
    images_rgb: Sequence[np.ndarray],
    samples: list[dict],
    path: str | Path,
    max_negatives: int | None = 40,
    max_positives: int | None = 12,
    seed: int = 0,
) -> tuple[Path, Path]:
    """One row per image, random | IoU-balanced; PNG + JSON (the JSON holds every sampled box).

    Args:
        images_rgb: per image ``[h, w, 3]`` uint8 (the resized, unpadded image).
        samples: :func:`collect_samples` output for the same images.
        max_negatives, max_positives: draw a uniformly random subset of at most this many of each
            sampler's negatives / positives (None: all), so that the boxes stay readable; the titles'
            counts and shares are over all sampled boxes.
    """
    rng = np.random.default_rng(seed)
    from matplotlib import patheffects
    from matplotlib.patches import Rectangle

    rim = [patheffects.withStroke(linewidth=1.5, foreground="black")]

    rows = len(samples)
    figure = new_figure(7.0, 3.6 * rows)
    for row, (image, entry) in enumerate(zip(images_rgb, samples)):
        for column, name in enumerate(SAMPLERS):
            axes = figure.add_subplot(rows, 2, row * 2 + column + 1)
            axes.imshow(image, interpolation="nearest")
            chosen = entry["samplers"][name]
            negatives = chosen["negatives"]
            for x1, y1, x2, y2, _ in _subset(negatives, max_negatives, rng):
                axes.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="#ff4d4d",
                                         linewidth=0.8, path_effects=rim))
            for x1, y1, x2, y2, _ in _subset(chosen["positives"], max_positives, rng):
                axes.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="#ffe100", linewidth=0.8,
                                         path_effects=rim))
            for x1, y1, x2, y2 in entry["gt_boxes"]:
                axes.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="white", linewidth=1.6,
                                         linestyle="--", path_effects=[patheffects.withStroke(linewidth=3, foreground="black")]))
            ious = np.asarray([r[4] for r in negatives]) if negatives else np.zeros(0)
            above = 100 * float((ious > 0.05).mean()) if ious.size else 0.0
            axes.set_title(f"{TITLES[name]}: {len(chosen['positives'])} pos, {len(negatives)} neg "
                           f"({above:.0f}% IoU > 0.05)", fontsize=8)
            if row == rows - 1 and column == 0 and (max_negatives is not None or max_positives is not None):
                axes.set_xlabel(f"drawn: at most {max_negatives} negatives (red) and {max_positives} positives "
                                "(yellow) of each sampler; gt dashed", fontsize=7, loc="left")
            axes.set_xticks([])
            axes.set_yticks([])
            h, w = entry["image_size"]
            axes.set_xlim(0, w)
            axes.set_ylim(h, 0)
    figure.tight_layout()
    return save_outputs(figure, {"images": samples}, path, palette=True)
