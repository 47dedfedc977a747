"""Fig. 8 of the paper: COCO-style error analysis of detections (paper Sec. 4.1.5, after Hoiem et al.).

Seven precision-recall curves per category (COCO's ``analyze``), each removing one more kind of
error, at up to 100 detections per image over all object sizes:

- ``C75``: PR at IoU 0.75 (area under it: AP75);
- ``C50``: PR at IoU 0.50 (AP50);
- ``Loc``: PR at IoU 0.10: localisation errors are ignored; duplicate detections still count as
  false positives (COCO's definition; ``duplicates="loc"`` ignores them here as well, Hoiem et al.'s
  "localization error: poor localization or a duplicate");
- ``Sim``: as Loc, and a detection on an object of another category of the *same super-category*
  is neither a true nor a false positive (those objects are relabelled to the category in question
  and ignored);
- ``Oth``: as Sim for objects of *every* other category (all class confusions removed);
- ``BG``: all remaining false positives removed: precision 1 up to the recall Oth reaches;
- ``FN``: every error removed: precision 1 at all recalls (AP 1).

All remaining settings use IoU 0.1. Curves are averaged over the categories that have ground
truth (COCO's tool counts categories without gt as precision 0 instead), overall and per group
of categories. Groups are the ``supercategory`` field of the COCO categories by default;
categories without one form a single group ``"all"``. With a single group (the synthetic shapes
all have super-category ``"shape"``) Sim equals Oth; with one category per group it equals Loc.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ._io import AnalysisError, new_figure, save_json, save_figure

ERROR_TYPES = ("C75", "C50", "Loc", "Sim", "Oth", "BG", "FN")
LOC_IOU = 0.1
DUPLICATES = ("fp", "loc")
GROUPINGS = ("supercategory", "one", "class")
# The colours of the COCO analysis plots (Fig. 8 uses them): C75 / C50 light grey (white there), then Loc blue,
# Sim red, Oth green, BG purple, FN orange.
COLOURS = {
    "C75": (0.94, 0.94, 0.94), "C50": (0.78, 0.78, 0.78), "Loc": (0.31, 0.51, 0.74), "Sim": (0.75, 0.31, 0.30),
    "Oth": (0.36, 0.90, 0.38), "BG": (0.50, 0.39, 0.64), "FN": (1.0, 0.6, 0.0),
}


class _IgnoringCOCOeval(COCOeval):
    """COCOeval that also ignores gts flagged ``analysis_ignore`` (COCOeval's own ``ignore`` field is
    overwritten from ``iscrowd`` in ``_prepare``; crowd semantics would change the IoU)."""

    def _prepare(self) -> None:
        super()._prepare()
        for gts in self._gts.values():
            for gt in gts:
                if gt.get("analysis_ignore"):
                    gt["ignore"] = 1


# ------------------------------------------------------------------------------ inputs
def load_results(coco_gt: COCO, source: str | Path | list) -> COCO:
    """A COCO-format bbox results file (``eval.py``'s ``detections.json``) indexed against ``coco_gt``.

    Raises:
        AnalysisError: unreadable file, not a results list, entries without bbox / score, or image /
            category ids that are not in the ground truth.
    """
    name = str(source) if not isinstance(source, list) else "the results"
    if isinstance(source, list):
        results = source
    else:
        path = Path(source)
        if not path.is_file():
            raise AnalysisError(f"results file not found: {path} (eval.py writes detections.json in its work dir)")
        try:
            results = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise AnalysisError(f"cannot read {path} as JSON: {error}") from None
    if not isinstance(results, list):
        raise AnalysisError(f"{name}: expected a COCO results list [{{image_id, category_id, bbox, score}}, ...], "
                            f"got a {type(results).__name__}")
    for index, entry in enumerate(results):
        if not isinstance(entry, dict) or not {"image_id", "category_id", "bbox", "score"} <= set(entry):
            raise AnalysisError(f"{name}: entry {index} is not a bbox result with image_id, category_id, bbox, score")
    image_ids = set(coco_gt.getImgIds())
    cat_ids = set(coco_gt.getCatIds())
    unknown_images = sorted({r["image_id"] for r in results} - image_ids)
    unknown_cats = sorted({r["category_id"] for r in results} - cat_ids)
    if unknown_images or unknown_cats:
        what = (f"image ids {unknown_images[:5]}" if unknown_images else f"category ids {unknown_cats[:5]}")
        raise AnalysisError(f"{name} has {what} that the ground truth does not have: pass the ground truth the "
                            "detections were made on (--gt, or --dataset / --data-root)")
    if not results:  # loadRes cannot index an empty list
        empty = COCO()
        empty.dataset = {"images": copy.deepcopy(coco_gt.dataset["images"]), "categories": copy.deepcopy(
            coco_gt.dataset["categories"]), "annotations": []}
        with contextlib.redirect_stdout(io.StringIO()):
            empty.createIndex()
        return empty
    with contextlib.redirect_stdout(io.StringIO()):
        return coco_gt.loadRes(copy.deepcopy(results))


def category_groups(coco_gt: COCO, grouping: str = "supercategory") -> dict[int, str]:
    """Category id -> group name.

    Args:
        grouping: ``'supercategory'`` (the categories' field; missing -> ``'all'``), ``'one'`` (a single
            group ``'all'``), ``'class'`` (each category alone), or a JSON file ``{category name: group}``
            (categories it does not name stay alone).
    """
    cats = coco_gt.loadCats(coco_gt.getCatIds())
    if grouping == "supercategory":
        return {c["id"]: str(c.get("supercategory") or "all") for c in cats}
    if grouping == "one":
        return {c["id"]: "all" for c in cats}
    if grouping == "class":
        return {c["id"]: str(c.get("name", c["id"])) for c in cats}
    path = Path(grouping)
    if not path.is_file():
        raise AnalysisError(f"--groups {grouping!r}: choose one of {', '.join(GROUPINGS)} or pass a JSON file "
                            "mapping category names to group names")
    try:
        mapping = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise AnalysisError(f"cannot read the groups file {path}: {error}") from None
    if not isinstance(mapping, dict):
        raise AnalysisError(f"groups file {path}: expected a JSON object {{category name: group name}}")
    names = {str(c.get("name")) for c in cats}
    unknown = sorted(set(mapping) - names)
    if unknown:
        raise AnalysisError(f"groups file {path} names categories the ground truth does not have: {unknown[:5]}")
    return {c["id"]: str(mapping.get(str(c.get("name")), c.get("name"))) for c in cats}


# ------------------------------------------------------------------------------ evaluation
def _ignore_duplicates(evaluator: COCOeval, threshold_index: int) -> None:
    """Hoiem et al.'s duplicates: at ``iouThrs[threshold_index]``, a false positive overlapping a (non-ignored)
    gt of its category by at least that IoU lost the gt to a higher-scoring detection: mark it ignored."""
    threshold = evaluator.params.iouThrs[threshold_index]
    for entry in evaluator.evalImgs:
        if entry is None or not len(entry["dtIds"]) or not len(entry["gtIds"]):
            continue
        key = (entry["image_id"], entry["category_id"])
        ious = np.asarray(evaluator.ious[key])
        column = {g["id"]: j for j, g in enumerate(evaluator._gts[key])}
        columns = [column[g] for g, ignored in zip(entry["gtIds"], entry["gtIgnore"]) if not ignored]
        if not columns:
            continue
        best = ious[: len(entry["dtIds"])][:, columns].max(axis=1)
        false_positive = (entry["dtMatches"][threshold_index] == 0) & ~entry["dtIgnore"][threshold_index]
        entry["dtIgnore"][threshold_index] |= false_positive & (best >= threshold)


def _precision(
    coco_gt: COCO, coco_dt: COCO, iou_thrs: Sequence[float], cat_ids: Sequence[int], img_ids: Sequence[int],
    duplicates: str,
) -> np.ndarray:
    """COCOeval precision ``[T, R, K]`` (all areas, 100 detections per image; -1 where a category has no gt)."""
    evaluator = _IgnoringCOCOeval(coco_gt, coco_dt, "bbox")
    params = evaluator.params
    params.imgIds = list(img_ids)
    params.catIds = list(cat_ids)
    params.iouThrs = np.asarray(iou_thrs, dtype=np.float64)
    params.maxDets = [100]
    params.areaRng = [[0.0, 1e10]]
    params.areaRngLbl = ["all"]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        if duplicates == "loc":
            for index, threshold in enumerate(params.iouThrs):
                if abs(threshold - LOC_IOU) < 1e-9:
                    _ignore_duplicates(evaluator, index)
        evaluator.accumulate()
    return evaluator.eval["precision"][:, :, :, 0, 0]


def _relabelled_gt(coco_gt: COCO, cat_id: int, others: set[int], next_id: int) -> COCO:
    """The ground truth of ``cat_id`` plus the objects of the categories ``others`` relabelled to
    ``cat_id`` and flagged ignored (COCO analyze: "setting all objects ... to have the same class label
    as the class in question and setting their ignore flag to 1")."""
    annotations = list(coco_gt.loadAnns(coco_gt.getAnnIds(catIds=[cat_id])))
    for offset, ann in enumerate(coco_gt.loadAnns(coco_gt.getAnnIds(catIds=sorted(others)))):
        annotations.append({**ann, "category_id": cat_id, "analysis_ignore": 1, "id": next_id + offset})
    relabelled = COCO()
    relabelled.dataset = {"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"],
                          "annotations": annotations}
    with contextlib.redirect_stdout(io.StringIO()):
        relabelled.createIndex()
    return relabelled


def analyze_errors(
    coco_gt: COCO,
    coco_dt: COCO,
    groups: dict[int, str] | None = None,
    duplicates: str = "fp",
    progress: Callable[[int], None] | None = None,
) -> dict:
    """The seven PR curves of every category, and their averages overall and per group.

    Args:
        coco_gt: the ground truth; coco_dt: detections (:func:`load_results`).
        groups: category id -> group name (:func:`category_groups`); default: super-categories.
        duplicates: ``'fp'`` (COCO: duplicates stay false positives until BG) or ``'loc'`` (ignored
            from Loc on, Hoiem et al.).
        progress: called with 1 after each category.

    Returns:
        ``{"types", "recall" [R], "duplicates", "groups" {category: group}, "precision" [7][R][K],
        "categories" [K names], "has_gt" [K], "overall": {"ap": {type: AP}, "curves": {type: [R]}},
        "by_group": {group: {...}}, "per_category": {name: {"ap": {...}}}}``.
    """
    if duplicates not in DUPLICATES:
        raise AnalysisError(f"duplicates must be one of {DUPLICATES}, got {duplicates!r}")
    groups = groups if groups is not None else category_groups(coco_gt)
    cat_ids = sorted(coco_gt.getCatIds())
    img_ids = sorted(coco_gt.getImgIds())
    if not cat_ids or not img_ids:
        raise AnalysisError("the ground truth has no categories or no images")
    base = _precision(coco_gt, coco_dt, (0.75, 0.5, LOC_IOU), cat_ids, img_ids, duplicates)  # [3, R, K]
    recall_points = base.shape[1]
    precision = np.zeros((len(ERROR_TYPES), recall_points, len(cat_ids)))
    precision[:3] = base
    has_gt = np.array([bool(coco_gt.getAnnIds(catIds=[c], iscrowd=False)) for c in cat_ids])
    next_id = max((a["id"] for a in coco_gt.dataset.get("annotations", [])), default=0) + 1
    for k, cat_id in enumerate(cat_ids):
        same = {c for c in cat_ids if c != cat_id and groups.get(c) == groups.get(cat_id)}
        every = set(cat_ids) - {cat_id}
        if not has_gt[k]:
            precision[3:5, :, k] = -1
        else:
            # Sim: same-group confusions removed; Oth: all confusions removed (both at IoU 0.1).
            if same:
                sim_gt = _relabelled_gt(coco_gt, cat_id, same, next_id)
                precision[3, :, k] = _precision(sim_gt, coco_dt, (LOC_IOU,), [cat_id], img_ids, duplicates)[0, :, 0]
            else:
                precision[3, :, k] = precision[2, :, k]  # a singleton group: Sim = Loc
            if every == same:
                precision[4, :, k] = precision[3, :, k]  # one group: Oth = Sim
            else:
                oth_gt = _relabelled_gt(coco_gt, cat_id, every, next_id)
                precision[4, :, k] = _precision(oth_gt, coco_dt, (LOC_IOU,), [cat_id], img_ids, duplicates)[0, :, 0]
        if progress is not None:
            progress(1)
    precision[precision < 0] = 0.0  # only where a category has no gt, which the averages skip
    precision[5] = (precision[4] > 0).astype(np.float64)  # BG: every remaining false positive removed
    precision[6] = 1.0  # FN: every error removed
    precision[5:, :, ~has_gt] = 0.0
    names = [str(c.get("name", c["id"])) for c in coco_gt.loadCats(cat_ids)]
    recall = np.linspace(0.0, 1.0, recall_points)

    def summarise(mask: np.ndarray) -> dict:
        mask = mask & has_gt
        if not mask.any():
            return {"categories": 0, "ap": {t: float("nan") for t in ERROR_TYPES}, "curves": {}}
        curves = precision[:, :, mask].mean(axis=2)  # [7, R]
        return {"categories": int(mask.sum()), "ap": {t: float(curves[i].mean()) for i, t in enumerate(ERROR_TYPES)},
                "curves": {t: curves[i].tolist() for i, t in enumerate(ERROR_TYPES)}}

    group_of = [groups.get(c, "all") for c in cat_ids]
    return {
        "types": list(ERROR_TYPES),
        "recall": recall.tolist(),
        "duplicates": duplicates,
        "categories": names,
        "has_gt": has_gt.tolist(),
        "groups": dict(zip(names, group_of)),
        "precision": precision.tolist(),
        "overall": summarise(np.ones(len(cat_ids), dtype=bool)),
        "by_group": {g: summarise(np.array([x == g for x in group_of])) for g in sorted(set(group_of))},
        "per_category": {
            name: {"group": group, "has_gt": bool(has_gt[k]),
                   "ap": {t: float(precision[i, :, k].mean()) for i, t in enumerate(ERROR_TYPES)}}
            for k, (name, group) in enumerate(zip(names, group_of))
        },
    }


# ------------------------------------------------------------------------------ figure
def safe_name(text: str) -> str:
    """A file-name-safe version of a group name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "group"


def plot_errors(summaries: Sequence[tuple[str, dict]], recall: Sequence[float], path: str | Path, title: str) -> Path:
    """One panel per result (label, summary with ``curves`` and ``ap``): the areas between consecutive
    curves filled in the COCO analysis colours, legend ``[AP] type`` as in Fig. 8. Returns the PNG path."""
    figure = new_figure(4.6 * len(summaries), 4.2)
    for index, (label, summary) in enumerate(summaries):
        axes = figure.add_subplot(1, len(summaries), index + 1)
        if not summary.get("curves"):
            axes.text(0.5, 0.5, "no ground truth", ha="center", va="center")
        else:
            lower = np.zeros(len(recall))
            for error_type in ERROR_TYPES:
                upper = np.asarray(summary["curves"][error_type])
                axes.fill_between(recall, lower, upper, color=COLOURS[error_type], step=None,
                                  label=f"[{summary['ap'][error_type]:.3f}] {error_type}")
                axes.plot(recall, upper, color="black", linewidth=0.5)
                lower = np.maximum(lower, upper)
        axes.set_xlim(0, 1)
        axes.set_ylim(0, 1)
        axes.set_xlabel("recall")
        axes.set_ylabel("precision")
        axes.set_title(f"{label}: {title}", fontsize=9)
        axes.legend(loc="lower left", fontsize=7, framealpha=0.9)
    figure.tight_layout()
    return save_figure(figure, path)


def write_error_figures(
    analyses: Sequence[tuple[str, dict]], out_dir: str | Path, prefix: str = "fig8_errors"
) -> list[Path]:
    """``PREFIX_overall.png``, ``PREFIX_group_<group>.png`` per group, and ``PREFIX.json`` with every number."""
    out_dir = Path(out_dir)
    recall = analyses[0][1]["recall"]
    written = [plot_errors([(label, a["overall"]) for label, a in analyses], recall,
                           out_dir / f"{prefix}_overall.png", "overall")]
    for group in analyses[0][1]["by_group"]:
        written.append(plot_errors([(label, a["by_group"][group]) for label, a in analyses], recall,
                                   out_dir / f"{prefix}_group_{safe_name(group)}.png", f"group '{group}'"))
    data = {"results": [{"label": label, **{k: v for k, v in a.items() if k != "precision"}} for label, a in analyses]}
    written.append(save_json(data, out_dir / f"{prefix}.json"))
    return written
