"""Faster R-CNN / Libra R-CNN detector: backbone -> neck -> RPN -> R-CNN stage.

The balancing components of Libra R-CNN plug into this one class: IoU-balanced sampling
lives in the R-CNN sampler (``RoIHead``), the balanced feature pyramid is the second module
of ``neck``, and balanced L1 / LGR losses are the ``RoIHead`` losses. ``libra.presets``
assembles the paper's configurations.

Ground-truth validation (one host sync per batch, in :meth:`FasterRCNN.forward`):

- boxes must be ``[G, 4]`` float, finite, with ``x2 >= x1`` and ``y2 >= y1``; otherwise ValueError;
- boxes with zero width or height (``x2 == x1`` or ``y2 == y1``) are *dropped* (with their labels):
  they cover no pixel, cannot be regressed to (``ln(0)``), and data loaders may legitimately
  produce them after clipping; dropping them is the documented rule;
- labels must be ``[G]`` integers in ``[0, C-1]`` (background C is not a gt label);
- every image must be at least 32 px on each side (the coarsest FPN level has stride 32).

An image with no boxes trains normally: all its samples are negatives.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from libra.roi_head import RoIHead, rescale_boxes
from libra.rpn import Proposals, RegionProposalNetwork

MIN_IMAGE_SIDE = 32


class FasterRCNN(nn.Module):
    """Two-stage detector.

    Args:
        backbone: ``[B, 3, H, W] -> [C2, C3, C4, C5]``.
        neck: ``nn.Sequential`` of ``FPN`` (``neck.0``) and optionally ``BalancedFeaturePyramid``
            (``neck.1``); maps the backbone features to ``[P2, .., P6]``.
        rpn: :class:`RegionProposalNetwork`.
        roi_head: :class:`RoIHead`.
        validate_targets: check the ground truth (see module docstring). Costs one host sync per
            training batch; turn off only for inputs checked elsewhere.

    Attributes:
        num_classes: C, foreground classes.
    """

    def __init__(
        self,
        backbone: nn.Module,
        neck: nn.Sequential,
        rpn: RegionProposalNetwork,
        roi_head: RoIHead,
        validate_targets: bool = True,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.rpn = rpn
        self.roi_head = roi_head
        self.validate_targets = validate_targets

    @property
    def num_classes(self) -> int:
        return self.roi_head.num_classes

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        images: Tensor,
        image_sizes: Sequence[tuple[int, int]],
        targets: Sequence[dict[str, Tensor]] | None = None,
        original_sizes: Sequence[tuple[int, int]] | None = None,
        return_proposals: bool = False,
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Losses in training mode, detections in eval mode.

        Args:
            images: ``[B, 3, H, W]`` normalised images, zero-padded bottom-right.
            image_sizes: ``(h, w)`` of each image before padding (``h <= H``, ``w <= W``).
            targets: per image ``{"boxes": [G, 4] float (resized image coords), "labels": [G] int64
                in [0, C-1], "ignore_boxes": [Gi, 4] (optional)}``; required in training.
            original_sizes: ``(h0, w0)`` per image; eval boxes are rescaled to them.
            return_proposals: eval only; add ``"proposals" [P, 4]`` and ``"proposal_scores" [P]``
                (in the same coordinates as the boxes) to each output dict.

        Returns:
            training: ``{"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "acc"}`` scalars;
            the total loss is the sum of the entries whose key starts with ``"loss"``.
            eval: per image ``{"boxes": [D, 4], "scores": [D], "labels": [D] int64}``.
        """
        image_sizes = self._check_images(images, image_sizes, original_sizes)
        if self.training:
            if targets is None:
                raise ValueError(
                    "targets are required in training mode; call model.eval() to get detections"
                )
            if self.validate_targets:
                targets = self._check_targets(targets, len(image_sizes))
            targets = [_to_device(target, images.device) for target in targets]
            features = self.neck(self.backbone(images))
            proposals, rpn_losses = self.rpn(features, image_sizes, targets)
            roi_losses = self.roi_head(features, proposals, image_sizes, targets)
            return {**rpn_losses, **roi_losses}

        features = self.neck(self.backbone(images))
        proposals, _ = self.rpn(features, image_sizes)
        detections = self.roi_head(features, proposals, image_sizes, None, original_sizes)
        if return_proposals:
            for index, output in enumerate(detections):
                output.update(self._proposal_output(proposals, index, image_sizes, original_sizes))
        return detections

    @torch.no_grad()
    def predict_proposals(
        self,
        images: Tensor,
        image_sizes: Sequence[tuple[int, int]],
        original_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> list[dict[str, Tensor]]:
        """RPN proposals only (for proposal recall), with the test settings when in eval mode.

        Returns:
            Per image ``{"proposals": [P, 4], "proposal_scores": [P]}`` sorted by decreasing score,
            in ``original_sizes`` coordinates when given.
        """
        image_sizes = self._check_images(images, image_sizes, original_sizes)
        features = self.neck(self.backbone(images))
        proposals, _ = self.rpn(features, image_sizes)
        return [
            self._proposal_output(proposals, index, image_sizes, original_sizes)
            for index in range(len(image_sizes))
        ]

    @staticmethod
    def _proposal_output(
        proposals: Proposals,
        index: int,
        image_sizes: Sequence[tuple[int, int]],
        original_sizes: Sequence[tuple[int, int]] | None,
    ) -> dict[str, Tensor]:
        """Valid proposals of image ``index``, rescaled to its original size when given."""
        boxes, scores = proposals.per_image(index)
        if original_sizes is not None:
            boxes = rescale_boxes(boxes[None], image_sizes[index : index + 1], original_sizes[index : index + 1])[0]
        return {"proposals": boxes, "proposal_scores": scores}

    # ------------------------------------------------------------------ validation
    @staticmethod
    def _check_images(
        images: Tensor,
        image_sizes: Sequence[tuple[int, int]],
        original_sizes: Sequence[tuple[int, int]] | None,
    ) -> list[tuple[int, int]]:
        """Shape checks only (host-side values, no device sync)."""
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"images must be a [B, 3, H, W] tensor, got {tuple(getattr(images, 'shape', ())) or type(images).__name__}"
            )
        if not images.is_floating_point():
            raise ValueError(f"images must be normalised floating point, got dtype {images.dtype}")
        batch, _, height, width = images.shape
        if len(image_sizes) != batch:
            raise ValueError(f"got {len(image_sizes)} image_sizes for a batch of {batch} images; pass one (h, w) per image")
        sizes = []
        for index, size in enumerate(image_sizes):
            h, w = (int(v) for v in size)
            if h < MIN_IMAGE_SIDE or w < MIN_IMAGE_SIDE:
                raise ValueError(
                    f"image {index} is {h}x{w} px; each side must be at least {MIN_IMAGE_SIDE} px "
                    "(the coarsest feature level has stride 32): resize it up"
                )
            if h > height or w > width:
                raise ValueError(
                    f"image_sizes[{index}] = {(h, w)} exceeds the padded batch size {(height, width)}"
                )
            sizes.append((h, w))
        if original_sizes is not None:
            if len(original_sizes) != batch:
                raise ValueError(f"got {len(original_sizes)} original_sizes for a batch of {batch} images")
            if any(int(h0) <= 0 or int(w0) <= 0 for h0, w0 in original_sizes):
                raise ValueError(f"original_sizes must be positive (h, w) pairs, got {list(original_sizes)}")
        return sizes

    def _check_targets(self, targets: Sequence[dict[str, Tensor]], batch: int) -> list[dict[str, Tensor]]:
        """Validate the ground truth (one host sync for the whole batch); drop zero-area boxes."""
        if len(targets) != batch:
            raise ValueError(f"got {len(targets)} targets for a batch of {batch} images; pass one dict per image")
        checked: list[dict[str, Tensor]] = []
        flags = []  # per image: [bad box, label out of range, bad ignore box, zero-area box]
        for index, target in enumerate(targets):
            if not isinstance(target, dict) or "boxes" not in target or "labels" not in target:
                raise ValueError(f"targets[{index}] must be a dict with 'boxes' [G, 4] and 'labels' [G]")
            boxes, labels = target["boxes"], target["labels"]
            if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4 or not boxes.is_floating_point():
                raise ValueError(
                    f"targets[{index}]['boxes'] must be a float [G, 4] tensor (x1, y1, x2, y2), "
                    f"got {getattr(boxes, 'dtype', type(boxes).__name__)} {tuple(getattr(boxes, 'shape', ()))}"
                )
            if (
                not isinstance(labels, Tensor)
                or labels.dim() != 1
                or labels.shape[0] != boxes.shape[0]
                or labels.is_floating_point()
                or labels.dtype == torch.bool
            ):
                raise ValueError(
                    f"targets[{index}]['labels'] must be an integer [G] tensor with G = {boxes.shape[0]}, "
                    f"got {getattr(labels, 'dtype', type(labels).__name__)} {tuple(getattr(labels, 'shape', ()))}"
                )
            ignore = target.get("ignore_boxes")
            if ignore is not None and (
                not isinstance(ignore, Tensor) or ignore.dim() != 2 or ignore.shape[1] != 4 or not ignore.is_floating_point()
            ):
                raise ValueError(f"targets[{index}]['ignore_boxes'] must be a float [Gi, 4] tensor or absent")
            flags.append(
                torch.stack(
                    [
                        _invalid_boxes(boxes).any(),
                        ((labels < 0) | (labels >= self.num_classes)).any(),
                        _invalid_boxes(ignore).any() if ignore is not None else boxes.new_zeros((), dtype=torch.bool),
                        _zero_area(boxes).any(),
                    ]
                )
            )
        flags_host = torch.stack(flags).tolist() if flags else []  # the one host sync
        for index, (target, (bad_box, bad_label, bad_ignore, zero_area)) in enumerate(zip(targets, flags_host)):
            boxes, labels = target["boxes"], target["labels"]
            if bad_box:
                row = int(_invalid_boxes(boxes).to(torch.uint8).argmax())
                raise ValueError(
                    f"targets[{index}]['boxes'][{row}] = {boxes[row].tolist()} is not finite or has x2 < x1 / y2 < y1; "
                    "boxes must be finite [x1, y1, x2, y2] with x2 >= x1 and y2 >= y1"
                )
            if bad_label:
                raise ValueError(
                    f"targets[{index}]['labels'] must lie in [0, {self.num_classes - 1}] (num_classes = "
                    f"{self.num_classes}; background is not a gt label), got min {int(labels.min())}, max {int(labels.max())}"
                )
            if bad_ignore:
                raise ValueError(
                    f"targets[{index}]['ignore_boxes'] has a non-finite or inverted box (x2 < x1 or y2 < y1)"
                )
            target = dict(target)
            target["labels"] = labels.to(torch.int64)
            if zero_area:
                keep = ~_zero_area(boxes)
                target["boxes"], target["labels"] = boxes[keep], target["labels"][keep]
            checked.append(target)
        return checked


def _to_device(target: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """Move the tensors the detector reads (boxes, labels, ignore_boxes) to ``device``."""
    moved = dict(target)
    for key in ("boxes", "labels", "ignore_boxes"):
        value = moved.get(key)
        if isinstance(value, Tensor) and value.device != device:
            moved[key] = value.to(device)
    return moved


def _invalid_boxes(boxes: Tensor) -> Tensor:
    """``[N]`` bool: non-finite coordinates or x2 < x1 or y2 < y1."""
    if boxes.numel() == 0:
        return torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    return ~torch.isfinite(boxes).all(dim=1) | (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])


def _zero_area(boxes: Tensor) -> Tensor:
    """``[N]`` bool: zero width or zero height (assumes the boxes are otherwise valid)."""
    return (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
