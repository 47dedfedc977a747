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
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from libra.data.proposals import top_proposals
from libra.engine.builders import DataError, build_dataset, build_eval_loader
from libra.engine.checkpoint import (
    CheckpointError,
    atomic_write_text,
    check_model_identity,
    is_libra_checkpoint,
    load_checkpoint_file,
    load_model_state,
)
from libra.engine.cli import (
    add_data_arguments,
    add_model_arguments,
    apply_recipe,
    build_detector,
    check_proposals_flags,
    data_settings,
    one_line,
)
from libra.engine.distributed import DistributedContext, launch
from libra.engine.evaluator_loop import evaluate_model
from libra.engine.trainer import autocast_context, proposal_inputs

EXIT_BAD_INPUT = 1

# Training-time settings that define the model / data and are taken from a libra checkpoint
# unless given on this command line.
_FROM_CHECKPOINT = (
    "dataset", "model", "sampler", "neck", "box_loss", "cls_loss", "box_head", "frozen_stages", "backbone_norm",
    "width_per_group", "stage_blocks", "min_size", "max_size", "synthetic_num_train", "synthetic_num_val", "synthetic_image_size",
    "data_root",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Evaluate a libra / MMDetection checkpoint.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="libra or MMDetection .pth (required unless --fps)")
    data = add_data_arguments(parser, dataset_default=None)
    data.add_argument("--workers", type=int, default=2)
    add_model_arguments(parser, model_default=None)
    parser.add_argument("--proposals", action="store_true", help="evaluate RPN proposal recall AR@100/300/1000")
    parser.add_argument(
        "--save-proposals", nargs="?", const="auto", default=None, metavar="FILE",
        help="also write the top --proposals-per-image proposals of every image (Fast R-CNN input, format in "
        "libra/data/proposals.py); no value: proposals_<split>.pt in --work-dir. Implies --proposals",
    )
    parser.add_argument("--proposals-per-image", type=int, default=1000, help="proposals kept per image by --save-proposals")
    parser.add_argument(
        "--split", choices=("train", "val"), default="val",
        help="the split to run on (train: e.g. to save the training images' proposals; test transform either way)",
    )
    parser.add_argument("--fps", action="store_true", help="measure inference images/s (batch 1, after warm-up)")
    parser.add_argument("--fps-images", type=int, default=50, help="images timed by --fps (after 5 warm-up images)")
    parser.add_argument("--show", type=int, default=0, metavar="N", help="draw detections of N images into PNG files")
    parser.add_argument("--show-score-thr", type=float, default=0.3)
    parser.add_argument("--batch-size", type=int, default=1, help="images per process")
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None)
    parser.add_argument("--gpus", type=int, default=1, help="processes (DDP-style sharded evaluation)")
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--threads", type=int, default=None)
    return parser


def read_checkpoint(path: str) -> tuple[str, dict]:
    """('libra' | 'mmdet', checkpoint dict)."""
    checkpoint = load_checkpoint_file(path, map_location="cpu")
    if is_libra_checkpoint(checkpoint):
        return "libra", checkpoint
    state = checkpoint.get("state_dict", checkpoint)
    if isinstance(state, dict) and any(k.startswith(("rpn_head.", "roi_head.bbox_head.", "bbox_head.")) for k in state):
        return "mmdet", checkpoint
    raise CheckpointError(
        f"{path} is neither a libra checkpoint (train.py) nor an MMDetection detector checkpoint "
        "(state_dict with rpn_head.* / roi_head.bbox_head.* / bbox_head.* keys)"
    )


def guess_mmdet_preset(state: dict) -> str:
    """The libra preset an MMDetection checkpoint's keys describe: detector family (``bbox_head.retina_*``:
    RetinaNet; ``rpn_head.*`` and ``roi_head.*``: Faster R-CNN, Mask R-CNN with ``roi_head.mask_head.*``;
    only ``rpn_head.*``: a standalone RPN; only ``roi_head.*``: Fast R-CNN), Libra (a second neck, the
    BFP: ``neck.1.*``) and backbone (ResNet-50 / 101 by the number of layer3 blocks, ResNeXt by its
    grouped 3x3 convs)."""
    rpn = any(k.startswith("rpn_head.") for k in state)
    roi = any(k.startswith("roi_head.") for k in state)
    if any(k.startswith("bbox_head.retina_cls") for k in state):
        family = "retinanet"
    elif rpn and any(k.startswith("roi_head.mask_head.") for k in state):
        family = "mask_rcnn"
    else:
        family = "faster_rcnn" if rpn and roi else ("rpn" if rpn else "fast_rcnn")
    libra = any(k.startswith("neck.1.") for k in state)
    blocks = {k.split(".")[2] for k in state if k.startswith("backbone.layer3.")}
    conv2 = state.get("backbone.layer1.0.conv2.weight")
    grouped = conv2 is not None and conv2.dim() == 4 and conv2.shape[1] < conv2.shape[0]
    depth = "x101_64x4d" if grouped else ("r101" if len(blocks) > 6 else "r50")
    return f"{'libra_' if libra else ''}{family}_{depth}_fpn"


def resolve(args: argparse.Namespace) -> tuple[argparse.Namespace, str | None, dict | None]:
    kind, checkpoint = (None, None)
    if args.checkpoint:
        kind, checkpoint = read_checkpoint(args.checkpoint)
    elif not args.fps:
        raise CheckpointError("--checkpoint is required (only --fps runs without one, on random weights)")
    saved = checkpoint.get("args", {}) if kind == "libra" else {}
    for key in _FROM_CHECKPOINT:
        if getattr(args, key, None) is None and saved.get(key) is not None:
            setattr(args, key, saved[key])
    if kind == "libra" and saved.get("set") and not args.set:
        args.set = list(saved["set"])
    args.dataset = args.dataset or "synthetic"
    if args.model is None and kind == "mmdet":
        args.model = guess_mmdet_preset(checkpoint.get("state_dict", checkpoint))
    args.model = args.model or "libra_faster_rcnn_r50_fpn"
    apply_recipe(args)  # sizes, synthetic settings, backbone knobs and overrides not given or saved
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


def load_weights(
    model: torch.nn.Module, kind: str | None, checkpoint: dict | None, args, num_classes: int, class_names=None
) -> None:
    if kind == "libra":
        check_model_identity(checkpoint, args.model, num_classes, args.checkpoint, class_names=class_names)
        load_model_state(model, checkpoint["model"], args.checkpoint)
    elif kind == "mmdet":
        from libra.mmdet_checkpoint import load_mmdet_checkpoint

        state = checkpoint.get("state_dict", checkpoint)
        fc_cls = state.get("roi_head.bbox_head.fc_cls.weight")
        if fc_cls is not None and fc_cls.shape[0] != num_classes + 1:
            raise CheckpointError(
                f"{args.checkpoint} classifies {fc_cls.shape[0] - 1} classes but the {args.dataset} dataset has {num_classes}"
            )
        try:
            load_mmdet_checkpoint(model, checkpoint)
        except ValueError as error:
            raise CheckpointError(f"{args.checkpoint} does not fit --model {args.model}: {one_line(error)}") from None


@torch.no_grad()
def measure_fps(model: torch.nn.Module, dataset, ctx: DistributedContext, num_images: int, amp: bool) -> float:
    """Images per second at batch 1 (5 warm-up images, then ``num_images`` timed with device syncs)."""
    from libra.data.transforms import collate

    model.eval()
    count = min(len(dataset), num_images + 5)
    times = []
    for index in range(count):
        images, targets = collate([dataset[index % len(dataset)]])
        images = images.to(ctx.device)
        sizes = [tuple(targets[0]["img_shape"])]
        originals = [tuple(targets[0]["ori_shape"])]
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        start = time.perf_counter()
        with autocast_context(ctx.device, amp):
            model(images, sizes, original_sizes=originals, **proposal_inputs(model, targets))
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        if index >= 5 or count <= 5:
            times.append(time.perf_counter() - start)
    return len(times) / sum(times) if times else float("nan")


def eval_worker(ctx: DistributedContext, payload) -> int:
    args, kind, checkpoint = payload
    try:
        return _evaluate(ctx, args, kind, checkpoint)
    except (DataError, CheckpointError, FileNotFoundError, ValueError) as error:
        if os.environ.get("LIBRA_DEBUG"):
            raise
        if ctx.is_main:
            print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT


def _evaluate(ctx: DistributedContext, args, kind: str | None, checkpoint: dict | None) -> int:
    if ctx.device.type == "cpu":
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // ctx.world_size))
    settings = data_settings(args)
    dataset = build_dataset(settings, train=False, split=args.split, proposals_file=args.proposals_file)
    model = build_detector(args, dataset.num_classes)
    if args.proposals and not hasattr(model, "predict_proposals"):
        raise CheckpointError(
            f"--proposals / --save-proposals need a model with an RPN; {args.model} makes no proposals of its own"
        )
    load_weights(model, kind, checkpoint, args, dataset.num_classes, dataset.class_names)
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

    def on_batch(images, targets, outputs):
        if to_show["left"] <= 0:
            return
        from libra.data.visualize import draw_detections

        for target, output in zip(targets, outputs):
            if to_show["left"] <= 0:
                break
            record = next((r for r in dataset.records if r.image_id == target["image_id"]), None)
            if record is None:
                continue
            boxes, scores, names, threshold = output.get("boxes"), output.get("scores"), dataset.class_names, args.show_score_thr
            labels = output.get("labels")
            if labels is None:  # proposals (a standalone RPN, or --proposals): the 20 best, whatever their score
                (boxes, scores), = top_proposals([output], 20)
                labels, names, threshold = torch.zeros(len(scores), dtype=torch.int64), ["proposal"], 0.0
            draw_detections(
                record.file_path, boxes, labels, scores, names,
                work_dir / "show" / f"{target['image_id']}.png", score_threshold=threshold,
                masks=output.get("masks"),
            )
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
    )
    if ctx.is_main:
        segm = "" if args.proposals or "segm" not in getattr(model, "iou_types", ()) else (
            f" and {work_dir / (tag + 'segm_detections.json')}"
        )
        proposals_only = args.proposals or "proposal" in getattr(model, "iou_types", ())
        detections = "" if proposals_only else f", {work_dir / (tag + 'detections.json')}"
        print(f"wrote {work_dir / (tag + 'metrics.json')}" + detections + segm, flush=True)
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        resolved, kind, checkpoint = resolve(args)
        return launch(eval_worker, resolved.gpus, resolved.device, (resolved, kind, checkpoint))
    except (DataError, CheckpointError, ValueError) as error:
        if os.environ.get("LIBRA_DEBUG"):
            raise
        print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
