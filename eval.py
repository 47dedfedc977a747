"""Evaluate a libra or MMDetection checkpoint: COCO box / mask AP, VOC mAP@0.5, LVIS AP, proposal recall, speed.

    python eval.py --checkpoint work_dirs/libra_faster_rcnn_r50_fpn_synthetic/epoch_12.pth
    python eval.py --dataset coco --data-root /data/coco --checkpoint libra_faster_rcnn_r50_fpn_1x_coco_20200130-3afee3a9.pth --gpus 8
    python eval.py --dataset coco --data-root /data/coco --checkpoint ... --proposals   # AR@100/300/1000
    python eval.py ... --fps                                                            # images/s, batch 1
    python eval.py ... --show 10                                                        # 10 PNGs with boxes (and masks)

A libra checkpoint (written by train.py) carries its model name, class count and the training
command line, so the same detector (and the synthetic data settings) are rebuilt from it;
flags given here win. An MMDetection checkpoint (``state_dict`` with ``rpn_head.*`` /
``roi_head.bbox_head.*`` keys) is loaded with ``libra.mmdet_checkpoint.load_mmdet_checkpoint``
into ``--model`` (default: the preset its keys describe, see ``guess_mmdet_preset``).

Outputs (rank 0, written atomically, so an interrupted run can simply be re-run): the
detections JSON (COCO results format; a mask model also writes ``segm_detections.json`` with RLE
masks) and a metrics JSON in ``--work-dir`` (default: a folder ``eval_<checkpoint name>`` beside
the checkpoint). A mask model (Mask R-CNN) is scored with box AP and mask AP (``segm_AP``, ...).
The output folder (and the folder of ``--save-proposals FILE``) is checked and locked before the
model runs (a second eval.py into it is refused); a checkpoint is read weights-only
(``--trust-checkpoint`` for a trusted file that needs more).

Exit codes: 1 for bad input (one ``error:`` line, nothing written), 4 when an output cannot be
written during the run (disk full, read-only: the line names the file and why; earlier outputs
are intact), 5 when another process of a multi-process evaluation is gone (killed, a node lost),
130 on Ctrl-C. ``LIBRA_DEBUG=1`` shows tracebacks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from libra.atomic_io import OutputLocationError, WriteError, prepare_output_dir, remove_empty_dirs
from libra.data.proposals import top_proposals
from libra.engine.builders import DataError, build_eval_loader, build_split
from libra.engine.checkpoint import CheckpointError, atomic_write_text
from libra.engine.cli import build_detector, check_proposals_flags, data_settings, one_line
from libra.engine.distributed import (
    EXIT_INTERRUPTED,
    EXIT_PEER_LOST,
    DistributedContext,
    apply_slurm_environment,
    is_peer_failure,
    launch,
    process_label,
    reports_for_node,
    stopped_by_launcher,
    torchrun_environment,
    wait_for_launcher_stop,
)
from libra.engine.evaluator_loop import evaluate_model
from libra.engine.loading import (  # noqa: F401  (guess_mmdet_preset, read_checkpoint: eval.py's API of before)
    build_eval_parser,
    guess_mmdet_preset,
    load_weights,
    read_checkpoint,
    resolve_checkpoint_args,
)
from libra.engine.run_dir import WorkDirLock
from libra.engine.trainer import autocast_context

EXIT_BAD_INPUT = 1
EXIT_WRITE_FAILED = 4

build_parser = build_eval_parser


def resolve(args: argparse.Namespace) -> tuple[argparse.Namespace, str | None, dict | None]:
    """The checkpoint's model and data (:func:`libra.engine.loading.resolve_checkpoint_args`), then
    eval.py's own settings (proposals files, work dir)."""
    if not args.checkpoint and not args.fps:
        raise CheckpointError("--checkpoint is required (only --fps runs without one, on random weights)")
    args, kind, checkpoint = resolve_checkpoint_args(args)
    saved = checkpoint.get("args", {}) if kind == "libra" else {}
    if args.proposals_file is None and kind == "libra":
        # A Fast R-CNN checkpoint names the proposals it was trained and evaluated on.
        args.proposals_file = saved.get("val_proposals_file" if args.split == "val" else "proposals_file")
    check_proposals_flags(args, [("proposals_file", "--proposals-file")])
    if args.save_proposals:
        args.proposals = True
        if args.proposals_per_image < 1:
            raise DataError(f"--proposals-per-image must be >= 1, got {args.proposals_per_image}")
    if args.work_dir is None:
        if args.checkpoint:
            args.work_dir = str(Path(args.checkpoint).resolve().parent / f"eval_{Path(args.checkpoint).stem}")
        else:
            args.work_dir = str(Path("work_dirs") / f"eval_{args.model}_{args.dataset}")
    return args, kind, checkpoint


@torch.no_grad()
def measure_fps(model: torch.nn.Module, dataset, ctx: DistributedContext, num_images: int, amp: bool) -> float:
    """Images per second at batch 1 (5 warm-up images, then ``num_images`` timed with device syncs)."""
    from libra.data.transforms import collate

    model.eval()
    count = min(len(dataset), num_images + 5)
    times = []
    for index in range(count):
        batch = collate([dataset[index % len(dataset)]]).to(ctx.device)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        start = time.perf_counter()
        with autocast_context(ctx.device, amp):
            model.predict(batch)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        if index >= 5 or count <= 5:
            times.append(time.perf_counter() - start)
    return len(times) / sum(times) if times else float("nan")


def eval_worker(ctx: DistributedContext, payload) -> int:
    args, kind, checkpoint = payload
    try:
        return _evaluate(ctx, args, kind, checkpoint)
    except WriteError as error:  # disk full, read-only, ...: nothing half written
        if os.environ.get("LIBRA_DEBUG"):
            raise
        print(f"error: {'' if ctx.is_main else f'(process {ctx.rank}) '}{one_line(error)}; outputs written before are "
              "intact: free space or pass another --work-dir, then run again", file=sys.stderr, flush=True)
        return EXIT_WRITE_FAILED
    except (DataError, CheckpointError, FileNotFoundError, ValueError) as error:
        if os.environ.get("LIBRA_DEBUG"):
            raise
        if ctx.is_main:
            print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except Exception as error:
        # A collective that failed because another process of the evaluation is gone (killed, a node
        # lost): one line where it is seen. Anything else is a bug and keeps its traceback.
        if not (ctx.distributed and is_peer_failure(error)) or os.environ.get("LIBRA_DEBUG"):
            raise
        if stopped_by_launcher() or wait_for_launcher_stop(10.0):
            return EXIT_BAD_INPUT  # --gpus N: the launcher reports the failed process
        if reports_for_node(ctx):
            print(f"error: {process_label(ctx) or '(process 0) '}another process of the evaluation is gone "
                  f"({one_line(error)[:160]}): it was killed or its node failed, so it may have left no message; "
                  "nothing was replaced: run the evaluation again", file=sys.stderr, flush=True)
        return EXIT_PEER_LOST


def _evaluate(ctx: DistributedContext, args, kind: str | None, checkpoint: dict | None) -> int:
    if ctx.device.type == "cpu":
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // ctx.world_size))
    settings = data_settings(args)
    dataset = build_split(settings, train=False, split=args.split, proposals_file=args.proposals_file)
    model = build_detector(args, dataset.num_classes)
    if args.proposals and not model.makes_proposals:
        raise CheckpointError(
            f"--proposals / --save-proposals need a model with an RPN; {args.model} makes no proposals of its own"
        )
    load_weights(model, kind, checkpoint, args, dataset.num_classes, dataset.class_names)
    model.batch_independent = bool(getattr(args, "batch_independent", False))  # per image in a batch (README)
    model.to(ctx.device).eval()
    work_dir = Path(args.work_dir)
    if ctx.is_main:
        source = args.checkpoint or "random weights"
        print(f"evaluating {args.model} ({source}) on {args.dataset}: {len(dataset)} images, "
              f"{ctx.world_size} process(es) on {ctx.device}; outputs in {work_dir}", flush=True)

    if args.fps:
        if ctx.is_main:
            fps = measure_fps(model, dataset, ctx, args.fps_images, args.amp)
            print(f"inference speed: {fps:.2f} images/s (batch 1, {ctx.device}, {'AMP' if args.amp else 'fp32'})", flush=True)
            atomic_write_text(json.dumps({"fps": fps, "device": str(ctx.device), "amp": args.amp}) + "\n", work_dir / "fps.json")
        if not args.checkpoint:
            return 0

    to_show = {"left": args.show if ctx.is_main else 0}
    shown: list[Path] = []

    def on_batch(images, targets, outputs):
        if to_show["left"] <= 0:
            return
        from libra.data.visualize import draw_with_ground_truth

        for target, output in zip(targets, outputs):
            if to_show["left"] <= 0:
                break
            record = next((r for r in dataset.records if r.image_id == target["image_id"]), None)
            if record is None:
                continue
            boxes, scores, names, threshold = output.get("boxes"), output.get("scores"), dataset.class_names, args.show_score_thr
            labels, gt_names = output.get("labels"), list(dataset.class_names)
            if labels is None:  # proposals (a standalone RPN, or --proposals): the 20 best, whatever their score
                (boxes, scores), = top_proposals([output], 20)
                labels, names, threshold = torch.zeros(len(scores), dtype=torch.int64), ["proposal"], 0.0
            gt_boxes, gt_labels = ground_truth_of(dataset, int(target["image_id"]))
            path = work_dir / "show" / f"{target['image_id']}.png"
            draw_with_ground_truth(
                record.file_path, gt_boxes, gt_labels, {"boxes": boxes, "labels": labels, "scores": scores,
                                                        **({"masks": output["masks"]} if "masks" in output else {})},
                names if labels is not output.get("labels") else gt_names, path, score_threshold=threshold,
            )
            shown.append(path)
            to_show["left"] -= 1

    collected: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep_proposals(images, targets, outputs):
        for target, (boxes, scores) in zip(targets, top_proposals(outputs, args.proposals_per_image)):
            collected[int(target["image_id"])] = (boxes, scores)

    loader = build_eval_loader(dataset, args.batch_size, args.workers, ctx.rank, ctx.world_size)
    tag = "proposals_" if args.proposals else ""
    if args.split != "val":
        tag = f"{args.split}_{tag}"
    def callback(images, targets, outputs):
        if args.save_proposals:
            keep_proposals(images, targets, outputs)
        if args.show:
            on_batch(images, targets, outputs)

    evaluate_model(
        model, dataset, loader, ctx, work_dir=work_dir, amp=args.amp, proposals=args.proposals,
        progress=True, tag=tag, on_batch=callback if (args.save_proposals or args.show) else None,
        per_class=args.per_class,
    )
    if ctx.is_main:
        segm = "" if args.proposals or "segm" not in model.iou_types else (
            f" and {work_dir / (tag + 'segm_detections.json')}"
        )
        proposals_only = args.proposals or "proposal" in model.iou_types
        detections = "" if proposals_only else f", {work_dir / (tag + 'detections.json')}"
        print(f"wrote {work_dir / (tag + 'metrics.json')}, {work_dir / (tag + 'per_class.json')}" + detections + segm,
              flush=True)
        if shown:
            print(f"wrote {len(shown)} PNGs (ground truth | detections) to {work_dir / 'show'}", flush=True)
    if args.save_proposals:
        path = Path(args.save_proposals) if args.save_proposals != "auto" else work_dir / f"proposals_{args.split}.pt"
        meta = {
            "dataset": args.dataset, "split": args.split, "model": args.model,
            "checkpoint": str(args.checkpoint or ""), "max_per_image": int(args.proposals_per_image),
        }
        total = write_proposals_file(collected, path, meta, ctx)
        if ctx.is_main:
            print(f"wrote {path}: {total} proposals of {len(dataset)} images (at most {args.proposals_per_image} each)", flush=True)
    return 0


def ground_truth_of(dataset, image_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(boxes [G, 4] x1y1x2y2 in the original image, labels [G])`` of an image's non-crowd annotations."""
    api = dataset.coco_api
    label_of = {int(c): i for i, c in enumerate(dataset.label_to_cat_id)}
    anns = [a for a in api.loadAnns(api.getAnnIds(imgIds=[image_id])) if not a.get("iscrowd", 0)]
    boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                          for a in anns], dtype=torch.float32).reshape(-1, 4)
    labels = torch.tensor([label_of.get(int(a["category_id"]), 0) for a in anns], dtype=torch.int64)
    return boxes, labels


def write_proposals_file(collected: dict, path: Path, meta: dict, ctx: DistributedContext) -> int:
    """Gather every process's proposals and write them (rank 0, atomically); returns the proposal count.

    Each process saves its share beside the target (``<file>.rank<r>``, atomically), rank 0 merges the
    shares into one file and removes them: no process holds everybody's proposals in a collective.
    """
    from libra.data.proposals import ProposalSet, load_proposals, save_proposals
    from libra.engine.distributed import synchronize

    if ctx.world_size == 1:
        proposals = ProposalSet.from_images(collected, meta["max_per_image"], meta)
        save_proposals(proposals, path)
        return int(proposals.counts.sum())
    shard = path.with_name(f"{path.name}.rank{ctx.rank}")
    save_proposals(ProposalSet.from_images(collected, meta["max_per_image"]), shard)
    synchronize()
    total = 0
    if ctx.is_main:
        merged: dict = {}
        shards = [path.with_name(f"{path.name}.rank{r}") for r in range(ctx.world_size)]
        for name in shards:
            part = load_proposals(name)
            merged.update({int(i): part.get(int(i)) for i in part.image_ids.tolist()})
        proposals = ProposalSet.from_images(merged, meta["max_per_image"], meta)
        save_proposals(proposals, path)
        total = int(proposals.counts.sum())
        for name in shards:
            name.unlink(missing_ok=True)
    synchronize()
    return total


def _report_killed_worker(index: int, signal_name: str) -> None:
    """``--gpus N``: a worker killed by a signal could not say so itself; the launcher says it (exit 5)."""
    print(f"error: process {index} of the evaluation was killed by {signal_name} (kill -9, or the out-of-memory "
          "killer: it could leave no message); the other processes were stopped, nothing was replaced: run the "
          "evaluation again", file=sys.stderr, flush=True)


def claim_outputs(args: argparse.Namespace) -> tuple[WorkDirLock | None, list[Path]]:
    """Before any work: lock ``--work-dir`` (created and written once, so a read-only or blocked
    location is refused now) and check the folder of ``--save-proposals FILE``. Rank 0 only."""
    if torchrun_environment() and int(os.environ.get("RANK", "0")) != 0:
        return None, []
    lock = WorkDirLock(args.work_dir, "eval.py", " ".join(["eval.py", *(sys.argv[1:] or [])]))
    note = lock.acquire()
    if note:
        print(f"note: {note}", file=sys.stderr, flush=True)
    created: list[Path] = []
    if args.save_proposals and args.save_proposals != "auto":
        target = Path(args.save_proposals)
        if target.is_dir():
            lock.release()
            raise DataError(f"--save-proposals {target} is a folder: pass a file name (e.g. {target / 'proposals.pt'})")
        try:
            created = prepare_output_dir(target.parent, "the folder of --save-proposals")
        except OutputLocationError:
            lock.release()
            raise
    return lock, created


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    lock, created = None, []
    try:
        apply_slurm_environment()  # srun: one task per process, as under torchrun
        resolved, kind, checkpoint = resolve(args)
        lock, created = claim_outputs(resolved)
        code = launch(eval_worker, resolved.gpus, resolved.device, (resolved, kind, checkpoint),
                      on_killed=_report_killed_worker)
        if code:
            remove_empty_dirs(created)
        return code
    except (DataError, CheckpointError, ValueError) as error:
        if os.environ.get("LIBRA_DEBUG"):
            raise
        print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
        remove_empty_dirs(created)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        if os.environ.get("LIBRA_DEBUG"):
            raise
        print("error: interrupted (Ctrl-C); outputs are written atomically, those written before are intact: run "
              "the evaluation again", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    finally:
        if lock is not None:
            lock.release()


if __name__ == "__main__":
    sys.exit(main())
