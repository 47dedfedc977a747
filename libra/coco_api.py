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
