"""A quiet pycocotools ``COCO`` index from a path, a dict or an existing index.

The one place where libra turns COCO-format ground truth (COCO, LVIS, or VOC converted to it)
into the ``COCO`` object that both the datasets (``libra.data``) and the evaluators
(``libra.evaluation``) use, so neither package imports the other.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

from pycocotools.coco import COCO


def load_coco_api(source: COCO | str | Path | dict, missing_hint: str = "") -> COCO:
    """``source`` as an indexed ``COCO`` (an existing index is returned as is).

    Annotations without ``iscrowd`` (LVIS files) get ``iscrowd = 0``, which COCOeval needs.

    Args:
        source: a ``COCO``, a path to a COCO-format JSON, or the parsed dict (used, not copied).
        missing_hint: added to the error when the file does not exist (e.g. the expected layout).

    Raises:
        FileNotFoundError: the file does not exist. ValueError: not a COCO-format dict.
    """
    if isinstance(source, COCO):
        coco = source
    else:
        coco = COCO()
        if isinstance(source, dict):
            coco.dataset = source
        else:
            path = Path(source)
            if not path.is_file():
                raise FileNotFoundError(f"annotation file not found: {path}" + (f" ({missing_hint})" if missing_hint else ""))
            with open(path) as f:
                coco.dataset = json.load(f)
        if not isinstance(coco.dataset, dict) or "images" not in coco.dataset or "categories" not in coco.dataset:
            where = "the ground-truth dict" if isinstance(source, dict) else str(source)
            raise ValueError(f"{where}: not a COCO instances file (needs 'images', 'annotations', 'categories')")
        coco.dataset.setdefault("annotations", [])
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco.createIndex()
    for ann in coco.dataset.get("annotations", []):
        ann.setdefault("iscrowd", 0)
    return coco


# ---------------------------------------------------------------------------------------------
# LVIS frequency groups: one rule for the dataset and the evaluator
# ---------------------------------------------------------------------------------------------
# LVIS (Gupta et al., CVPR 2019, Sec. 4.4 / LVIS v1 categories): a category is rare when it occurs in
# 1-10 training images, common in 11-100, frequent in more than 100; each category of the LVIS files
# carries its group as 'frequency' and its training image count as 'image_count'.
FREQUENCY_GROUPS = ("r", "c", "f")


def frequency_from_image_count(image_count: int) -> str:
    """The LVIS group of a category seen in ``image_count`` training images: r (<= 10), c (<= 100), f."""
    return "r" if image_count <= 10 else ("c" if image_count <= 100 else "f")


def category_frequency(category: dict) -> str | None:
    """A category's frequency group: its ``frequency`` ('r' / 'c' / 'f'); without one (or with another
    value), the group its ``image_count`` gives (:func:`frequency_from_image_count`); else None (in no
    group: counted in AP, not in APr / APc / APf)."""
    frequency = category.get("frequency")
    if frequency in FREQUENCY_GROUPS:
        return frequency
    count = category.get("image_count")
    if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
        return frequency_from_image_count(count)
    return None


def frequency_groups(coco: COCO, source: str = "the LVIS annotations") -> dict[int, str | None]:
    """``{category id: 'r' | 'c' | 'f' | None}`` by :func:`category_frequency`, computed once per ``COCO``
    index; categories without a valid ``frequency`` are named in one warning (with what was done)."""
    cached = getattr(coco, "_libra_frequency_groups", None)
    if cached is not None:
        return cached
    groups = {int(cat_id): category_frequency(cat) for cat_id, cat in coco.cats.items()}
    missing = [cat for cat in coco.cats.values() if cat.get("frequency") not in FREQUENCY_GROUPS]
    if missing:
        import warnings

        def name(cat: dict) -> str:
            return f"{cat.get('id')} {cat.get('name', '')!r}".rstrip()

        derived = [c for c in missing if groups[int(c["id"])] is not None]
        ungrouped = [c for c in missing if groups[int(c["id"])] is None]
        parts = []
        if derived:
            parts.append("grouped by their 'image_count' (r <= 10, c <= 100, f > 100 images): "
                         + ", ".join(f"{name(c)} -> {groups[int(c['id'])]}" for c in derived[:8])
                         + (f", ... ({len(derived)} in all)" if len(derived) > 8 else ""))
        if ungrouped:
            parts.append("in no group (no 'image_count' either; counted in AP, not in APr / APc / APf): "
                         + ", ".join(name(c) for c in ungrouped[:8])
                         + (f", ... ({len(ungrouped)} in all)" if len(ungrouped) > 8 else ""))
        warnings.warn(f"{len(missing)} of the {len(coco.cats)} categories of {source} have no valid 'frequency' "
                      f"('r', 'c' or 'f'): " + "; ".join(parts), UserWarning, stacklevel=2)
    coco._libra_frequency_groups = groups
    return groups
