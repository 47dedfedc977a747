"""Balanced Feature Pyramid (paper Sec. 3.2, Fig. 4, Eq. 3-4; MMDetection
`libra-faster-rcnn_r50_fpn_1x_coco`: `model.neck` BFP `num_levels=5 refine_level=2
refine_type='non_local'`).

Runs after the FPN on ``[P2, ..., P6]`` and strengthens every level with the SAME balanced
semantic feature, in four steps:

1. Rescale (gather): every level is resized to the size of the refine level (P4 for
   ``refine_level=2``): finer levels by adaptive max pooling, coarser levels by nearest
   interpolation (the resize targets the exact size, so odd sizes work).
2. Integrate: the balanced semantic feature is their plain average (Eq. 3):
   ``f = 1/L * sum_l rescaled(P_l)``.
3. Refine: ``f`` goes through an embedded-Gaussian non-local block (Eq. 4, default), or a
   3x3 conv + ReLU (``'conv'``), or nothing (``None``: "Integration" row of Table 5, no parameters).
4. Strengthen (scatter): ``f`` is resized back with the reverse operations (finer levels get
   nearest interpolation, coarser levels adaptive max pooling) and added as a residual:
   ``out_l = P_l + rescaled_l(f)``.

With 256 channels and the non-local refiner the module has 4 x (256*256 + 256) = 263,168
parameters, all in ``refine``; nothing else is learned.

Depends on torch and the sibling ``non_local.py`` only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .non_local import NonLocal2d

_REFINE_TYPES = ("non_local", "conv", None)


class ConvRefine(nn.Module):
    """The "conv" refiner: 3x3 conv (with bias) + ReLU. Xavier-uniform init, zero bias.

    Shapes: ``[B, C, H, W] -> [B, C, H, W]``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        nn.init.xavier_uniform_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.conv(x))


def _resize_to(feat: Tensor, size: tuple[int, int], use_max_pool: bool) -> Tensor:
    """Resize ``[B, C, h, w]`` to ``[B, C, *size]``: adaptive max pooling (to shrink) or nearest
    interpolation (legacy 'nearest', to enlarge). Which one is chosen by level order, not by size."""
    if tuple(feat.shape[-2:]) == tuple(size):
        return feat  # both operations are the identity at equal size
    if use_max_pool:
        return F.adaptive_max_pool2d(feat, output_size=size)
    return F.interpolate(feat, size=size, mode="nearest")


class BalancedFeaturePyramid(nn.Module):
    """Gather -> average (Eq. 3) -> refine (Eq. 4) -> scatter-add over a feature pyramid.

    Args:
        in_channels: channels of every pyramid level (256).
        num_levels: number of levels given to ``forward`` (5 for P2..P6).
        refine_level: index of the level whose size the levels are gathered to (2 -> P4).
        refine_type: ``'non_local'`` (default, paper), ``'conv'`` (3x3 conv + ReLU) or ``None``.

    Attributes:
        refine: the refinement module (``NonLocal2d``, ``ConvRefine``) or ``None``.

    Shapes:
        input ``feats[l]``: ``[B, in_channels, H_l, W_l]`` (any sizes, any parity);
        output: a list with exactly the input shapes.
    """

    def __init__(
        self,
        in_channels: int = 256,
        num_levels: int = 5,
        refine_level: int = 2,
        refine_type: str | None = "non_local",
    ) -> None:
        super().__init__()
        if not 0 <= refine_level < num_levels:
            raise ValueError(f"refine_level must be in [0, num_levels={num_levels}), got {refine_level}")
        if refine_type not in _REFINE_TYPES:
            raise ValueError(f"refine_type must be one of {_REFINE_TYPES}, got {refine_type!r}")
        self.in_channels = in_channels
        self.num_levels = num_levels
        self.refine_level = refine_level
        self.refine_type = refine_type
        self.refine: nn.Module | None
        if refine_type == "non_local":
            # Inter channels = in_channels, no 1/sqrt(C) scaling: MMDetection's BFP builds mmcv's
            # `NonLocal2d(in_channels, reduction=1, use_scale=False)`.
            self.refine = NonLocal2d(in_channels, reduction=1)
        elif refine_type == "conv":
            self.refine = ConvRefine(in_channels)
        else:
            self.refine = None

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        """``[P2, ..., P6] -> [P2', ..., P6']`` with ``P_l' = P_l + rescaled(refine(mean_l rescaled(P_l)))``."""
        if not isinstance(feats, (list, tuple)) or len(feats) != self.num_levels:
            got = len(feats) if isinstance(feats, (list, tuple)) else type(feats).__name__
            raise ValueError(f"BalancedFeaturePyramid expects a list of {self.num_levels} maps, got {got}")
        for index, feat in enumerate(feats):
            if feat.dim() != 4 or feat.shape[1] != self.in_channels:
                raise ValueError(
                    f"BalancedFeaturePyramid: level {index} must be [B, {self.in_channels}, H, W], "
                    f"got {tuple(feat.shape)}"
                )

        # Steps 1-2 (Eq. 3): rescale every level to the refine level's size and average.
        gather_size = tuple(feats[self.refine_level].shape[-2:])
        balanced = sum(
            _resize_to(feat, gather_size, use_max_pool=level < self.refine_level) for level, feat in enumerate(feats)
        ) / self.num_levels

        # Step 3 (Eq. 4): refine the balanced semantic feature.
        if self.refine is not None:
            balanced = self.refine(balanced)

        # Step 4: reverse rescaling (finer levels are enlarged, coarser ones pooled) + residual add.
        return [
            feat + _resize_to(balanced, tuple(feat.shape[-2:]), use_max_pool=level > self.refine_level)
            for level, feat in enumerate(feats)
        ]
