"""Delta (dx, dy, dw, dh) box coding (R-CNN / Faster R-CNN parameterisation; MMDetection's
``DeltaXYWHBBoxCoder``).

For a reference box p (anchor or proposal) and a target box g, with centres
``(x1 + x2) / 2`` and sizes ``x2 - x1`` (no +1):

    dx = (gx - px) / pw,  dy = (gy - py) / ph,  dw = ln(gw / pw),  dh = ln(gh / ph),

then each delta is normalised as ``(d - mean) / std``. The RPN uses mean 0 and
std 1; the R-CNN head std ``(0.1, 0.1, 0.2, 0.2)`` (MMDetection
`configs/_base_/models/faster-rcnn_r50_fpn.py`: `model.rpn_head.bbox_coder
target_stds=[1.0, 1.0, 1.0, 1.0]`, `model.roi_head.bbox_head.bbox_coder
target_stds=[0.1, 0.1, 0.2, 0.2]`). Decoding inverts this,
clamping dw and dh to ``+-max_ratio`` (ln(1000 / 16) = 4.135, the coder's default
``wh_ratio_clip=16 / 1000``) so that exp() cannot blow up, and optionally clips the
result to the image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from libra.boxes import clip_boxes


class DeltaXYWHBoxCoder:
    """Encode boxes as deltas relative to reference boxes and decode them back.

    Args:
        means: per-delta means ``(dx, dy, dw, dh)`` subtracted after encoding.
        stds: per-delta stds the encoded deltas are divided by.
        max_ratio: bound on ``|dw|`` and ``|dh|`` when decoding (log of the largest
            allowed size ratio).
    """

    def __init__(
        self,
        means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
        stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
        max_ratio: float = math.log(1000.0 / 16),
    ) -> None:
        if len(means) != 4 or len(stds) != 4:
            raise ValueError(f"means and stds must have 4 values (dx, dy, dw, dh), got {means}, {stds}")
        if any(s <= 0 for s in stds):
            raise ValueError(f"stds must be positive, got {stds}")
        # Kept as Python floats: arithmetic with them needs no host-to-device copy.
        self.means = tuple(float(m) for m in means)
        self.stds = tuple(float(s) for s in stds)
        self.max_ratio = float(max_ratio)

    def encode(self, boxes: Tensor, gt_boxes: Tensor) -> Tensor:
        """Deltas that move ``boxes`` onto ``gt_boxes``.

        Args:
            boxes: ``[..., 4]`` reference boxes (positive width and height).
            gt_boxes: ``[..., 4]`` target boxes, broadcastable against ``boxes``.

        Returns:
            ``[..., 4]`` normalised deltas ``(dx, dy, dw, dh)``.
        """
        px1, py1, px2, py2 = boxes.unbind(-1)
        gx1, gy1, gx2, gy2 = gt_boxes.unbind(-1)
        pw, ph = px2 - px1, py2 - py1
        gw, gh = gx2 - gx1, gy2 - gy1
        deltas = (
            ((gx1 + gx2) - (px1 + px2)) * 0.5 / pw,
            ((gy1 + gy2) - (py1 + py2)) * 0.5 / ph,
            torch.log(gw / pw),
            torch.log(gh / ph),
        )
        return torch.stack(
            [(d - mean) / std for d, mean, std in zip(deltas, self.means, self.stds)], dim=-1
        )

    def encode_matched(self, boxes: Tensor, gt_boxes: Tensor, gt_index: Tensor, keep: Tensor) -> Tensor:
        """Regression targets of assigned boxes: ``boxes[i] -> gt_boxes[gt_index[i]]`` where ``keep[i]``.

        Args:
            boxes: ``[N, 4]`` anchors or RoIs.
            gt_boxes: ``[G, 4]`` ground truth (G may be 0).
            gt_index: ``[N]`` int64 index into ``gt_boxes``; any value where ``keep`` is False.
            keep: ``[N]`` bool, the rows that get targets (the positives).

        Returns:
            ``[N, 4]``; rows not kept (and every row when G = 0) are zero. Those rows may pair a box
            with an unrelated gt and give inf deltas; zeroing them keeps a 0 weight from meeting an inf.
        """
        if gt_boxes.shape[0] == 0:
            return torch.zeros_like(boxes)
        encoded = self.encode(boxes, gt_boxes[gt_index.clamp(min=0)])
        return torch.where(keep[:, None], encoded, torch.zeros_like(encoded))

    def decode(
        self, boxes: Tensor, deltas: Tensor, max_shape: tuple[int, int] | None = None
    ) -> Tensor:
        """Apply ``deltas`` to ``boxes``.

        Args:
            boxes: ``[..., 4]`` reference boxes.
            deltas: ``[..., 4]`` normalised deltas, broadcastable against ``boxes``
                (e.g. boxes ``[K, 1, 4]`` with class-specific deltas ``[K, C, 4]``).
            max_shape: ``(h, w)`` to clip the decoded boxes to, or None for no clipping.

        Returns:
            ``[..., 4]`` decoded boxes (broadcast shape).
        """
        dx, dy, dw, dh = (
            d * std + mean for d, mean, std in zip(deltas.unbind(-1), self.means, self.stds)
        )
        dw = dw.clamp(min=-self.max_ratio, max=self.max_ratio)
        dh = dh.clamp(min=-self.max_ratio, max=self.max_ratio)
        px1, py1, px2, py2 = boxes.unbind(-1)
        pw, ph = px2 - px1, py2 - py1
        cx = (px1 + px2) * 0.5 + pw * dx
        cy = (py1 + py2) * 0.5 + ph * dy
        half_w = pw * torch.exp(dw) * 0.5
        half_h = ph * torch.exp(dh) * 0.5
        decoded = torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=-1)
        if max_shape is not None:
            decoded = clip_boxes(decoded, max_shape)
        return decoded

    def __repr__(self) -> str:
        return f"DeltaXYWHBoxCoder(means={self.means}, stds={self.stds}, max_ratio={self.max_ratio:.4f})"
