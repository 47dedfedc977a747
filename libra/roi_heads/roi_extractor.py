"""Multi-level RoI feature extractor: each RoI is pooled from one FPN level.

An RoI of size sqrt(w*h) is pooled from pyramid level
k = floor(log2(sqrt(w*h) / finest_scale + 1e-6)), clamped to the available levels
(finest_scale 56 over P2..P5: < 112 px -> P2, < 224 -> P3, < 448 -> P4, else P5). This
is FPN's rule k = floor(4 + log2(sqrt(wh)/224)) shifted to start at P2.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from libra.ops import roi_align

__all__ = ["map_rois_to_levels", "MultiLevelRoIExtractor"]


def map_rois_to_levels(rois: Tensor, num_levels: int, finest_scale: float = 56.0) -> Tensor:
    """Pyramid level (0 = finest) of each RoI.

    Args:
        rois: [K, 5] (batch_index, x1, y1, x2, y2) in input-image pixels.
        num_levels: number of pyramid levels to choose from.
        finest_scale: RoI scale that maps to the boundary between levels 0 and 1 (x2).

    Returns:
        [K] int64 level indices in [0, num_levels - 1].
    """
    widths = rois[:, 3] - rois[:, 1]
    heights = rois[:, 4] - rois[:, 2]
    scale = torch.sqrt((widths * heights).clamp(min=0))
    # The 1e-6 keeps log2 finite for degenerate boxes (they go to level 0). Non-finite RoIs (a
    # diverged model's proposals) also go to level 0 instead of becoming an invalid index: RoIAlign
    # then yields non-finite features and the loss reports the divergence.
    levels = torch.floor(torch.log2(scale / finest_scale + 1e-6))
    levels = torch.nan_to_num(levels, nan=0.0, posinf=num_levels - 1, neginf=0.0)
    return levels.clamp(0, num_levels - 1).long()


class MultiLevelRoIExtractor(nn.Module):
    """RoIAlign each RoI on the FPN level that matches its size.

    Args:
        output_size: pooled size (7 for the box head).
        featmap_strides: strides of the levels used (P2..P5 = 4, 8, 16, 32); extra
            feature maps passed to ``forward`` (e.g. P6) are ignored.
        sampling_ratio: RoIAlign samples per bin side; 0 = adaptive ceil(roi_size / output_size).
        finest_scale: see ``map_rois_to_levels``.
    """

    def __init__(
        self,
        output_size: int = 7,
        featmap_strides: tuple[int, ...] = (4, 8, 16, 32),
        sampling_ratio: int = 0,
        finest_scale: float = 56.0,
    ):
        super().__init__()
        if len(featmap_strides) == 0:
            raise ValueError("featmap_strides must name at least one level")
        self.output_size = output_size
        self.featmap_strides = tuple(featmap_strides)
        self.sampling_ratio = sampling_ratio
        self.finest_scale = finest_scale

    @property
    def num_levels(self) -> int:
        return len(self.featmap_strides)

    def forward(self, feats: list[Tensor], rois: Tensor) -> Tensor:
        """Pool RoI features.

        Args:
            feats: feature maps [B, C, H_l, W_l], finest first; at least ``num_levels``.
            rois: [K, 5] (batch_index, x1, y1, x2, y2) in input-image pixels.

        Returns:
            [K, C, output_size, output_size], in the order of ``rois``.
        """
        if len(feats) < self.num_levels:
            raise ValueError(
                f"expected at least {self.num_levels} feature maps (strides {self.featmap_strides}), got {len(feats)}"
            )
        if rois.dim() != 2 or rois.shape[1] != 5:
            raise ValueError(f"rois must be [K, 5] (batch_index, x1, y1, x2, y2), got shape {tuple(rois.shape)}")
        num_channels = feats[0].shape[1]
        num_rois = rois.shape[0]
        if num_rois == 0:
            return feats[0].new_zeros(0, num_channels, self.output_size, self.output_size)

        levels = map_rois_to_levels(rois, self.num_levels, self.finest_scale)
        # Group the RoIs by level with one stable sort. RoIAlign needs the number of RoIs
        # of each level as a shape, so reading the per-level counts is the one host sync
        # of this module (one per call, not one per level).
        order = torch.argsort(levels, stable=True)
        counts = torch.bincount(levels, minlength=self.num_levels).tolist()
        rois_by_level = rois.index_select(0, order).split(counts)

        pooled = []
        for level, level_rois in enumerate(rois_by_level):
            if level_rois.shape[0] == 0:
                continue
            pooled.append(
                roi_align(
                    feats[level],
                    level_rois,
                    self.output_size,
                    spatial_scale=1.0 / self.featmap_strides[level],
                    sampling_ratio=self.sampling_ratio,
                    aligned=True,
                )
            )
        pooled_sorted = torch.cat(pooled, dim=0)
        # Undo the sort: row i of pooled_sorted belongs to RoI order[i].
        return torch.empty_like(pooled_sorted).index_copy(0, order, pooled_sorted)

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, featmap_strides={self.featmap_strides}, "
            f"sampling_ratio={self.sampling_ratio}, finest_scale={self.finest_scale}"
        )
