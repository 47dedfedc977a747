"""Inference over an evaluation split, sharded across processes, evaluated on rank 0.

Each process runs the detector on its share of the images (``build_eval_loader``: rank r
takes images r, r + R, ...), feeds its own evaluator, and the evaluators' plain-list states
are gathered to rank 0, merged and evaluated there. The evaluator is chosen from the dataset's
``evaluation_protocol`` and ground truth (``dataset.coco_api``) and from what the model outputs
(:func:`get_iou_types`), as in torchvision's detection references.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

from libra.detectors import Detector
from libra.evaluation import build_evaluator

from .checkpoint import atomic_write_text
from .distributed import DistributedContext, all_gather_object, synchronize
from .trainer import autocast_context


def unwrap(model: torch.nn.Module) -> Detector:
    """The detector inside DistributedDataParallel (inference needs no gradient sync)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


@torch.no_grad()
def run_inference(
    model: torch.nn.Module,
    loader,
    evaluator,
    ctx: DistributedContext,
    amp: bool = False,
    proposals: bool = False,
    progress: bool = True,
    on_batch: Callable[[torch.Tensor, list[dict], list[dict]], None] | None = None,
) -> None:
    """Run the model over ``loader`` and ``evaluator.update`` with detections in original coordinates.

    The detector is driven through its interface only (``predict``, or ``predict_proposals`` with
    ``proposals``: the evaluator then receives the RPN proposals instead of the final detections,
    proposal recall AR@100/300/1000).
    """
    detector = unwrap(model)
    was_training = detector.training
    detector.eval()
    iterator = loader
    if progress and ctx.is_main:
        from tqdm import tqdm

        iterator = tqdm(loader, desc="eval", unit="batch", dynamic_ncols=True, leave=False)
    try:
        for batch in iterator:
            batch = batch.to(ctx.device)
            with autocast_context(ctx.device, amp):
                # Proposal recall reads the proposals of a model with an RPN; a proposal model's
                # predictions are its proposals.
                outputs = detector.predict_proposals(batch) if proposals else detector.predict(batch)
            # fp32 on the host (AMP outputs may be half precision; labels stay int64).
            outputs = [{k: (v.float() if v.is_floating_point() else v).cpu() for k, v in o.items()} for o in outputs]
            evaluator.update(batch.image_ids, outputs)
            if on_batch is not None:
                on_batch(batch.images, batch.targets, outputs)
    finally:
        detector.train(was_training)


def get_iou_types(model: torch.nn.Module) -> tuple[str, ...]:
    """What ``model``'s outputs are evaluated as: its ``iou_types`` (``("bbox",)`` for a detector,
    ``("proposal",)`` for a proposal model; a mask model adds ``"segm"``)."""
    return tuple(unwrap(model).iou_types)


def gather_evaluator(evaluator, ctx: DistributedContext):
    """Merge every rank's evaluator state into rank 0's evaluator (returns it on rank 0, None elsewhere)."""
    if ctx.world_size < 2:
        return evaluator
    states = all_gather_object(evaluator.state_dict())
    if not ctx.is_main:
        return None
    evaluator.reset()
    for state in states:
        evaluator.merge(state)
    return evaluator


def format_metrics_table(metrics: dict[str, Any], title: str = "") -> str:
    """A two-row plain-text table: metric names, values in percent (2 decimals; the title says so)."""
    names = [k for k, v in metrics.items() if isinstance(v, (int, float))]
    if not names:
        return title
    width = max(8, *(len(n) + 2 for n in names))
    header = "".join(n.rjust(width) for n in names)
    row = "".join((f"{100.0 * float(metrics[n]):.2f}" if float(metrics[n]) >= 0 else "n/a").rjust(width) for n in names)
    rule = "-" * len(header)
    title = f"{title}, in %" if title else "in %"
    return "\n".join([title, rule, header, row, rule])


def format_per_class_table(rows: list[dict], title: str = "") -> str:
    """One line per class: name, ground-truth instances and every AP column of ``rows`` in percent
    ("n/a" for a class without ground truth), then their mean over the classes with ground truth."""
    columns = [k for k in ("AP", "AP50", "AP_07") if rows and k in rows[0]]
    width = max([8] + [len(r["name"]) + 2 for r in rows])
    lines = [title] if title else []
    lines.append("class".ljust(width) + "gts".rjust(8) + "".join(c.rjust(8) for c in columns))
    for row in rows:
        values = "".join((f"{100.0 * row[c]:.2f}" if row[c] >= 0 else "n/a").rjust(8) for c in columns)
        lines.append(row["name"].ljust(width) + str(row["num_gts"]).rjust(8) + values)
    means = []
    for c in columns:
        valid = [row[c] for row in rows if row[c] >= 0]
        means.append((f"{100.0 * sum(valid) / len(valid):.2f}" if valid else "n/a").rjust(8))
    lines.append("mean".ljust(width) + "".rjust(8) + "".join(means))
    return "\n".join(lines)


def evaluate_model(
    model: torch.nn.Module,
    dataset,
    loader,
    ctx: DistributedContext,
    work_dir: Path | None = None,
    amp: bool = False,
    proposals: bool = False,
    progress: bool = True,
    tag: str = "",
    on_batch=None,
    per_class: bool = False,
) -> dict[str, float]:
    """Evaluate ``model`` on ``dataset`` (all ranks call this); rank 0 returns the metrics and
    writes ``{tag}detections.json`` (box results), ``{tag}segm_detections.json`` (mask results as
    RLE, for a model with ``"segm"`` in its ``iou_types``) and ``{tag}metrics.json`` into
    ``work_dir`` atomically; other ranks return {}. Mask metrics are the box names prefixed
    ``segm_`` (``segm_AP``, ..., ``segm_APr`` on LVIS). The per-class AP (and AP50) of every IoU type
    is written to ``{tag}per_class.json`` and, with ``per_class``, printed as a table."""
    start = time.perf_counter()
    if ctx.world_size > 1:
        # Trainable BN statistics are updated by every rank's last forward pass; evaluate with
        # rank 0's (the ones its checkpoint holds) on every rank.
        for buffer in unwrap(model).buffers():
            torch.distributed.broadcast(buffer, src=0)
    iou_types = ("proposal",) if proposals else get_iou_types(model)
    evaluator = build_evaluator(
        dataset.evaluation_protocol, dataset.coco_api, dataset.label_to_cat_id, iou_types,
        class_names=dataset.class_names, verbose=ctx.is_main,
    )
    run_inference(model, loader, evaluator, ctx, amp=amp, proposals=proposals, progress=progress, on_batch=on_batch)
    evaluator = gather_evaluator(evaluator, ctx)
    metrics: dict[str, float] = {}
    if ctx.is_main:
        metrics = {k: float(v) for k, v in evaluator.evaluate().items()}
        elapsed = time.perf_counter() - start
        if work_dir is not None:
            work_dir = Path(work_dir)
            if "proposal" not in iou_types:
                if "bbox" in iou_types:
                    atomic_write_text(json.dumps(evaluator.results("bbox")), work_dir / f"{tag}detections.json")
                if "segm" in iou_types:
                    atomic_write_text(json.dumps(evaluator.results("segm")), work_dir / f"{tag}segm_detections.json")
            atomic_write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n", work_dir / f"{tag}metrics.json")
            classes = evaluator.per_class_results()
            if classes:
                atomic_write_text(json.dumps(classes, indent=1) + "\n", work_dir / f"{tag}per_class.json")
        what = "proposal recall" if "proposal" in iou_types else " and ".join(
            {"bbox": "box", "segm": "mask"}.get(t, t) for t in iou_types
        ) + " metrics"
        if "segm" in iou_types:
            box = {k: v for k, v in metrics.items() if not k.startswith("segm_")}
            mask = {k: v for k, v in metrics.items() if k.startswith("segm_")}
            print(format_metrics_table(box, f"box metrics on {len(dataset)} images ({elapsed:.1f}s)"))
            print(format_metrics_table(mask, f"mask metrics on {len(dataset)} images"))
        else:
            print(format_metrics_table(metrics, f"{what} on {len(dataset)} images ({elapsed:.1f}s)"))
        if per_class:
            for iou_type, rows in evaluator.per_class_results().items():
                print(format_per_class_table(rows, f"per-class {'mask' if iou_type == 'segm' else 'box'} AP, in %"))
    synchronize()
    return metrics
