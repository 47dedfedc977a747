"""Train Libra R-CNN (or any preset of ``libra.presets``) on synthetic shapes, COCO, VOC or LVIS.

    python train.py                       # synthetic shapes from scratch: AP50 ~0.8 in ~8-11 min on 2 CPU cores
    python train.py --gpus 2 --device cpu # the same with 2 CPU processes (DDP over gloo)
    python train.py --dataset coco --data-root /data/coco --gpus 8  # the paper's 1x schedule
    torchrun --nnodes 2 --nproc-per-node 8 ... train.py --dataset coco --data-root /data/coco
    python train.py --dataset coco --data-root /data/coco --gpus 8 --model faster_rcnn_r50_fpn \\
        --sampler iou_balanced --neck bfp                         # a row of the paper's Table 3

Recipes per dataset and detector live in ``libra.recipes``. COCO (paper Sec. 4.1.2, MMDetection
``schedule_1x.py``): SGD, lr 0.02 for a total batch of 16 images
(scaled linearly: lr = 0.02 x total batch / 16), momentum 0.9, weight decay 1e-4, linear
warmup over 500 iterations from 0.001 x lr, lr x 0.1 after epochs 8 and 11 of 12 (1x) or 16
and 22 of 24 (2x); 2 images per GPU. VOC follows the paper's Sec. 4.5: lr 0.01 per 16
images, short side 600 / long side <= 1000, steps after epoch 9 of 12.

Outputs in ``--work-dir``: ``log.jsonl`` (one JSON object per log line), ``losses.png``,
``config.json``, ``epoch_N.pth`` checkpoints (written atomically) and ``last_checkpoint``,
``detections.json`` / ``metrics.json`` of the final evaluation.

Errors caused by the input (missing data, malformed annotations, a checkpoint of another
model) end with a one-line message and exit code 1 before anything is written; a
non-finite loss stops training with exit code 3. Set ``LIBRA_DEBUG=1`` for full tracebacks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from libra.engine.builders import DataError, build_dataset, build_eval_loader, build_train_loader
from libra.engine.checkpoint import (
    CheckpointError,
    atomic_write_text,
    check_model_identity,
    is_libra_checkpoint,
    load_checkpoint_file,
    load_model_state,
)
from libra.engine.cli import add_data_arguments, add_model_arguments, apply_recipe, build_detector, data_settings, one_line
from libra.engine.distributed import DistributedContext, launch
from libra.engine.evaluator_loop import evaluate_model
from libra.engine.lr_schedule import WarmupMultiStepLR
from libra.engine.trainer import NonFiniteLossError, SkipBatches, TrainConfig, Trainer, seed_everything

EXIT_BAD_INPUT = 1
EXIT_NON_FINITE = 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train Libra R-CNN / Faster R-CNN (libra presets).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = add_data_arguments(parser, dataset_default="synthetic")
    data.add_argument("--multi-scale", action="store_true", help="short side drawn from [640, 800] (paper 4.1.3)")
    data.add_argument("--repeat-factor-sampling", action="store_true", help="LVIS repeat-factor sampling (thr 0.001)")
    data.add_argument("--workers", type=int, default=None, help="data-loader processes per GPU")

    model = add_model_arguments(parser, model_default="libra_faster_rcnn_r50_fpn")
    model.add_argument("--pretrained", default=None, help="torchvision ImageNet ResNet weights (.pth)")

    sched = parser.add_argument_group("schedule")
    sched.add_argument("--schedule", choices=("1x", "2x"), default="1x")
    sched.add_argument("--epochs", type=int, default=None, help="overrides the schedule's epochs (steps scale along)")
    sched.add_argument("--lr-steps", type=int, nargs="*", default=None, help="epochs after which lr x 0.1")
    sched.add_argument("--lr", type=float, default=None, help="base lr (default 0.02 x total batch / 16)")
    sched.add_argument(
        "--optimizer", choices=("sgd", "adamw"), default=None,
        help="sgd (the paper's); adamw learns faster from scratch (synthetic default)",
    )
    sched.add_argument("--momentum", type=float, default=0.9)
    sched.add_argument("--weight-decay", type=float, default=1e-4)
    sched.add_argument("--warmup-iters", type=int, default=None)
    sched.add_argument("--warmup-ratio", type=float, default=0.001)
    sched.add_argument("--grad-clip", type=float, default=None, help="max gradient norm (0: none, the paper's recipe)")
    sched.add_argument("--batch-size", type=int, default=None, help="images per GPU / process")
    sched.add_argument("--max-iters", type=int, default=None, help="stop after this many iterations (tests, benchmarks)")
    sched.add_argument("--amp", action="store_true", help="mixed precision (fp16 + GradScaler on CUDA, bf16 on CPU)")
    sched.add_argument("--seed", type=int, default=0)

    run = parser.add_argument_group("run")
    run.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    run.add_argument("--gpus", type=int, default=1, help="processes on this machine (DDP; gloo with --device cpu)")
    run.add_argument("--work-dir", default=None, help="default work_dirs/<model>_<dataset>")
    run.add_argument("--resume", nargs="?", const="auto", default=None, help="checkpoint to resume (no value: the last in --work-dir)")
    run.add_argument("--eval-interval", type=int, default=0, help="evaluate every N epochs (0: only at the end)")
    run.add_argument("--no-eval", action="store_true", help="skip evaluation")
    run.add_argument("--log-interval", type=int, default=None)
    run.add_argument("--checkpoint-interval", type=int, default=1, help="epochs between checkpoints")
    run.add_argument("--keep-checkpoints", type=int, default=None, help="keep the newest K epoch checkpoints (0: all)")
    run.add_argument("--threads", type=int, default=None, help="CPU threads per process (default: cores / processes)")
    return parser


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the recipe defaults (``libra.recipes``) and derived values (lr, steps, work dir) into ``args``."""
    defaults = apply_recipe(args)
    for key in ("warmup_iters", "batch_size", "workers", "log_interval", "grad_clip", "optimizer", "keep_checkpoints"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    world_size = int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else max(1, args.gpus)
    args.world_size = world_size
    args.total_batch = args.batch_size * world_size
    if args.lr is None:
        per16 = defaults["lr_per_16_images"]
        args.lr = defaults["lr"] if per16 is None else per16 * args.total_batch / 16
    epochs, steps = defaults["schedules"][args.schedule]
    if args.epochs is not None and args.epochs != epochs:
        # Keep the steps at the same fraction of the schedule (8/12 and 11/12 for 1x).
        steps = tuple(max(1, round(s * args.epochs / epochs)) for s in steps)
        epochs = args.epochs
    args.epochs = epochs
    args.lr_steps = tuple(args.lr_steps) if args.lr_steps is not None else tuple(steps)
    args.multi_scale_range = tuple(defaults["multi_scale_range"]) if args.multi_scale else None
    if args.work_dir is None:
        args.work_dir = str(Path("work_dirs") / f"{args.model}_{args.dataset}")
    if args.max_iters is None:
        args.max_iters = 1 << 62
    return args


def find_resume_checkpoint(args: argparse.Namespace) -> Path:
    if args.resume != "auto":
        return Path(args.resume)
    pointer = Path(args.work_dir) / "last_checkpoint"
    if not pointer.is_file():
        raise CheckpointError(f"--resume without a path needs {pointer} (no checkpoint in {args.work_dir} yet)")
    return Path(args.work_dir) / pointer.read_text().strip()


def say(ctx: DistributedContext | None, message: str) -> None:
    if ctx is None or ctx.is_main:
        print(message, flush=True)


def train_worker(ctx: DistributedContext, args: argparse.Namespace) -> int:
    """Everything one process does; returns the exit code."""
    try:
        return _train(ctx, args)
    except (ValueError, FileNotFoundError) as error:
        # DataError / CheckpointError (bad data or checkpoint) and the ValueErrors by which libra's
        # modules reject bad settings (e.g. an unknown preset override): one line, exit code 1.
        if os.environ.get("LIBRA_DEBUG"):
            raise
        if ctx.is_main:
            print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except NonFiniteLossError as error:
        if ctx.is_main:
            print(f"error: {error}", file=sys.stderr, flush=True)
        return EXIT_NON_FINITE


def _train(ctx: DistributedContext, args: argparse.Namespace) -> int:
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, ctx.world_size if ctx.device.type == "cpu" else 1))
    if ctx.device.type == "cpu":
        torch.set_num_threads(threads)
    seed_everything(args.seed + ctx.rank)

    # 1. Everything that can fail because of the input, before anything is written.
    settings = data_settings(args)
    if ctx.is_main or args.dataset != "synthetic":
        train_set = build_dataset(settings, train=True)
    if ctx.distributed and args.dataset == "synthetic":
        torch.distributed.barrier()  # rank 0 generated the synthetic files; the others read them now
        if not ctx.is_main:
            train_set = build_dataset(settings, train=True)
    val_set = None if args.no_eval else build_dataset(settings, train=False)
    model = build_detector(args, train_set.num_classes).to(ctx.device)
    checkpoint = None
    if args.resume:
        path = find_resume_checkpoint(args)
        checkpoint = load_checkpoint_file(path, map_location="cpu")
        if not is_libra_checkpoint(checkpoint):
            raise CheckpointError(f"{path} is not a libra training checkpoint (use eval.py for MMDetection checkpoints)")
        check_model_identity(checkpoint, args.model, train_set.num_classes, path)
        load_model_state(model, checkpoint["model"], path)
        say(ctx, f"resuming from {path}: epoch {checkpoint['epoch']}, iteration {checkpoint['iteration']}")

    # 2. Training objects.
    if ctx.distributed:
        ddp_kwargs = {"device_ids": [ctx.device.index]} if ctx.device.type == "cuda" else {}
        model = torch.nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    scheduler = WarmupMultiStepLR(optimizer, args.lr_steps, 0.1, args.warmup_iters, args.warmup_ratio)
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp and ctx.device.type == "cuda")
    loader, batch_sampler = build_train_loader(
        train_set, args.batch_size, args.workers, ctx.rank, ctx.world_size, args.seed, args.repeat_factor_sampling
    )
    iters_per_epoch = len(batch_sampler)

    def make_loader(epoch: int, skip: int):
        batch_sampler.set_epoch(epoch)
        if skip == 0:
            return loader
        return torch.utils.data.DataLoader(
            train_set,
            batch_sampler=SkipBatches(batch_sampler, skip),
            collate_fn=loader.collate_fn,
            num_workers=args.workers,
        )

    work_dir = Path(args.work_dir)
    val_loader = None
    if val_set is not None:
        val_loader = build_eval_loader(val_set, 1, min(args.workers, 2), ctx.rank, ctx.world_size)

    def evaluate(model_: torch.nn.Module, epoch: int) -> dict:
        say(ctx, f"evaluating on {len(val_set)} images after epoch {epoch}")
        return evaluate_model(model_, val_set, val_loader, ctx, work_dir=work_dir, amp=args.amp, progress=False)

    config = TrainConfig(
        num_epochs=args.epochs,
        max_iters=args.max_iters,
        iters_per_epoch=iters_per_epoch,
        log_interval=args.log_interval,
        eval_interval=args.eval_interval,
        checkpoint_interval=args.checkpoint_interval,
        keep_checkpoints=args.keep_checkpoints,
        seed=args.seed,
        amp=args.amp,
        grad_clip=args.grad_clip,
        work_dir=work_dir,
        model_name=args.model,
        num_classes=train_set.num_classes,
        args={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, tuple, dict, type(None)))},
    )
    trainer = Trainer(
        model, optimizer, scheduler, scaler, make_loader, ctx, config,
        evaluate=None if val_set is None else evaluate,
        print_fn=lambda line: print(line, flush=True),
    )
    if checkpoint is not None:
        trainer.load_state(checkpoint)
        del checkpoint

    # 3. From here on the work dir is written (rank 0 only).
    if ctx.is_main:
        work_dir.mkdir(parents=True, exist_ok=True)
        config_text = json.dumps(config.args, indent=2, sort_keys=True, default=str) + "\n"
        atomic_write_text(config_text, work_dir / "config.json")
        say(
            ctx,
            f"{args.dataset}: {len(train_set)} training images, {train_set.num_classes} classes; "
            f"batch {args.batch_size} x {ctx.world_size} processes, lr {args.lr:g}, steps after epochs "
            f"{list(args.lr_steps)} of {args.epochs}; work dir {work_dir}",
        )
    metrics = trainer.train()
    if ctx.is_main and metrics:
        say(ctx, "final: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = resolve_args(build_parser().parse_args(argv))
    if args.gpus < 1:
        print("error: --gpus must be >= 1", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return launch(train_worker, args.gpus, args.device, args)
    except (ValueError, CheckpointError) as error:  # raised before any process started
        if os.environ.get("LIBRA_DEBUG"):
            raise
        print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
