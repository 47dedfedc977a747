"""Fig. 4 of the paper: heatmaps of the pyramid levels before and after the balanced feature pyramid.

The neck of a Libra detector is ``FPN`` (``model.neck[0]``) followed by
``BalancedFeaturePyramid`` (``model.neck[1]``, Sec. 3.2). For one image this module takes

- the FPN outputs ``P_l`` (before), the BFP outputs ``P_l' = P_l + rescaled(f')`` (after);
- the integrated feature ``f`` (Eq. 3, the input of the refiner) and the refined ``f'`` (Eq. 4),
  the latter exactly ``P'_r - P_r`` at the refine level r (where the rescale is the identity);

and draws each as a heatmap of its magnitude: the mean absolute activation over channels,
``[B, C, H, W] -> [H, W]``. Before and after of a level share one colour scale.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ._io import new_figure, save_outputs


def magnitude(feature: Tensor) -> Tensor:
    """Mean absolute activation over channels: ``[C, H, W] -> [H, W]`` (or ``[B, C, H, W] -> [B, H, W]``)."""
    if feature.dim() not in (3, 4):
        raise ValueError(f"expected a [C, H, W] or [B, C, H, W] feature map, got shape {tuple(feature.shape)}")
    return feature.abs().mean(dim=-3)


@torch.no_grad()
def pyramid_features(model: nn.Module, images: Tensor) -> dict[str, list[Tensor] | Tensor | int]:
    """The features of Fig. 4 for a batch ``[B, 3, H, W]``.

    Returns:
        ``{"before": [P_l [B, C, H_l, W_l]], "after": [P_l'], "integrated": f [B, C, H_r, W_r],
        "refined": f' [B, C, H_r, W_r], "refine_level": r, "level_names": ["P2", ...]}``.

    Raises:
        ValueError: the model's neck has no balanced feature pyramid.
    """
    from libra.necks import BalancedFeaturePyramid

    neck = getattr(model, "neck", None)
    if not isinstance(neck, nn.Sequential) or len(neck) < 2 or not isinstance(neck[1], BalancedFeaturePyramid):
        kinds = [type(m).__name__ for m in neck] if isinstance(neck, nn.Sequential) else [type(neck).__name__]
        raise ValueError(
            f"the bfp figure needs a model whose neck is FPN + BalancedFeaturePyramid (a Libra preset or --neck bfp); "
            f"this model's neck is {' + '.join(kinds)}"
        )
    bfp = neck[1]
    backbone_features = model.backbone(images.to(next(model.parameters()).device))
    before = neck[0](backbone_features)
    captured: list[Tensor] = []
    handle = None
    if bfp.refine is not None:  # the refiner's input is the integrated feature f of Eq. 3
        handle = bfp.refine.register_forward_pre_hook(lambda module, inputs: captured.append(inputs[0].clone()))
    try:
        after = bfp(list(before))
    finally:
        if handle is not None:
            handle.remove()
    level = bfp.refine_level
    refined = after[level] - before[level]
    integrated = captured[0] if captured else refined
    first = 2 + int(getattr(neck[0], "start_level", 0))  # P2 for Faster R-CNN, P3 for RetinaNet (start level 1)
    return {"before": list(before), "after": list(after), "integrated": integrated, "refined": refined,
            "refine_level": level, "level_names": [f"P{first + i}" for i in range(len(before))]}


def plot_pyramid(image_rgb: np.ndarray, features: dict, path: str | Path, image_id: int | None = None) -> tuple[Path, Path]:
    """Two rows of heatmaps (FPN levels; BFP levels), the image and f / f' in the first column.

    Args:
        image_rgb: ``[h, w, 3]`` uint8, the resized image the features were computed on.
        features: :func:`pyramid_features` for a batch of one image.
    """
    before = [magnitude(f[0]).float().cpu().numpy() for f in features["before"]]
    after = [magnitude(f[0]).float().cpu().numpy() for f in features["after"]]
    integrated = magnitude(features["integrated"][0]).float().cpu().numpy()
    refined = magnitude(features["refined"][0]).float().cpu().numpy()
    levels = len(before)
    level_names = features.get("level_names") or [f"P{2 + i}" for i in range(levels)]
    figure = new_figure(2.0 * (levels + 1), 4.6)
    grid = figure.add_gridspec(2, levels + 1)
    axes = figure.add_subplot(grid[0, 0])
    axes.imshow(image_rgb, interpolation="nearest")
    axes.set_title("image" + (f" {image_id}" if image_id is not None else ""), fontsize=9)
    axes.axis("off")
    axes = figure.add_subplot(grid[1, 0])
    axes.imshow(refined, cmap="jet", interpolation="nearest")
    axes.set_title(f"balanced f' (at {level_names[features['refine_level']]})", fontsize=9)
    axes.axis("off")
    data = {"image_id": image_id, "refine_level": level_names[features["refine_level"]], "magnitude": "mean |x| over channels",
            "levels": [], "integrated_mean": float(integrated.mean()), "refined_mean": float(refined.mean())}
    for index in range(levels):
        low = float(min(before[index].min(), after[index].min()))
        high = float(max(before[index].max(), after[index].max()))
        for row, (maps, what) in enumerate(((before, "FPN"), (after, "BFP"))):
            axes = figure.add_subplot(grid[row, index + 1])
            axes.imshow(maps[index], cmap="jet", vmin=low, vmax=high, interpolation="nearest")
            axes.set_title(f"{what} {level_names[index]} (mean {maps[index].mean():.2f})", fontsize=8)
            axes.axis("off")
        data["levels"].append({
            "name": level_names[index], "shape": list(before[index].shape),
            "before_mean": float(before[index].mean()), "after_mean": float(after[index].mean()),
            "before_max": float(before[index].max()), "after_max": float(after[index].max()),
        })
    figure.suptitle("Balanced feature pyramid: per-level feature magnitude before (top) and after (bottom)", fontsize=10)
    figure.tight_layout()
    return save_outputs(figure, data, path)
