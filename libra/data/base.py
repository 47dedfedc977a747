"""Common machinery of the detection datasets: parsed image records -> (image, target) samples.

A dataset parses its annotation format once into a list of `ImageRecord` (boxes in ORIGINAL
pixel coordinates, float32 [x1, y1, x2, y2], labels 0..C-1) and hands them to
`DetectionDataset`, which decodes the image, applies `DetectionTransform` and builds the
target dict of the interface contract:

    boxes [G, 4] float32 (resized image coords), labels [G] int64, ignore_boxes [Gi, 4],
    image_id int, img_shape (h, w), ori_shape (h0, w0), scale_factor (sx, sy), flip bool,
    and in evaluation mode also difficult [G] bool (VOC; all False elsewhere); with pre-computed
    proposals attached (Fast R-CNN) also proposals [P, 4] (resized image coords) and proposal_scores [P];
    with ``with_masks`` (a mask model, e.g. Mask R-CNN) also masks [G, h, w] uint8 (0/1): each
    box's instance mask in the resized (and flipped) image, padded by `collate` to the batch size.

Instance masks are decoded only when ``with_masks`` is set (`set_with_masks`; the engine sets it
from the model's ``iou_types``), so box-only training never pays for them. They are decoded from
the annotation's polygons or RLE (`libra.masks.decode_masks`) with ``on_invalid="warn"``: a bad
segmentation (empty polygon, polygon outside the image, malformed RLE, none at all) drops that
instance, its box and its label, with a `libra.masks.MaskWarning` naming the image and annotation.

Bad input: the loaders clip ground-truth (and ignore) boxes to the image in original
coordinates and drop those that end up narrower or lower than 1 px (`clip_box_to_image`);
coordinates more than 10 image sizes outside the image are rejected (`check_box_extent`). An
image file that cannot be decoded raises `ImageFileError` (a `DataError`, i.e. a ValueError) with a
one-line message naming the file, also from inside DataLoader workers; `check_image_files` finds
such files up front (the command line's ``--check-images``).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from libra import coco_api
from libra.masks import InvalidMaskError, MaskWarning, check_segmentation, decode_masks

from .errors import DataError
from .proposals import check_coverage
from .transforms import DetectionTransform, sample_generator


@dataclass
class ImageRecord:
    """One image and its parsed ground truth, in original image coordinates.

    boxes: [G, 4] float32; labels: [G] int64 in 0..C-1; difficult: [G] bool (VOC "difficult"
    objects, kept for evaluation); ignore_boxes: [Gi, 4] float32 (COCO crowd regions);
    segmentations: G raw annotation segmentations (COCO / LVIS polygons or RLE dicts, None where an
    annotation has none), one per box in the same order, or None for a format without masks (VOC);
    ann_ids: G annotation ids (named in mask errors), or None.
    """

    image_id: int
    file_path: Path
    width: int
    height: int
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    difficult: np.ndarray = field(default_factory=lambda: np.zeros((0,), bool))
    ignore_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    segmentations: list | None = None
    ann_ids: list | None = None


class ImageFileError(DataError):
    """An image file that exists but cannot be decoded (random bytes, empty, truncated, ...)."""


# What the pre-flight image check of `check_image_files` reads (see its docstring for the costs).
IMAGE_CHECKS: tuple[str, ...] = ("header", "full", "none")
_HEAD_BYTES = 1 << 13  # the markers up to the SOF of most JPEGs (PIL reads on when they go further)
_TAIL_BYTES = 64
_MAX_TAIL_CONFIRMATIONS = 64  # full decodes in "header" mode of files whose end marker is missing


def _error_reason(error: BaseException) -> str:
    """A short one-line reason for a PIL / OS error (without the file name PIL puts in it)."""
    from PIL import UnidentifiedImageError

    if isinstance(error, UnidentifiedImageError):
        return "not an image file PIL can read (unknown format or corrupt header)"
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# Pillow modes of unsigned 16-bit samples (16-bit grayscale PNG / TIFF / PGM). ``convert("RGB")``
# clips their 0..65535 values at 255 (a 0..65535 gradient becomes 0, 255, 255, ...); they are scaled
# by 255 / 65535 instead. (16-bit RGB / RGBA / gray+alpha PNGs open as 8-bit RGB(A), scaled by Pillow.)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def unsupported_pixel_format(im: Image.Image) -> str | None:
    """Why the pixels of an opened image have no defined 0..255 range, or None (usable)."""
    mode = im.mode
    if mode in _SIXTEEN_BIT_MODES or (mode == "I" and im.format == "PNG"):  # older Pillow: 16-bit PNG as "I"
        return None
    if mode == "F":
        return ("its pixels are 32-bit floating point (mode F), which have no defined 0..255 range; convert it to an "
                "8- or 16-bit image")
    if mode.startswith("I"):
        return (f"its pixels are signed or 32-bit integers (mode {mode}), which have no defined 0..255 range; convert "
                "it to an 8- or 16-bit image")
    return None


def image_to_rgb_array(im: Image.Image) -> np.ndarray:
    """``[h, w, 3]`` RGB in 0..255 of an opened image: uint8 for 8-bit images (``convert("RGB")``),
    float32 for 16-bit grayscale (values x 255 / 65535, not clipped). Raises ValueError for pixels
    without a defined range (:func:`unsupported_pixel_format`)."""
    problem = unsupported_pixel_format(im)
    if problem is not None:
        raise ValueError(problem)
    if im.mode in _SIXTEEN_BIT_MODES or im.mode == "I":
        gray = np.asarray(im).astype(np.float32) * np.float32(255.0 / 65535.0)
        return np.repeat(gray[..., None], 3, axis=2)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def load_rgb_image(path: Path, skip_hint: str = "") -> Tensor:
    """Decode an image file to float32 [3, h, w] RGB in 0..255 (no EXIF rotation, like COCO's annotations).

    16-bit grayscale images are scaled (x 255 / 65535), not clipped; images whose pixels have no
    defined range (32-bit float or integer) are refused (:func:`image_to_rgb_array`).
    A file that exists but cannot be decoded raises `ImageFileError` with a one-line message naming
    it (``skip_hint`` says where the image is listed, to skip it); a missing file FileNotFoundError.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            array = image_to_rgb_array(im)
    except Exception as error:  # UnidentifiedImageError, OSError (truncated), SyntaxError, DecompressionBombError, ...
        if isinstance(error, ValueError) and not isinstance(error, OSError) and "no defined 0..255 range" in str(error):
            reason = str(error)
        else:
            reason = "the file is empty (0 bytes)" if _file_size(path) == 0 else _error_reason(error)
        raise ImageFileError(f"cannot decode image file {path}: {reason}; {image_fix_hint(skip_hint)}") from None
    return torch.from_numpy(np.array(array, copy=True)).permute(2, 0, 1).float()


def _file_size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def image_fix_hint(skip_hint: str, many: bool = False, check_flag: bool = True) -> str:
    """What to do about undecodable image files listed in ``skip_hint`` (one line)."""
    what, them = ("them with valid images", "them") if many else ("it with a valid image", "it")
    text = f"replace {what} or remove {them} from {skip_hint or 'the annotation file'} to skip {them}"
    return text + (" (--check-images full finds every undecodable file up front)" if check_flag else "")


def _quick_header(head: bytes) -> tuple[str, tuple[int, int]] | None:
    """(format, (w, h)) from the first bytes of a JPEG or PNG, or None (other format, unusual or
    corrupt header: then PIL decides). About 5x cheaper than ``PIL.Image.open``."""
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR" and len(head) >= 24:
        width, height = struct.unpack(">II", head[16:24])
        return "PNG", (int(width), int(height))
    if head[:3] != b"\xff\xd8\xff":
        return None
    i, n = 2, len(head)
    while i + 4 <= n:
        if head[i] != 0xFF:
            return None
        marker = head[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        (length,) = struct.unpack(">H", head[i + 2 : i + 4])
        if marker in _JPEG_SOF_MARKERS:
            if i + 9 > n:
                return None
            height, width = struct.unpack(">HH", head[i + 5 : i + 9])
            return "JPEG", (int(width), int(height))
        if marker in (0xD9, 0xDA) or length < 2:  # end of image / start of scan before any frame header
            return None
        i += 2 + length
    return None


_JPEG_SOF_MARKERS = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))
# The last bytes of a complete file: JPEG's EOI marker, PNG's IEND chunk.
_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}


def _decode_problem(path: Path) -> str | None:
    try:
        with Image.open(path) as im:
            im.load()
    except Exception as error:
        return _error_reason(error)
    return None


def image_file_problem(path: Path, width: int, height: int, mode: str = "header") -> tuple[str | None, bool]:
    """Why the image file at ``path`` (annotated ``width`` x ``height``) cannot be used, or None.

    Returns ``(problem, tail_suspect)``: in ``"header"`` mode ``tail_suspect`` is True for a JPEG /
    PNG whose end marker is missing from its last bytes (truncated, or trailing data after the
    image); `check_image_files` then decodes it fully to decide.
    """
    size = _file_size(path)
    if size is None:
        return ("file not found" if not path.exists() else "not a readable file"), False
    if size == 0:
        return "the file is empty (0 bytes)", False
    try:
        with open(path, "rb") as f:
            head = f.read(_HEAD_BYTES)
            if size > len(head):
                f.seek(-_TAIL_BYTES, os.SEEK_END)
                tail = f.read(_TAIL_BYTES)
            else:
                tail = head[-_TAIL_BYTES:]
    except OSError as error:
        return _error_reason(error), False
    quick = _quick_header(head) if mode == "header" else None
    if quick is None:
        try:
            with Image.open(path) as im:
                quick = (str(im.format), tuple(im.size))
                if mode == "full":
                    im.load()
                pixels = unsupported_pixel_format(im)
        except Exception as error:
            return _error_reason(error), False
        if pixels is not None:
            return pixels, False
    fmt, (w, h) = quick
    if (w, h) != (int(width), int(height)):
        return (f"decoded size {w} x {h} (w x h) differs from the annotated {int(width)} x {int(height)}; "
                "the annotation does not match the image"), False
    end = _END_MARKERS.get(fmt)
    return None, bool(mode == "header" and end is not None and end not in tail)


def check_image_files(
    records: Sequence[ImageRecord], mode: str = "header", max_full_decodes: int = _MAX_TAIL_CONFIRMATIONS
) -> list[tuple[ImageRecord, str]]:
    """Pre-flight check of every record's image file: ``[(record, problem), ...]`` (empty when all are usable).

    Modes (``--check-images``):
      - ``"header"`` (default): read each file's first 8 KiB and last 64 bytes; the JPEG / PNG
        header gives the size, compared with the annotation (other formats, or headers that go
        on further, through ``PIL.Image.open``, which reads the header only); a missing end
        marker (JPEG EOI / PNG IEND: a truncated download) is confirmed by decoding that file (at
        most ``max_full_decodes`` such files, in case a data set legitimately carries trailing
        bytes after its images). Measured on 2 shared CPU cores, warm page cache, 640 x 480
        JPEGs: 0.03 ms per file, i.e. 3.5-4 s for COCO train2017's 118k images (``PIL.Image.open``
        alone: 0.065-0.15 ms, 8-17 s; the existence ``stat`` of before: 0.005 ms).
      - ``"full"``: decode every image on a thread pool (PIL's decoders release the GIL): 3-6 ms
        per 640 x 480 JPEG, 6-12 min for COCO train2017 on 2 cores; finds damage in the middle
        of a file that a header cannot show.
      - ``"none"``: no check (an undecodable file then fails when it is loaded, with the same
        one-line message).
    Whatever passes the check and still fails to decode raises `ImageFileError` when loaded.
    """
    if mode not in IMAGE_CHECKS:
        raise ValueError(f"image check must be one of {', '.join(IMAGE_CHECKS)}, got {mode!r}")
    if mode == "none":
        return []

    def inspect(record: ImageRecord) -> tuple[str | None, bool]:
        return image_file_problem(Path(record.file_path), record.width, record.height, mode)

    if mode == "full":
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            results = list(pool.map(inspect, records))
    else:
        results = [inspect(record) for record in records]
    problems = []
    confirmations = 0
    for record, (problem, tail_suspect) in zip(records, results):
        if problem is None and tail_suspect and confirmations < max_full_decodes:
            confirmations += 1
            problem = _decode_problem(Path(record.file_path))
        if problem is not None:
            problems.append((record, problem))
    return problems


class DetectionDataset(Dataset):
    """Map-style dataset over `ImageRecord`s.

    Indexing: ``dataset[i]`` or ``dataset[(i, *keys)]``. The per-sample random generator is
    seeded from ``(seed, i, *keys)``; with a plain int the keys are ``(epoch,)`` as set by
    `set_epoch`. The samplers of `libra.data.samplers` yield ``(i, epoch, ...)`` tuples so the
    augmentation is right even with persistent DataLoader workers (which never see
    ``set_epoch`` calls made in the main process).
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        class_names: Sequence[str],
        train: bool,
        transform: DetectionTransform | None = None,
        seed: int = 0,
    ) -> None:
        self.records = list(records)
        self.class_names = list(class_names)
        self.train = train
        self.transform = transform if transform is not None else DetectionTransform(train=train)
        self.seed = int(seed)
        self.epoch = 0
        # contiguous label -> category id of ``coco_api``; loaders with their own ids (COCO, LVIS)
        # set it before calling this constructor
        if not hasattr(self, "label_to_cat_id"):
            self.label_to_cat_id = list(range(1, len(self.class_names) + 1))
        self._coco_api = None
        self.proposals = None  # a ProposalSet (libra.data.proposals) for Fast R-CNN, see attach_proposals
        self.with_masks = False  # decode instance masks into target["masks"] (set_with_masks)

    # How the benchmark of this data is scored: 'coco', 'lvis' (federated) or 'voc' (mAP@0.5);
    # ``libra.evaluation.build_evaluator`` reads it together with ``coco_api``.
    evaluation_protocol: str = "coco"

    # ---- metadata used by samplers, the trainer and the evaluators ----------------------
    @property
    def coco_api(self):
        """The evaluation ground truth as a pycocotools ``COCO`` (built from the records once)."""
        if self._coco_api is None:
            self._coco_api = coco_api.load_coco_api(records_to_coco_dict(self.records, self.class_names))
        return self._coco_api

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_ids(self) -> list[int]:
        return [r.image_id for r in self.records]

    @property
    def aspect_ratio_flags(self) -> list[int]:
        """0 for landscape/square images (w >= h), 1 for portrait (w < h): batch grouping key."""
        return [0 if r.width >= r.height else 1 for r in self.records]

    def image_labels(self) -> list[list[int]]:
        """Distinct labels present in each image (positives only), for repeat-factor sampling."""
        return [sorted(set(r.labels.tolist())) for r in self.records]

    def image_counts_per_class(self) -> Tensor:
        """[C] int64: number of images containing each class (f_i of Eq. 20, used by BCR)."""
        counts = torch.zeros(self.num_classes, dtype=torch.int64)
        for labels in self.image_labels():
            if labels:
                counts[torch.as_tensor(labels, dtype=torch.int64)] += 1
        return counts

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def attach_proposals(self, proposals, source: str = "the proposals file", dataset: str = "", split: str = "") -> None:
        """Give every sample the pre-computed proposals of its image (``target["proposals"]``, resized
        and flipped with the image, and ``target["proposal_scores"]``).

        ``proposals`` is a :class:`~libra.data.proposals.ProposalSet`; one of another dataset / split,
        or without some image of this one, is refused with a `DataError` naming ``source``.
        """
        check_coverage(proposals, self.image_ids, source, dataset, split)
        self.proposals = proposals

    def set_with_masks(self, enabled: bool = True) -> None:
        """Decode each sample's instance masks into ``target["masks"]`` (a mask model trains on them).

        Raises `DataError` when the annotations carry no segmentations at all (e.g. VOC, or a
        box-only COCO-format file), so that a mask model is refused before it trains on nothing.
        """
        if enabled:
            if any(r.segmentations is None for r in self.records):
                raise DataError(
                    f"the {type(self).__name__} annotations have no instance masks; a mask model (Mask R-CNN) "
                    "needs COCO / LVIS segmentations: choose a box-only model for this dataset"
                )
            count = sum(len(r.segmentations) for r in self.records)
            if count and not any(s is not None for r in self.records for s in r.segmentations):
                raise DataError(
                    f"none of the {count} annotations has a 'segmentation' ({self.skip_hint(self.records[0])}); a mask "
                    "model (Mask R-CNN) needs polygons or RLE masks: choose a box-only model or an instances file with masks"
                )
            self._drop_invalid_masks()
        self.with_masks = bool(enabled)

    def _drop_invalid_masks(self) -> None:
        """Check every instance's segmentation up front (``libra.masks.check_segmentation``, nothing
        decoded): an instance whose segmentation cannot be decoded is dropped with its box and label
        and a `MaskWarning` naming image and annotation (bad polygon parts of a usable instance are
        dropped the same way), a training image left without instances is dropped, and a split left
        without any instance is refused (`DataError`): a mask model would train on nothing."""
        dropped: list[str] = []
        total = 0
        records = []
        for record in self.records:
            segmentations = list(record.segmentations)
            ann_ids = record.ann_ids if record.ann_ids is not None else [None] * len(segmentations)
            keep = np.ones(len(segmentations), dtype=bool)
            for index, segmentation in enumerate(segmentations):
                total += 1
                try:
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always", MaskWarning)
                        checked = check_segmentation(segmentation, record.height, record.width, record.image_id,
                                                     ann_ids[index], strict=False)
                except InvalidMaskError as error:
                    keep[index] = False
                    dropped.append(str(error))
                    continue
                if caught:  # invalid polygon parts dropped: keep the cleaned polygons (no warning per epoch)
                    segmentations[index] = checked
                    for item in caught:
                        warnings.warn(str(item.message), MaskWarning, stacklevel=3)
            if not keep.all():
                record.boxes, record.labels = record.boxes[keep], record.labels[keep]
                record.difficult = record.difficult[keep] if len(record.difficult) == len(keep) else record.difficult
                segmentations = [s for s, k in zip(segmentations, keep) if k]
                record.ann_ids = [a for a, k in zip(ann_ids, keep) if k] if record.ann_ids is not None else None
            record.segmentations = segmentations
            if self.train and len(record.boxes) == 0:
                continue  # as the loaders drop training images without usable boxes
            records.append(record)
        _warn_dropped_instances(dropped, "training" if self.train else "evaluation")
        if total and len(dropped) == total:
            raise DataError(
                f"no usable instance is left in the {'training' if self.train else 'evaluation'} split: all {total} "
                f"segmentations are invalid (first: {dropped[0]}; {self.skip_hint(self.records[0])}); a mask model "
                "(Mask R-CNN) needs valid polygons or RLE masks: fix them, or choose a box-only model"
            )
        self.records = records

    def clean_mask_ground_truth(self) -> int:
        """The evaluation split of a mask model: drop from the ground truth the evaluator reads
        (``coco_api``) every annotation whose segmentation cannot be evaluated (none, an empty or
        malformed polygon, a polygon outside the image, an RLE of another size or whose run lengths
        do not add up: ``libra.masks.check_segmentation``), each with a `MaskWarning` naming image and
        annotation, as training drops them, before pycocotools sees any (whose C code raises
        TypeErrors on such input, or loops for hours on an RLE claiming billions of pixels); invalid
        parts of a usable polygon are dropped the same way. The annotation is removed for box AP too
        (the mask model's boxes and masks are scored on the same instances). Returns how many were
        dropped; raises `DataError` when no annotation has a segmentation or none is usable."""
        coco = self.coco_api
        annotations = coco.dataset.get("annotations", [])
        where = getattr(self, "ann_file", None) or "the annotations"
        if annotations and not any(a.get("segmentation") for a in annotations):
            first = annotations[0]
            raise DataError(
                f"the evaluation split ({where}): mask AP needs a 'segmentation' (polygons or RLE) on the ground-truth "
                f"annotations; none has one (e.g. annotation {first.get('id')} of image {first.get('image_id')}); a "
                "mask model (Mask R-CNN) needs instance masks, or choose a box-only model"
            )
        kept, dropped = [], []
        for ann in annotations:
            info = coco.imgs.get(ann.get("image_id"))
            if info is None:  # not an image of the split: COCOeval never reads it
                kept.append(ann)
                continue
            try:
                checked = check_segmentation(ann.get("segmentation"), info.get("height", 0), info.get("width", 0),
                                             ann.get("image_id"), ann.get("id"), strict=False)
            except InvalidMaskError as error:
                dropped.append(str(error))
                continue
            if isinstance(ann["segmentation"], list) and len(checked) != len(ann["segmentation"]):
                ann["segmentation"] = checked  # the valid parts only (a MaskWarning named the others)
            kept.append(ann)
        if not dropped:
            return 0
        _warn_dropped_instances(dropped, "evaluation", "from the ground truth")
        if not kept:
            raise DataError(
                f"no usable instance is left in the evaluation split ({where}): all {len(dropped)} segmentations are "
                f"invalid (first: {dropped[0]}); mask AP needs valid polygons or RLE masks: fix them, or choose a "
                "box-only model"
            )
        coco.dataset["annotations"] = kept
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco.createIndex()
        return len(dropped)

    def skip_hint(self, record: ImageRecord) -> str:
        """Where ``record``'s image is listed (said in errors about its file: remove it there to skip it)."""
        return f"the annotations (image id {record.image_id})"

    # ---- samples ------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    def _split_key(self, key) -> tuple[int, tuple[int, ...]]:
        if isinstance(key, (tuple, list)):
            if len(key) == 0:
                raise ValueError("dataset key tuple must start with the sample index")
            return int(key[0]), tuple(int(k) for k in key[1:])
        return int(key), (self.epoch,)

    def __getitem__(self, key) -> tuple[Tensor, dict]:
        index, keys = self._split_key(key)
        if not -len(self.records) <= index < len(self.records):
            raise IndexError(f"index {index} out of range for a dataset of {len(self.records)} images")
        record = self.records[index]
        image = load_rgb_image(record.file_path, self.skip_hint(record))
        h0, w0 = int(image.shape[-2]), int(image.shape[-1])
        if (h0, w0) != (record.height, record.width):
            raise DataError(
                f"image {record.image_id} ({record.file_path}): decoded size (h, w) = ({h0}, {w0}) differs from "
                f"the annotated size ({record.height}, {record.width}); the annotation file does not match the image"
            )
        boxes = torch.from_numpy(record.boxes.astype(np.float32).reshape(-1, 4))
        labels = torch.from_numpy(record.labels.astype(np.int64).reshape(-1))
        difficult = torch.from_numpy(record.difficult.astype(bool).reshape(-1))
        ignore = torch.from_numpy(record.ignore_boxes.astype(np.float32).reshape(-1, 4))
        masks = None
        if self.with_masks:
            masks, keep = self._decode_masks(record, h0, w0)
            if not keep.all():  # instances with a bad segmentation are dropped with their boxes
                keep_t = torch.from_numpy(keep)
                boxes, labels, difficult = boxes[keep_t], labels[keep_t], difficult[keep_t]
        if self.train:
            # Difficult objects are neither positives nor negatives in training (they act like crowd).
            ignore = torch.cat([ignore, boxes[difficult]], dim=0)
            boxes, labels = boxes[~difficult], labels[~difficult]
            if masks is not None:
                masks = masks[~difficult]
            difficult = difficult[~difficult]

        generator = sample_generator(self.seed, index, *keys) if self.train else None
        boxes_by_key = {"boxes": boxes, "ignore_boxes": ignore}
        if self.proposals is not None:
            proposal_boxes, proposal_scores = self.proposals.get(record.image_id)
            boxes_by_key["proposals"] = proposal_boxes
        image, out_boxes, meta = self.transform(image, boxes_by_key, generator)
        target = {
            "boxes": out_boxes["boxes"],
            "labels": labels,
            "ignore_boxes": out_boxes["ignore_boxes"],
            "image_id": record.image_id,
            **meta,
        }
        if self.proposals is not None:
            target["proposals"] = out_boxes["proposals"]
            target["proposal_scores"] = proposal_scores.clone()
        if masks is not None:
            target["masks"] = self.transform.transform_masks(masks, meta)
        if not self.train:
            target["difficult"] = difficult
        return image, target

    def _decode_masks(self, record: ImageRecord, height: int, width: int) -> tuple[Tensor, np.ndarray]:
        """``([G', h0, w0] uint8, keep [G] bool)``: the record's instance masks, bad ones dropped with a warning."""
        segmentations = record.segmentations if record.segmentations is not None else [None] * len(record.boxes)
        if len(segmentations) != len(record.boxes):
            raise DataError(
                f"image {record.image_id}: {len(segmentations)} segmentations for {len(record.boxes)} boxes; "
                "the loader must keep one segmentation per box"
            )
        return decode_masks(segmentations, height, width, image_id=record.image_id, ann_ids=record.ann_ids, on_invalid="warn")


_MAX_INSTANCE_WARNINGS = 10  # one MaskWarning per dropped instance up to this many, then one summary


def _warn_dropped_instances(messages: list[str], split: str, where: str = "") -> None:
    for message in messages[:_MAX_INSTANCE_WARNINGS]:
        warnings.warn(f"{message}; the instance is dropped {where}".rstrip() + f" ({split} split)", MaskWarning, stacklevel=3)
    if len(messages) > _MAX_INSTANCE_WARNINGS:
        warnings.warn(f"{len(messages) - _MAX_INSTANCE_WARNINGS} more instances with invalid segmentations are dropped "
                      f"{where} ({split} split)".replace("  ", " "), MaskWarning, stacklevel=3)


def no_usable_images_reason(counts: dict | None, source: str) -> str:
    """Why a training split has no image with a usable object box, in words, with what to do
    (``counts``: what a loader read, e.g. ``parse_coco_annotations(counts=...)``); "" when unknown."""
    if not counts:
        return ""
    images, annotations = counts.get("images", 0), counts.get("annotations", 0)
    if images == 0:
        return f"{source} lists no images"
    if annotations == 0:
        return f"none of its {images} images has an annotation ({source}): training needs annotated object boxes"
    crowd, difficult = counts.get("crowd", 0), counts.get("difficult", 0)
    if crowd and crowd == annotations:
        return (f"all {annotations} annotations of its {images} images are crowd regions (iscrowd=1), which training "
                "uses only as ignore regions, never as objects: at least one annotation with iscrowd=0 is needed "
                f"(fix 'iscrowd' in {source}, or train on another split)")
    if difficult and difficult == annotations:
        return (f"all {annotations} objects of its {images} images are marked difficult, which training uses only as "
                f"ignore regions: at least one object with <difficult>0</difficult> is needed ({source})")
    parts = [f"{counts[key]} {text}" for key, text in (
        ("crowd", "are crowd regions (iscrowd=1: ignore regions only)"),
        ("difficult", "are difficult (ignore regions only)"),
        ("degenerate", "have area <= 0 or are narrower or lower than 1 px"),
        ("outside", "lie outside their image"),
    ) if counts.get(key)]
    detail = "; ".join(parts) if parts else "none is a usable object box"
    return f"of its {annotations} annotations {detail}, so no image keeps an object box ({source})"


def records_to_coco_dict(records: Sequence[ImageRecord], class_names: Sequence[str]) -> dict:
    """Ground truth of ``records`` as a COCO instances dict (category id = label + 1).

    Difficult objects and ignore regions become ``iscrowd=1`` (ignored by COCOeval). Used to
    run the COCO-style evaluators (e.g. proposal recall) on VOC.
    """
    images, annotations = [], []
    ann_id = 1
    for r in records:
        images.append({"id": int(r.image_id), "width": int(r.width), "height": int(r.height), "file_name": str(r.file_path.name)})
        crowd_flags = list(r.difficult.astype(bool).tolist()) + [True] * len(r.ignore_boxes)
        labels = list(r.labels.tolist()) + [0] * len(r.ignore_boxes)
        for box, label, crowd in zip(np.concatenate([r.boxes, r.ignore_boxes]).reshape(-1, 4).tolist(), labels, crowd_flags):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append({
                "id": ann_id, "image_id": int(r.image_id), "category_id": int(label) + 1,
                "bbox": [box[0], box[1], w, h], "area": float(w * h), "iscrowd": int(crowd),
            })
            ann_id += 1
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(class_names)]
    return {"images": images, "annotations": annotations, "categories": categories}


# Coordinates further than this many image sizes outside the image are rejected as absurd (an
# annotation bug: a box of 1e9 px would make a training step allocate gigabytes), the rest is clipped.
ABSURD_BOX_FACTOR = 10.0


def check_image_size(width, height, what: str) -> tuple[int, int]:
    """The annotated (width, height) of an image as positive ints, or ValueError naming ``what``."""
    out = []
    for name, value in (("width", width), ("height", height)):
        try:
            number = float(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else math.nan
        except ValueError:
            number = math.nan
        if not math.isfinite(number) or number < 1:
            raise ValueError(f"{what}: {name} must be a positive number, got {value!r}")
        out.append(int(number))
    return out[0], out[1]


def check_box_extent(box: Sequence[float], width: int, height: int, what: str, shown=None) -> None:
    """ValueError naming ``what`` and the annotated value ``shown`` (default ``box``) when a
    coordinate of ``box`` [x1, y1, x2, y2] is not finite or lies more than ``ABSURD_BOX_FACTOR``
    image sizes outside the ``width`` x ``height`` image."""
    x1, y1, x2, y2 = (float(v) for v in box)
    lim_x, lim_y = ABSURD_BOX_FACTOR * width, ABSURD_BOX_FACTOR * height
    inside = all(math.isfinite(v) for v in (x1, y1, x2, y2)) and (
        -lim_x <= min(x1, x2) and max(x1, x2) <= width + lim_x and -lim_y <= min(y1, y2) and max(y1, y2) <= height + lim_y
    )
    if not inside:
        raise ValueError(
            f"{what}: bbox {list(box) if shown is None else shown} lies far outside the {width} x {height} image "
            f"(more than {ABSURD_BOX_FACTOR:g}x its size); fix or remove this annotation"
        )


def clip_box_to_image(box: Sequence[float], width: int, height: int) -> list[float] | None:
    """``box`` [x1, y1, x2, y2] (original image coordinates) clipped to [0, width] x [0, height];
    None when the clipped box is narrower or lower than 1 px (COCO's w < 1 / h < 1 rule, applied
    after clipping: a box outside the image, or a sliver of it inside, is dropped)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    x1, x2 = min(max(x1, 0.0), float(width)), min(max(x2, 0.0), float(width))
    y1, y2 = min(max(y1, 0.0), float(height)), min(max(y2, 0.0), float(height))
    if x2 - x1 < 1 or y2 - y1 < 1:
        return None
    return [x1, y1, x2, y2]


def check_finite_box(values, what: str) -> list[float]:
    """Validate a 4-number box from an annotation file, raising ValueError naming ``what``."""
    if not isinstance(values, (list, tuple)) or len(values) != 4:
        raise ValueError(f"{what}: bbox must be 4 numbers, got {values!r}")
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"{what}: bbox must be 4 numbers, got {values!r}") from None
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{what}: bbox has NaN or inf values: {values!r}")
    return out
