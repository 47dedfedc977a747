"""Pre-computed proposal files: what ``eval.py --save-proposals`` writes and Fast R-CNN reads.

The paper runs its ablations (Sec. 4.1.4, Tables 3-7) as Fast R-CNN on "the same pre-computed
proposals": an R50-FPN RPN's top 1000 proposals per image, saved once for the training and the
evaluation split (MMDetection's ``proposal_file`` of ``fast-rcnn_r50_fpn_1x_coco``).

File format (version 1): one file written by ``torch.save``, readable with
``torch.load(path, weights_only=True)`` (plain tensors, strings and numbers only)::

    {
        "format": "libra-proposals", "version": 1,
        "image_ids": int64 [N],          # one entry per image, in the order they were written
        "counts":    int64 [N],          # proposals of each image (<= max_per_image, may be 0)
        "boxes":     float32 [M, 4],     # M = counts.sum(); image i's rows follow image i-1's
        "scores":    float32 [M],        # objectness, each image's rows by decreasing score
        "meta": {"dataset": str, "split": str, "model": str, "checkpoint": str,
                 "max_per_image": int, "num_images": int},
    }

Boxes are ``(x1, y1, x2, y2)`` in ORIGINAL image pixels (the annotation file's coordinates), so a
file serves any resize, flip or batch size. The data pipeline resizes and flips them with the image
(:class:`~libra.data.base.DetectionDataset`). The file is written atomically (a temporary file
renamed into place): an interrupted run leaves the previous file or none, never a partial one, and
re-running the same command gives the same file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from .errors import DataError

PROPOSALS_FORMAT = "libra-proposals"
PROPOSALS_VERSION = 1


@dataclass
class ProposalSet:
    """The proposals of a dataset split, flat (the file's layout) with a per-image index.

    Attributes:
        image_ids: ``[N]`` int64.
        counts: ``[N]`` int64, proposals per image.
        boxes: ``[M, 4]`` float32, original image coordinates.
        scores: ``[M]`` float32.
        meta: where the proposals come from (module docstring).
    """

    image_ids: Tensor
    counts: Tensor
    boxes: Tensor
    scores: Tensor
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        offsets = torch.cumsum(self.counts, 0) - self.counts
        self._rows = {int(i): (int(o), int(c)) for i, o, c in zip(self.image_ids.tolist(), offsets.tolist(), self.counts.tolist())}

    def __len__(self) -> int:
        return int(self.image_ids.numel())

    def __contains__(self, image_id: int) -> bool:
        return int(image_id) in self._rows

    def get(self, image_id: int) -> tuple[Tensor, Tensor]:
        """``([P, 4] boxes, [P] scores)`` of one image (views into the flat tensors)."""
        offset, count = self._rows[int(image_id)]
        return self.boxes[offset : offset + count], self.scores[offset : offset + count]

    @classmethod
    def from_images(
        cls, per_image: Mapping[int, tuple[Tensor, Tensor]], max_per_image: int | None = None, meta: dict | None = None
    ) -> "ProposalSet":
        """From ``{image_id: ([P, 4] boxes, [P] scores)}``: each image sorted by decreasing score and
        cut to ``max_per_image``; images in increasing id order."""
        ids, counts, boxes, scores = [], [], [], []
        for image_id in sorted(per_image):
            image_boxes, image_scores = per_image[image_id]
            image_boxes = torch.as_tensor(image_boxes, dtype=torch.float32).reshape(-1, 4).cpu()
            image_scores = torch.as_tensor(image_scores, dtype=torch.float32).reshape(-1).cpu()
            if image_boxes.shape[0] != image_scores.shape[0]:
                raise ValueError(f"image {image_id}: {image_boxes.shape[0]} proposal boxes but {image_scores.shape[0]} scores")
            order = torch.argsort(image_scores, descending=True, stable=True)
            if max_per_image is not None:
                order = order[:max_per_image]
            ids.append(int(image_id))
            counts.append(int(order.numel()))
            boxes.append(image_boxes[order])
            scores.append(image_scores[order])
        meta = dict(meta or {})
        meta.setdefault("num_images", len(ids))
        if max_per_image is not None:
            meta.setdefault("max_per_image", int(max_per_image))
        return cls(
            torch.tensor(ids, dtype=torch.int64),
            torch.tensor(counts, dtype=torch.int64),
            torch.cat(boxes) if boxes else torch.zeros((0, 4)),
            torch.cat(scores) if scores else torch.zeros((0,)),
            meta,
        )

    def to_dict(self) -> dict:
        return {
            "format": PROPOSALS_FORMAT,
            "version": PROPOSALS_VERSION,
            "image_ids": self.image_ids,
            "counts": self.counts,
            "boxes": self.boxes,
            "scores": self.scores,
            "meta": dict(self.meta),
        }


def save_proposals(proposals: ProposalSet, path: str | os.PathLike) -> Path:
    """Write ``proposals`` to ``path`` atomically (module docstring); returns the path."""
    from libra.atomic_io import atomic_save

    path = Path(path)
    atomic_save(proposals.to_dict(), path)
    return path


def load_proposals(path: str | os.PathLike) -> ProposalSet:
    """Read and check a proposals file; any problem is a one-line `DataError` saying what to do."""
    path = Path(path)
    remedy = "write it with: python eval.py --checkpoint <RPN or Faster R-CNN checkpoint> --save-proposals FILE"
    if not path.is_file():
        raise DataError(f"proposals file not found: {path}; {remedy}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - unreadable, truncated, a pickle with code, ...
        text = " ".join(str(error).split())[:200]
        raise DataError(f"cannot read proposals file {path} ({type(error).__name__}: {text}); {remedy}") from None
    if not isinstance(obj, dict) or obj.get("format") != PROPOSALS_FORMAT:
        raise DataError(f"{path} is not a libra proposals file (no format={PROPOSALS_FORMAT!r} entry); {remedy}")
    if obj.get("version") != PROPOSALS_VERSION:
        raise DataError(f"{path} has proposals format version {obj.get('version')!r}; this libra reads version {PROPOSALS_VERSION}")
    image_ids, counts, boxes, scores = (obj.get(k) for k in ("image_ids", "counts", "boxes", "scores"))
    shapes_ok = (
        all(isinstance(t, Tensor) for t in (image_ids, counts, boxes, scores))
        and image_ids.dim() == 1
        and counts.shape == image_ids.shape
        and boxes.dim() == 2
        and boxes.shape[1] == 4
        and scores.shape == boxes.shape[:1]
    )
    if not shapes_ok or int(counts.sum()) != boxes.shape[0] or bool((counts < 0).any()):
        raise DataError(f"{path} is damaged: image_ids / counts / boxes / scores do not fit together; {remedy}")
    if not bool(torch.isfinite(boxes).all()) or not bool(torch.isfinite(scores).all()):
        raise DataError(f"{path} holds non-finite proposal boxes or scores; regenerate it ({remedy})")
    if image_ids.unique().numel() != image_ids.numel():
        raise DataError(f"{path} lists some image ids more than once; regenerate it ({remedy})")
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    return ProposalSet(image_ids.long(), counts.long(), boxes.float(), scores.float(), dict(meta))


def check_coverage(
    proposals: ProposalSet, image_ids: Iterable[int], source: str | os.PathLike, dataset: str, split: str
) -> None:
    """Refuse (one-line `DataError`) a file of another dataset / split, or one that lacks images of this split."""
    made_for = (proposals.meta.get("dataset"), proposals.meta.get("split"))
    if all(made_for) and made_for != (dataset, split):
        raise DataError(
            f"proposals file {source} was written for the {made_for[1]} split of {made_for[0]}, not the {split} split "
            f"of {dataset}; write one with: python eval.py --checkpoint <RPN checkpoint> --dataset {dataset} "
            f"--split {split} --save-proposals FILE"
        )
    missing = [i for i in image_ids if i not in proposals]
    if missing:
        raise DataError(
            f"proposals file {source} has no proposals for {len(missing)} image(s) of the {split} split of {dataset} "
            f"(e.g. image id {missing[0]}); write it for this split with: python eval.py --checkpoint <RPN checkpoint> "
            f"--dataset {dataset} --split {split} --save-proposals FILE"
        )


def top_proposals(outputs: Sequence[dict], max_per_image: int) -> list[tuple[Tensor, Tensor]]:
    """``(boxes [P, 4], scores [P])`` of each output dict (``proposals``/``boxes`` and
    ``proposal_scores``/``scores``), the best ``max_per_image`` by score, as float32 on the CPU."""
    selected = []
    for output in outputs:
        boxes = output["proposals"] if "proposals" in output else output["boxes"]
        scores = output["proposal_scores"] if "proposal_scores" in output else output["scores"]
        order = torch.argsort(scores, descending=True, stable=True)[:max_per_image]
        selected.append((boxes[order].float().cpu(), scores[order].float().cpu()))
    return selected
