"""What every detector shares: input checks, ground-truth validation, the final rescale.

A detector (two-stage, one-stage, proposal-only) subclasses :class:`Detector`, composes its own
backbone, neck and heads, and implements the one interface the engine calls (MMDetection 3.x's
``loss`` / ``predict``), on a :class:`~libra.structures.Batch`:

- ``loss(batch) -> {"loss_*": scalar, ...}`` (training; the total loss is the sum of the ``loss*``
  entries);
- ``predict(batch) -> [per image {"boxes", "scores", "labels"(, "masks")}]`` (or proposals, for a
  proposal model), in ``batch.original_sizes`` coordinates;
- ``predict_proposals(batch)`` where ``makes_proposals`` is True (models with an RPN).

``forward`` dispatches to them (``mode``, or the module's training flag), so ``model(batch)``,
DistributedDataParallel and the tensor API ``model(images, image_sizes, targets=...,
original_sizes=...)`` all reach the same code. Each method calls :meth:`Detector.check_batch` first
and :meth:`Detector.postprocess` last, so the checks and the one rescale to the original image
(and the one mask paste) exist once, for every model (torchvision's
``GeneralizedRCNNTransform.postprocess`` plays the same role).

Ground-truth validation (one host sync per batch):

- boxes must be ``[G, 4]`` float, finite, with ``x2 >= x1`` and ``y2 >= y1``; otherwise ValueError;
- boxes with zero width or height (``x2 == x1`` or ``y2 == y1``) are *dropped* (with their labels):
  they cover no pixel, cannot be regressed to (``ln(0)``), and data loaders may legitimately
  produce them after clipping; dropping them is the documented rule;
- labels must be ``[G]`` integers in ``[0, C-1]`` (background C is not a gt label);
- every image must be at least 32 px on each side (the coarsest backbone stage has stride 32).

An image with no boxes trains normally: all its samples are negatives.

Batch independence (``Detector.batch_independent``): a batch is padded to its largest image, and
some parts of a detector see that padding. The balanced feature pyramid resizes every level to the
refine level's *padded* size and its non-local block attends over every position, padding
included (MMDetection's ``BFP`` does the same); convolutions near an image's bottom / right edge
see the padding's activations once a layer has a bias or a BN shift. So an image's scores can
change (by up to ~1e-3) with the other images of its batch. With ``batch_independent = True`` (the
``--batch-independent`` flag of ``eval.py``) ``predict`` / ``predict_proposals`` run each image of a
batch on its own, cut to the padded size it has alone (its size rounded up to 32), so its outputs are
bit-identical to those of a batch of one, whatever the batch holds (on the CPU; on a GPU as far as
its kernels are deterministic), at the cost of batching. Training is unaffected.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
from torch import Tensor, nn

from libra.masks import paste_masks_in_image
from libra.necks import neck_strides
from libra.structures import Batch

MIN_IMAGE_SIDE = 32

_NON_FINITE_IMAGES = (
    "images contain NaN or infinite values; pass finite normalised images "
    "(libra.data.preprocess_images turns 0..255 RGB images into them)"
)

# Output keys that hold boxes (x1, y1, x2, y2) and are rescaled to the original image.
BOX_KEYS = ("boxes", "proposals")


class Detector(nn.Module):
    """Base class of libra's detectors.

    Attributes:
        iou_types: what the evaluator should measure for this model's outputs: ``("bbox",)`` for
            a detector, ``("bbox", "segm")`` with masks, ``("proposal",)`` for a proposal model.
        makes_proposals: the model has an RPN whose proposals :meth:`predict_proposals` returns
            (proposal recall, ``eval.py --save-proposals``).
        takes_proposals: the model runs on pre-computed proposals (``batch.proposals``: Fast R-CNN).
        validate_targets: check the ground truth (module docstring). Costs one host sync per
            training batch; turn off only for inputs checked elsewhere.
    """

    iou_types: tuple[str, ...] = ("bbox",)
    makes_proposals: bool = False
    takes_proposals: bool = False
    # Predict every image of a batch on its own (module docstring): outputs independent of the batch.
    batch_independent: bool = False

    def __init_subclass__(cls, **kwargs) -> None:
        """Every detector's ``predict`` / ``predict_proposals`` honours :attr:`batch_independent`
        (wrapped here once, so that no detector can forget it)."""
        super().__init_subclass__(**kwargs)
        for name in ("predict", "predict_proposals"):
            method = cls.__dict__.get(name)
            if method is not None and not getattr(method, "_per_image", False):
                setattr(cls, name, _per_image_when_independent(method))

    def __init__(self, num_classes: int, validate_targets: bool = True) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 (foreground classes), got {num_classes}")
        self.num_classes = num_classes
        self.validate_targets = validate_targets

    # ------------------------------------------------------------------ interface
    def forward(
        self,
        images: Tensor | Batch,
        image_sizes: Sequence[tuple[int, int]] | None = None,
        targets: Sequence[dict[str, Tensor]] | None = None,
        original_sizes: Sequence[tuple[int, int]] | None = None,
        proposals: Sequence[Tensor] | None = None,
        *,
        mode: str | None = None,
        **predict_options,
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """``loss`` in training mode, ``predict`` in eval mode (or what ``mode`` names:
        ``"loss"``, ``"predict"``, ``"proposals"``).

        Args:
            images: a :class:`~libra.structures.Batch`, or ``[B, 3, H, W]`` normalised images,
                zero-padded bottom-right, with the other arguments (the fields of a ``Batch``).
            image_sizes: ``(h, w)`` of each image before padding (``h <= H``, ``w <= W``).
            targets: per image ``{"boxes": [G, 4] float (resized image coords), "labels": [G] int64
                in [0, C-1], "ignore_boxes": [Gi, 4] (optional)}``; required in training.
            original_sizes: ``(h0, w0)`` per image; eval boxes are rescaled to them.
            proposals: per image ``[P_i, 4]`` pre-computed proposals (Fast R-CNN).
            mode: ``"loss"``, ``"predict"`` or ``"proposals"``; None: by ``self.training``.
            **predict_options: passed to ``predict`` (e.g. ``return_proposals=True``).
        """
        if isinstance(images, Batch):
            batch = images
        else:
            if image_sizes is None:
                raise ValueError("pass image_sizes (one (h, w) per image) with the images, or a libra.structures.Batch")
            batch = Batch(
                images, list(image_sizes), None if original_sizes is None else list(original_sizes),
                None if targets is None else list(targets), None if proposals is None else list(proposals),
            )
        mode = mode or ("loss" if self.training else "predict")
        if mode == "loss":
            return self.loss(batch)
        if mode == "predict":
            return self.predict(batch, **predict_options)
        if mode == "proposals":
            return self.predict_proposals(batch)
        raise ValueError(f"mode must be 'loss', 'predict' or 'proposals', got {mode!r}")

    def loss(self, batch: Batch) -> dict[str, Tensor]:
        """The training losses of ``batch`` (``batch.targets`` required)."""
        raise NotImplementedError

    def predict(self, batch: Batch) -> list[dict[str, Tensor]]:
        """Per image outputs in ``batch.original_sizes`` coordinates (resized ones without them)."""
        raise NotImplementedError

    def predict_proposals(self, batch: Batch) -> list[dict[str, Tensor]]:
        """Per image ``{"proposals": [P, 4], "proposal_scores": [P]}`` by decreasing score (models
        with ``makes_proposals``)."""
        raise ValueError(
            f"{type(self).__name__} makes no proposals of its own (proposal recall and --save-proposals need a "
            "model with an RPN: a Faster / Mask R-CNN or RPN preset)"
        )

    # ------------------------------------------------------------------ inputs
    def check_batch(self, batch: Batch, training: bool) -> tuple[list[tuple[int, int]], list[dict[str, Tensor]] | None]:
        """Check the batch; for ``training`` also validate the targets and move them to the images' device.

        Returns:
            ``(image_sizes as int pairs, targets or None)``.
        """
        return self.check_inputs(batch.images, batch.image_sizes, batch.targets if training else None,
                                 batch.original_sizes, training=training)

    def check_inputs(
        self,
        images: Tensor,
        image_sizes: Sequence[tuple[int, int]],
        targets: Sequence[dict[str, Tensor]] | None,
        original_sizes: Sequence[tuple[int, int]] | None,
        training: bool | None = None,
    ) -> tuple[list[tuple[int, int]], list[dict[str, Tensor]] | None]:
        """Shape checks; in training (``training``, default the module's flag) also target validation."""
        training = self.training if training is None else training
        sizes = check_images(images, image_sizes, original_sizes)
        if not training:
            if not bool(torch.isfinite(images).all()):  # one host sync; inference syncs anyway (NMS)
                raise ValueError(_NON_FINITE_IMAGES)
            return sizes, None
        if targets is None:
            raise ValueError("targets are required in training mode; call model.eval() to get detections")
        if self.validate_targets:
            targets = check_targets(targets, len(sizes), self.num_classes, images_finite=torch.isfinite(images).all())
        return sizes, [targets_to_device(target, images.device) for target in targets]

    @staticmethod
    def check_strides(neck: nn.Module, **consumers: Sequence[int]) -> None:
        """Refuse (one line) a composition whose anchor generator or RoI extractor uses other strides
        than the maps the neck outputs. ``consumers``: name -> strides; an anchor generator must
        cover every level (``anchors=...``), an RoI extractor the first levels (``roi_*=...``)."""
        strides = neck_strides(neck)
        if strides is None:
            return  # a custom neck that does not say
        for name, used in consumers.items():
            used = tuple(int(s) for s in used)
            expected = strides if name == "anchors" else strides[: len(used)]
            if used != expected:
                raise ValueError(
                    f"the {name.replace('_', ' ')} use strides {used} but the neck outputs maps of strides {strides}: "
                    "build them from the neck's strides (libra.necks.neck_strides), as libra.presets.build_model does"
                )

    # ------------------------------------------------------------------ outputs
    mask_thr: float = 0.5  # threshold of pasted mask probabilities (a mask model's own, MaskRCNN)

    def postprocess(
        self,
        outputs: list[dict[str, Tensor]],
        image_sizes: Sequence[tuple[int, int]],
        original_sizes: Sequence[tuple[int, int]] | None,
    ) -> list[dict[str, Tensor]]:
        """The one postprocess of every detector: rescale every box output (``boxes``,
        ``proposals``) from the resized to the original image, and paste mask probabilities
        (``mask_probs`` [D, M, M] at ``boxes``) into the original image at the rescaled boxes,
        thresholded at ``mask_thr`` (``masks`` [D, h0, w0] bool).

        Args:
            outputs: per image dicts in resized image coordinates.
            image_sizes: ``(h, w)`` per image (resized).
            original_sizes: ``(h0, w0)`` per image, or None to keep resized coordinates.
        """
        if original_sizes is not None:
            for output, size, original in zip(outputs, image_sizes, original_sizes):
                for key in BOX_KEYS:
                    if key in output:
                        output[key] = rescale_boxes(output[key], size, original)
        paste_sizes = original_sizes if original_sizes is not None else image_sizes
        for output, size in zip(outputs, paste_sizes):
            if "mask_probs" in output:
                # Pasted at the boxes as returned (rescaled above), so masks and boxes agree.
                probs = output.pop("mask_probs")
                output["masks"] = paste_masks_in_image(probs, output["boxes"], (int(size[0]), int(size[1])), self.mask_thr)
        return outputs


def split_batch(batch: Batch, size_divisibility: int = 32) -> list[Batch]:
    """The images of ``batch`` as batches of one, each cut to the padded size it has alone (its
    ``image_sizes`` entry rounded up to ``size_divisibility``, as ``libra.data.collate`` pads a batch of
    one): exactly the batch a loader would have built for that image."""
    batches = []
    height, width = int(batch.images.shape[-2]), int(batch.images.shape[-1])
    for index, (h, w) in enumerate(batch.image_sizes):
        padded_h = min(height, -(-int(h) // size_divisibility) * size_divisibility)
        padded_w = min(width, -(-int(w) // size_divisibility) * size_divisibility)
        batches.append(Batch(
            batch.images[index:index + 1, :, :padded_h, :padded_w].contiguous(), [batch.image_sizes[index]],
            None if batch.original_sizes is None else [batch.original_sizes[index]],
            None if batch.targets is None else [batch.targets[index]],
            None if batch.proposals is None else [batch.proposals[index]],
            None if batch.image_ids is None else [batch.image_ids[index]],
        ))
    return batches


def _per_image_when_independent(method):
    """``method(self, batch, ...)`` run on every image of the batch alone when ``self.batch_independent``."""

    @functools.wraps(method)
    def wrapper(self, batch, *args, **kwargs):
        if not getattr(self, "batch_independent", False) or not isinstance(batch, Batch) or len(batch) < 2:
            return method(self, batch, *args, **kwargs)
        outputs = []
        for single in split_batch(batch):
            outputs.extend(method(self, single, *args, **kwargs))
        return outputs

    wrapper._per_image = True
    return wrapper


def rescale_boxes(boxes: Tensor, image_size: tuple[int, int], original_size: tuple[int, int]) -> Tensor:
    """Map ``[..., 4]`` boxes of one image from resized to original coordinates (per axis).

    Python-scalar factors ``w0 / w`` and ``h0 / h``: no host-to-device copy.
    """
    (h, w), (h0, w0) = image_size, original_size
    x1, y1, x2, y2 = boxes.unbind(-1)
    sx, sy = w0 / w, h0 / h
    return torch.stack((x1 * sx, y1 * sy, x2 * sx, y2 * sy), dim=-1)


def check_images(
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
    if batch == 0:
        raise ValueError("the batch is empty (images has shape [0, 3, H, W]); pass at least one image")
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
            raise ValueError(f"image_sizes[{index}] = {(h, w)} exceeds the padded batch size {(height, width)}")
        sizes.append((h, w))
    if original_sizes is not None:
        if len(original_sizes) != batch:
            raise ValueError(f"got {len(original_sizes)} original_sizes for a batch of {batch} images")
        if any(int(h0) <= 0 or int(w0) <= 0 for h0, w0 in original_sizes):
            raise ValueError(f"original_sizes must be positive (h, w) pairs, got {list(original_sizes)}")
    return sizes


def check_targets(
    targets: Sequence[dict[str, Tensor]], batch: int, num_classes: int, images_finite: Tensor | None = None
) -> list[dict[str, Tensor]]:
    """Validate the ground truth (one host sync for the whole batch); drop zero-area boxes.

    ``images_finite`` (a 0-dim bool tensor) joins the same host transfer, so checking that the
    images are finite costs no extra sync.
    """
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
                    ((labels < 0) | (labels >= num_classes)).any(),
                    _invalid_boxes(ignore).any() if ignore is not None else boxes.new_zeros((), dtype=torch.bool),
                    _zero_area(boxes).any(),
                ]
            )
        )
    if images_finite is not None:
        flags.append((~images_finite).to(flags[0].device).expand(4))  # a row of its own
    flags_host = torch.stack(flags).tolist() if flags else []  # the one host sync
    if images_finite is not None:
        if flags_host.pop()[0]:
            raise ValueError(_NON_FINITE_IMAGES)
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
                f"targets[{index}]['labels'] must lie in [0, {num_classes - 1}] (num_classes = "
                f"{num_classes}; background is not a gt label), got min {int(labels.min())}, max {int(labels.max())}"
            )
        if bad_ignore:
            raise ValueError(f"targets[{index}]['ignore_boxes'] has a non-finite or inverted box (x2 < x1 or y2 < y1)")
        target = dict(target)
        target["labels"] = labels.to(torch.int64)
        if zero_area:
            keep = ~_zero_area(boxes)
            target["boxes"], target["labels"] = boxes[keep], target["labels"][keep]
            if isinstance(target.get("masks"), Tensor):  # Mask R-CNN: a box's instance mask goes with it
                target["masks"] = target["masks"][keep.to(target["masks"].device)]
        checked.append(target)
    return checked


def targets_to_device(target: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
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
