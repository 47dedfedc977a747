"""Running a detector on one's own images: finding them, predicting, drawing and writing results.

Used by ``predict.py`` and by :meth:`libra.engine.loading.LoadedDetector.predict`. An input is an
image file, a folder (searched recursively for :data:`IMAGE_EXTENSIONS`), a glob pattern, or a
video file (read with PyAV when it is installed). Images are read as the datasets read them
(:func:`libra.data.base.load_rgb_image`: RGB, no EXIF rotation, like COCO's annotations), resized
with the test transform of the model's recipe and batched; the detections come back in the
original image's pixels.

Results file: the COCO results format (one entry per detection: ``image_id``, ``category_id``,
``bbox`` [x, y, w, h], ``score``, and for a mask model an RLE ``segmentation``), each entry with
the ``file_name`` it belongs to and its ``category_name``; ``image_id`` is the input's position
in the sorted input list.
"""
from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import Tensor

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")


class InputError(ValueError):
    """An input that cannot be predicted on (one line: which and why); the others go on."""


@dataclass
class Inputs:
    """What :func:`find_inputs` found: image files, video files, and one line per input it skipped."""

    images: list[Path] = field(default_factory=list)
    videos: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def find_inputs(items: Sequence[str | Path]) -> Inputs:
    """Expand files, folders (recursive) and glob patterns into sorted, de-duplicated image and video
    paths; a missing path, an empty folder or a pattern matching nothing is a skipped line."""
    found = Inputs()
    seen: set[Path] = set()

    def add(path: Path) -> None:
        suffix = path.suffix.lower()
        if path in seen:
            return
        seen.add(path)
        if suffix in VIDEO_EXTENSIONS:
            found.videos.append(path)
        else:
            found.images.append(path)  # any other file is tried as an image (and skipped if it is none)

    for item in items:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)
            if not files:
                found.skipped.append(f"{path}: no image or video files in this folder (looked for {', '.join(IMAGE_EXTENSIONS)})")
            for file in files:
                add(file)
        elif path.is_file():
            add(path)
        elif any(ch in str(item) for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(str(item), recursive=True) if Path(m).is_file())
            if not matches:
                found.skipped.append(f"{item}: the pattern matches no file")
            for match in matches:
                add(match)
        else:
            found.skipped.append(f"{item}: no such file or folder")
    found.images.sort()
    found.videos.sort()
    return found


def read_image(path: Path) -> Tensor:
    """``[3, h, w]`` float RGB 0..255 of an image file; :class:`InputError` (one line) otherwise."""
    from libra.data.base import load_rgb_image

    try:
        return load_rgb_image(path)
    except (OSError, ValueError) as error:
        text = " ".join(str(error).split())
        text = text.split("; ")[0]  # the dataset's remedy (skip it in the annotations) does not apply here
        raise InputError(text if str(path) in text else f"{path}: {text}") from None


def video_frames(path: Path, every: int = 1) -> Iterator[tuple[int, Tensor]]:
    """``(frame index, [3, h, w] float RGB)`` of every ``every``-th frame of a video file (PyAV)."""
    try:
        import av
    except ImportError:
        raise InputError(f"{path}: reading video needs PyAV, which is not installed: pip install av") from None
    try:
        with av.open(str(path)) as container:
            for index, frame in enumerate(container.decode(video=0)):
                if index % every == 0:
                    yield index, torch.from_numpy(frame.to_ndarray(format="rgb24").copy()).permute(2, 0, 1).float()
    except InputError:
        raise
    except Exception as error:  # av.AVError and friends: the file is not a readable video
        raise InputError(f"{path}: cannot read the video ({' '.join(str(error).split())})") from None


@torch.no_grad()
def predict_images(
    model: torch.nn.Module,
    images: Sequence[Tensor],
    min_size: int,
    max_size: int,
    batch_size: int = 1,
    device: torch.device | str = "cpu",
) -> list[dict[str, Tensor]]:
    """Detections of ``images`` (``[3, h, w]`` RGB 0..255, any sizes) in their original pixels,
    ``batch_size`` images per forward pass (on the CPU, as float32 results)."""
    from libra.data.transforms import preprocess_images
    from libra.structures import Batch

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    outputs: list[dict[str, Tensor]] = []
    for start in range(0, len(images), batch_size):
        tensors, sizes, originals = preprocess_images(list(images[start : start + batch_size]), min_size, max_size)
        batch = Batch(tensors, sizes, originals).to(device)
        for output in model.predict(batch):
            outputs.append({k: (v.float() if v.is_floating_point() else v).cpu() for k, v in output.items()})
    return outputs


def results_entries(
    image_id: int, file_name: str, output: dict[str, Tensor], label_to_cat_id: Sequence[int], class_names: Sequence[str]
) -> list[dict]:
    """COCO results entries of one image's detections, each with ``file_name`` and ``category_name``
    (and an RLE ``segmentation`` when the output has masks)."""
    from libra.evaluation.coco_evaluator import detections_to_coco_results
    from libra.masks import encode_rle

    entries = detections_to_coco_results(image_id, output, label_to_cat_id)
    masks = output.get("masks")
    rles = encode_rle(masks) if masks is not None and len(entries) else [None] * len(entries)
    labels = output["labels"].tolist()
    for entry, label, rle in zip(entries, labels, rles):
        entry["file_name"] = file_name
        entry["category_name"] = class_names[label] if label < len(class_names) else str(label)
        if rle is not None:
            entry["segmentation"] = rle
    return entries


def keep_above(output: dict[str, Tensor], score_thr: float) -> dict[str, Tensor]:
    """The detections of ``output`` scoring at least ``score_thr`` (every per-detection tensor)."""
    keep = output["scores"] >= score_thr
    count = int(output["scores"].shape[0])
    return {k: (v[keep] if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == count else v) for k, v in output.items()}
