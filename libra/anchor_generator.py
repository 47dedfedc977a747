"""Dense anchors for every level of a feature pyramid (defaults: MMDetection config
``faster-rcnn_r50_fpn_1x_coco``, ``rpn_head.anchor_generator``: scales [8], ratios [0.5, 1, 2],
strides [4, 8, 16, 32, 64]).

Per level the base size equals the stride. For each ratio ``r`` (height/width)
and scale ``s`` an anchor has

    h = stride * s * sqrt(r),    w = stride * s / sqrt(r),

and is centred at ``(x * stride, y * stride)`` for feature cell ``(y, x)``
(no half-pixel offset). The flat order of a level with ``H x W`` cells and ``A``
anchors per cell is ``(y * W + x) * A + a``, which matches a head output
permuted to ``(H, W, A)`` and flattened. Within a cell, anchors are ordered
ratio-major, scale-minor (``a = ratio_index * len(scales) + scale_index``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn


class AnchorGenerator(nn.Module):
    """Generate anchors for a list of feature map sizes.

    Args:
        strides: stride (and base anchor size) of each pyramid level, P2..P6 by default.
        ratios: anchor aspect ratios ``h / w``.
        scales: anchor scales relative to the stride.

    Attributes:
        num_anchors: anchors per feature cell, ``len(ratios) * len(scales)`` (3 by default).
    """

    def __init__(
        self,
        strides: Sequence[int] = (4, 8, 16, 32, 64),
        ratios: Sequence[float] = (0.5, 1.0, 2.0),
        scales: Sequence[float] = (8,),
    ) -> None:
        super().__init__()
        if len(strides) == 0 or len(ratios) == 0 or len(scales) == 0:
            raise ValueError("AnchorGenerator needs at least one stride, one ratio and one scale")
        if any(s <= 0 for s in strides) or any(r <= 0 for r in ratios) or any(s <= 0 for s in scales):
            raise ValueError(
                f"strides, ratios and scales must be positive, got {strides}, {ratios}, {scales}"
            )
        self.strides = tuple(strides)
        self.ratios = tuple(float(r) for r in ratios)
        self.scales = tuple(float(s) for s in scales)
        self.num_anchors = len(self.ratios) * len(self.scales)
        # Cell anchors (centred at 0) per level, [A, 4] (x1, y1, x2, y2) in float64. Buffers, so
        # they move with the model and building anchors needs no host-to-device copy;
        # non-persistent, so they are not in the state_dict.
        for level, stride in enumerate(self.strides):
            self.register_buffer(f"cell_anchors_{level}", self._make_cell_anchors(stride), persistent=False)

    def _make_cell_anchors(self, stride: int) -> Tensor:
        anchors = []
        for ratio in self.ratios:
            for scale in self.scales:
                height = stride * scale * math.sqrt(ratio)
                width = stride * scale / math.sqrt(ratio)
                anchors.append((-width / 2, -height / 2, width / 2, height / 2))
        return torch.tensor(anchors, dtype=torch.float64)

    def forward(
        self,
        feature_sizes: Sequence[tuple[int, int]],
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> list[Tensor]:
        """Anchors of every level.

        Args:
            feature_sizes: ``(H, W)`` of each level's feature map, one per stride.
            device: where to create the anchors (None: where this module is).
            dtype: floating dtype of the anchors.

        Returns:
            One ``[H * W * A, 4]`` tensor per level, in flat order ``(y * W + x) * A + a``.
        """
        if len(feature_sizes) != len(self.strides):
            raise ValueError(
                f"got {len(feature_sizes)} feature sizes for {len(self.strides)} strides {self.strides}; "
                "pass one (H, W) per pyramid level"
            )
        return [
            self._level_anchors(tuple(size), stride, getattr(self, f"cell_anchors_{level}"), device, dtype)
            for level, (size, stride) in enumerate(zip(feature_sizes, self.strides))
        ]

    @staticmethod
    def _level_anchors(
        size: tuple[int, int],
        stride: int,
        cell_anchors: Tensor,
        device: torch.device | str | None,
        dtype: torch.dtype,
    ) -> Tensor:
        height, width = int(size[0]), int(size[1])
        device = cell_anchors.device if device is None else device
        cell = cell_anchors.to(device=device, dtype=dtype)  # [A, 4]; no copy when already there
        shift_x = torch.arange(width, dtype=dtype, device=device) * stride  # [W]
        shift_y = torch.arange(height, dtype=dtype, device=device) * stride  # [H]
        # x varies fastest so that cell (y, x) is row y * W + x.
        grid_y, grid_x = torch.meshgrid(shift_y, shift_x, indexing="ij")  # [H, W] each
        grid_x, grid_y = grid_x.reshape(-1), grid_y.reshape(-1)
        shifts = torch.stack((grid_x, grid_y, grid_x, grid_y), dim=1)  # [H*W, 4]
        return (shifts[:, None, :] + cell[None, :, :]).reshape(-1, 4)  # [H*W*A, 4]

    def valid_flags(
        self,
        feature_sizes: Sequence[tuple[int, int]],
        image_sizes: Sequence[tuple[int, int]],
        device: torch.device | str | None = None,
        size_divisor: int = 32,
    ) -> Tensor:
        """Which anchors lie inside each image's own padded extent (MMDetection's ``valid_flags``).

        In a batch of differently sized images, the cells of the batch's padding beyond an image's
        own padded size (its size rounded up to ``size_divisor``) see no part of that image; their
        anchors are excluded from assignment, sampling and the loss of that image.

        Args:
            feature_sizes: ``(H, W)`` of each level.
            image_sizes: ``(h, w)`` of each image before padding.
            device: where to build the flags (None: where this module is).
            size_divisor: the per-image padding multiple (32, the coarsest backbone stride).

        Returns:
            ``[B, N]`` bool over the anchors of all levels, in the order of :meth:`forward`.
            Built from host integers with ``arange`` comparisons: no host-device copy.
        """
        device = getattr(self, "cell_anchors_0").device if device is None else device
        flags = []
        for height, width in image_sizes:
            padded_h = math.ceil(int(height) / size_divisor) * size_divisor
            padded_w = math.ceil(int(width) / size_divisor) * size_divisor
            levels = []
            for (feat_h, feat_w), stride in zip(feature_sizes, self.strides):
                valid_h = min(math.ceil(padded_h / stride), int(feat_h))
                valid_w = min(math.ceil(padded_w / stride), int(feat_w))
                rows = torch.arange(int(feat_h), device=device) < valid_h  # [H]
                cols = torch.arange(int(feat_w), device=device) < valid_w  # [W]
                cells = (rows[:, None] & cols[None, :]).reshape(-1)  # [H*W], cell y*W + x
                levels.append(cells[:, None].expand(-1, self.num_anchors).reshape(-1))  # [H*W*A]
            flags.append(torch.cat(levels))
        return torch.stack(flags)

    def extra_repr(self) -> str:
        return f"strides={self.strides}, ratios={self.ratios}, scales={self.scales}"
