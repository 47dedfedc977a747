"""Per-class training-image counts (f_i of the paper's Eq. 21) with a cache keyed by the annotation file.

Bucketed class re-weighting (paper Sec. 3.3.3) weighs each class by the number of training images
that contain it. The counts come from the training annotations (``DetectionDataset.
image_counts_per_class()``: the images a training run actually uses) and are written to a small
JSON file together with the identity of the annotation file they were counted from (resolved path,
size in bytes, modification time in ns) and the number of classes and images. A later run with the
same file reads them back; when the annotation file changes (another size or mtime), they are
counted again and the cache is rewritten. The file also records what the class weights of a
run were built from.

Format::

    {"version": 1, "annotation_file": {"path": ..., "size": ..., "mtime_ns": ...},
     "num_classes": C, "num_images": N, "counts": [f_0, ..., f_{C-1}]}
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

_CACHE_VERSION = 1


def annotation_file_key(path: str | os.PathLike) -> dict[str, Any]:
    """``{"path", "size", "mtime_ns"}`` of an annotation file: what the cache is keyed by."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return {"path": str(resolved), "size": int(stat.st_size), "mtime_ns": int(stat.st_mtime_ns)}


def _source_key(dataset) -> dict[str, Any] | None:
    files = getattr(dataset, "ann_file", None)
    if files is None:
        return None
    try:
        return annotation_file_key(files)
    except OSError:
        return None


def _read_cache(cache_path: Path) -> dict | None:
    try:
        cached = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        return None
    return cached if isinstance(cached, dict) else None


def cached_class_image_counts(dataset, cache_path: str | os.PathLike) -> Tensor:
    """``[C]`` int64 training images per class of ``dataset``, read from ``cache_path`` when it was
    counted from the same annotation file (same path, size and mtime) and class / image numbers,
    counted again (and the cache rewritten, atomically) otherwise.

    A dataset without an annotation file (VOC's XML folders) is counted every time (the result is
    still written, without a key, for the record). A cache that cannot be written is not an error.
    """
    cache_path = Path(cache_path)
    key = _source_key(dataset)
    expected = {"num_classes": int(dataset.num_classes), "num_images": len(dataset)}
    cached = _read_cache(cache_path)
    if (
        key is not None
        and cached is not None
        and cached.get("version") == _CACHE_VERSION
        and cached.get("annotation_file") == key
        and all(cached.get(name) == value for name, value in expected.items())
        and isinstance(cached.get("counts"), list)
        and len(cached["counts"]) == expected["num_classes"]
    ):
        return torch.tensor(cached["counts"], dtype=torch.int64)
    counts = dataset.image_counts_per_class().to(torch.int64)
    content = {"version": _CACHE_VERSION, "annotation_file": key, **expected, "counts": counts.tolist()}
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        part = cache_path.with_name(f"{cache_path.name}.part-{os.getpid()}-{uuid.uuid4().hex[:6]}")
        part.write_text(json.dumps(content) + "\n")
        os.replace(part, cache_path)
    except OSError:
        pass
    return counts
