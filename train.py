"""Train Libra R-CNN (or any preset of ``libra.presets``) on synthetic shapes, COCO, VOC or LVIS.

    python train.py                       # synthetic shapes from scratch: AP50 ~0.8 in ~8-11 min on 2 CPU cores
    python train.py --gpus 2 --device cpu # the same with 2 CPU processes (DDP over gloo)
    python train.py --dataset coco --data-root /data/coco --gpus 8  # the paper's 1x schedule
    torchrun --nnodes 2 --nproc-per-node 8 ... train.py --dataset coco --data-root /data/coco
    python train.py --dataset coco --data-root /data/coco --gpus 8 --model faster_rcnn_r50_fpn \\
        --sampler iou_balanced --neck bfp                         # a row of the paper's Table 3
    python train.py --model libra_mask_rcnn_r50_fpn               # Libra Mask R-CNN on the synthetic shapes (box + mask AP)
    python train.py --dataset lvis --data-root /data/lvis --gpus 8 --model libra_mask_rcnn_r50_fpn_lvis_bcr
        # paper Sec. 4.2: repeat factor sampling (0.001) and short sides 640, 672, ..., 800 by default

Recipes per dataset and detector live in ``libra.recipes``. COCO (paper Sec. 4.1.2, MMDetection
``schedule_1x.py``): SGD, lr 0.02 for a total batch of 16 images
(scaled linearly: lr = 0.02 x total batch / 16), momentum 0.9, weight decay 1e-4, linear
warmup over 500 iterations from 0.001 x lr, lr x 0.1 after epochs 8 and 11 of 12 (1x) or 16
and 22 of 24 (2x); 2 images per GPU. VOC follows the paper's Sec. 4.5: lr 0.01 per 16
images, short side 600 / long side <= 1000, steps after epoch 9 of 12.

Outputs in ``--work-dir``: ``log.jsonl`` (one JSON object per log line), ``losses.png``,
``config.json``, ``epoch_N.pth`` checkpoints (written atomically; ``iter_N.pth`` when
``--max-iters`` stops inside an epoch) and ``last_checkpoint``, ``detections.json`` /
``metrics.json`` of the final evaluation (and ``segm_detections.json`` for a mask model;
``class_image_counts.json`` for bucketed class re-weighting). A work dir that already holds a run is refused unless
``--resume`` continues it or ``--overwrite`` starts over (removing only the files listed above).

``--resume`` continues exactly (bit-identical weights, also from ``iter_N.pth``: the generator
states are part of every checkpoint); a checkpoint of another model, class list, optimizer,
detector switch or batch layout is refused, naming the difference.

Exit codes: 1 for bad input (missing data, malformed annotations, an unusable checkpoint or
work dir, a work dir in use by another run; a one-line ``error:`` message before anything is
written), 3 when training diverges (non-finite loss, gradient, weights or activations; the message
names what and where), 4 when an output cannot be written (disk full, read-only file system: the
line names the file and the reason, the files written before are intact, and says how to resume),
5 when another process of a multi-process run is gone (killed, or its node lost; the line names the
last checkpoint and how to resume), 130 on Ctrl-C or SIGTERM (the message names the last checkpoint
and the command that resumes).
Set ``LIBRA_DEBUG=1`` for full tracebacks.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch

from libra.data.samplers import REPEAT_ROUNDINGS
from libra.recipes import RECIPE_VERSIONS
from libra.atomic_io import WriteError
from libra.engine.builders import build_eval_loader, build_split, build_train_loader
from libra.engine.checkpoint import (
    CheckpointError,
    atomic_write_text,
    check_model_identity,
    checkpoint_model_config,
    is_libra_checkpoint,
    load_checkpoint_file,
    load_model_state,
    remove_stale_temp_files,
)
from libra.engine.cli import (
    add_data_arguments,
    add_model_arguments,
    apply_recipe,
    build_detector,
    check_proposals_flags,
    data_settings,
    one_line,
    resolve_model_config,
)
from libra.engine.distributed import (
    EXIT_INTERRUPTED,
    EXIT_PEER_LOST,
    DistributedContext,
    StoppedByLauncher,
    apply_slurm_environment,
    interrupt_signal,
    is_peer_failure,
    launch,
    process_label,
    reports_for_node,
    stopped_by_launcher,
    torchrun_environment,
    wait_for_launcher_stop,
)
from libra.engine.evaluator_loop import evaluate_model
from libra.engine.loading import add_trust_argument, init_from_checkpoint, init_model_config
from libra.engine.run_dir import (
    WorkDirError,
    check_resume_settings,
    claim_work_dir,
    clear_previous_run,
    find_resume_checkpoint,
    interrupt_message,
    peer_lost_message,
    resume_hint,
    say,
    write_failure_message,
)
from libra.engine.lr_schedule import WarmupMultiStepLR
from libra.engine.trainer import NonFiniteLossError, SkipBatches, TrainConfig, Trainer, seed_everything

EXIT_BAD_INPUT = 1
EXIT_NON_FINITE = 3
EXIT_WRITE_FAILED = 4


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train Libra R-CNN / Faster R-CNN (libra presets).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = add_data_arguments(parser, dataset_default="synthetic")
    data.add_argument(
        "--multi-scale", action=argparse.BooleanOptionalAction, default=None,
        help="short side drawn from the recipe's range: [640, 800] (paper 4.1.3); LVIS: 640, 672, ..., 800, on by default",
    )
    data.add_argument(
        "--repeat-factor-sampling", action=argparse.BooleanOptionalAction, default=None,
        help="repeat-factor sampling (Gupta et al. 2019; on by default for LVIS, as in the paper's Sec. 4.2)",
    )
    data.add_argument("--repeat-threshold", type=float, default=None, help="repeat-factor threshold t (recipe: 0.001)")
    data.add_argument(
        "--repeat-rounding", choices=REPEAT_ROUNDINGS, default=None,
        help="copies of an image per epoch: ceil = ceil(r), MMDetection's ClassBalancedDataset (recipe default); "
        "stochastic = floor(r) + Bernoulli(r - floor(r)), the LVIS paper",
    )
    data.add_argument("--workers", type=int, default=None, help="data-loader processes per GPU")
    data.add_argument(
        "--val-proposals-file", default=None, metavar="FILE",
        help="pre-computed proposals of the evaluation split (Fast R-CNN presets; eval.py --save-proposals)",
    )

    model = add_model_arguments(parser, model_default="libra_faster_rcnn_r50_fpn")
    model.add_argument("--pretrained", default=None, help="torchvision ImageNet ResNet weights (.pth)")
    model.add_argument(
        "--init-from", default=None, metavar="CKPT",
        help="fine-tune: start from the weights of a libra or MMDetection detector checkpoint (every tensor "
        "whose shape fits; the class-specific layers are re-initialised when the class count differs); "
        "no optimizer, epoch or RNG state (that is --resume)",
    )

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
    sched.add_argument("--warmup-ratio", type=float, default=None, help="warmup start factor (recipe: 0.001; v1: 1/3)")
    sched.add_argument("--grad-clip", type=float, default=None, help="max gradient norm (0: none, the v2 recipe; v1: 35)")
    sched.add_argument(
        "--recipe", choices=tuple(RECIPE_VERSIONS), default="v2",
        help="v1: MMDetection v1's libra_fast_rcnn_r50_fpn_1x recipe of the paper's ablations (Tables 3-7) on top "
        "of the dataset's: grad clip 35, warmup ratio 1/3, RoIAlign sampling ratio 2, R-CNN low-quality matches",
    )
    sched.add_argument("--batch-size", type=int, default=None, help="images per GPU / process")
    sched.add_argument("--max-iters", type=int, default=None, help="stop after this many iterations (tests, benchmarks)")
    sched.add_argument("--amp", action="store_true", help="mixed precision (fp16 + GradScaler on CUDA, bf16 on CPU)")
    sched.add_argument("--seed", type=int, default=0)

    run = parser.add_argument_group("run")
    run.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    run.add_argument("--gpus", type=int, default=1, help="processes on this machine (DDP; gloo with --device cpu)")
    run.add_argument("--work-dir", default=None, help="default work_dirs/<model>_<dataset>")
    run.add_argument("--resume", nargs="?", const="auto", default=None, help="checkpoint to resume (no value: the last in --work-dir)")
    run.add_argument(
        "--overwrite", action="store_true",
        help="start over in a --work-dir that holds a run: removes its config.json, log.jsonl, losses.png, "
        "metrics.json, per_class.json, detections.json, segm_detections.json, last_checkpoint, epoch_N.pth / iter_N.pth (nothing else)",
    )
    run.add_argument("--eval-interval", type=int, default=0, help="evaluate every N epochs (0: only at the end)")
    run.add_argument("--no-eval", action="store_true", help="skip evaluation")
    run.add_argument("--log-interval", type=int, default=None)
    run.add_argument("--checkpoint-interval", type=int, default=1, help="epochs between checkpoints")
    run.add_argument("--keep-checkpoints", type=int, default=None, help="keep the newest K epoch checkpoints (0: all)")
    run.add_argument("--threads", type=int, default=None, help="CPU threads per process (default: cores / processes)")
    run.add_argument("--tensorboard", action="store_true", help="also log to TensorBoard in --work-dir/tensorboard (pip install tensorboard)")
    add_trust_argument(run)  # --trust-checkpoint: for --resume / --pretrained files beyond weights_only
    return parser


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the recipe defaults (``libra.recipes``) and derived values (lr, steps, work dir) into ``args``."""
    base = None
    if getattr(args, "pretrained", None) and not Path(args.pretrained).is_file():
        raise ValueError(f"--pretrained {args.pretrained}: no such file (torchvision ImageNet ResNet weights, .pth)")
    if getattr(args, "init_from", None) and not Path(args.init_from).exists():
        raise ValueError(f"--init-from {args.init_from}: no such checkpoint file or work dir")
    if getattr(args, "init_from", None):
        if args.resume:
            raise ValueError("--init-from starts a new run from a checkpoint's weights and --resume continues a run: pass one")
        base = init_model_config(args.init_from, args.model, trust=args.trust_checkpoint)
    defaults = apply_recipe(args, base)
    if getattr(args, "tensorboard", False):
        from libra.analysis.tensorboard import require_tensorboard

        require_tensorboard()  # ValueError with the pip command, before anything is read or written
    check_proposals_flags(args, [("proposals_file", "--proposals-file")] + (
        [] if args.no_eval else [("val_proposals_file", "--val-proposals-file")]
    ))
    for key in ("warmup_iters", "warmup_ratio", "batch_size", "workers", "log_interval", "grad_clip", "optimizer",
                "keep_checkpoints"):
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
    for key in ("multi_scale", "repeat_factor_sampling", "repeat_threshold", "repeat_rounding"):  # LVIS: on by default
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    args.multi_scale_range = tuple(defaults["multi_scale_range"]) if args.multi_scale else None
    args.multi_scale_step = int(defaults["multi_scale_step"]) if args.multi_scale else 1
    if args.work_dir is None:
        args.work_dir = str(Path("work_dirs") / f"{args.model}_{args.dataset}")
    if args.max_iters is None:
        args.max_iters = 1 << 62
    return args


def train_worker(ctx: DistributedContext, args: argparse.Namespace) -> int:
    """Everything one process does; returns the exit code."""
    holder: dict = {}
    try:
        return _train(ctx, args, holder)
    except StoppedByLauncher:
        return EXIT_BAD_INPUT  # another process failed and reported it
    except KeyboardInterrupt as error:  # Ctrl-C, or SIGTERM (libra.engine.distributed.interrupt_handlers)
        if os.environ.get("LIBRA_DEBUG"):
            raise
        _cleanup(ctx, args)
        if reports_for_node(ctx):  # rank 0, and the first process of every other node (torchrun)
            print(f"error: {process_label(ctx)}{interrupt_message(args, holder.get('trainer'), error)}",
                  file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except WriteError as error:  # disk full, read-only file system, ...: the files written before are intact
        if interrupt_signal() is not None or stopped_by_launcher():
            return _after_interrupt(ctx, args, holder, error)
        if os.environ.get("LIBRA_DEBUG"):
            raise
        _cleanup(ctx, args)
        print(f"error: {'' if ctx.is_main else f'(process {ctx.rank}) '}"
              f"{write_failure_message(args, holder.get('trainer'), error)}", file=sys.stderr, flush=True)
        return EXIT_WRITE_FAILED
    except (ValueError, FileNotFoundError) as error:
        # DataError / CheckpointError (bad data or checkpoint) and the ValueErrors by which libra's
        # modules reject bad settings (e.g. an unknown preset override): one line, exit code 1.
        if interrupt_signal() is not None or stopped_by_launcher():
            return _after_interrupt(ctx, args, holder, error)
        if os.environ.get("LIBRA_DEBUG"):
            raise
        if ctx.is_main:
            print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except NonFiniteLossError as error:
        if os.environ.get("LIBRA_DEBUG"):
            raise
        _cleanup(ctx, args)
        if ctx.is_main or error.rank_local:
            prefix = f"(process {ctx.rank}) " if ctx.distributed and error.rank_local else ""
            print(f"error: {prefix}{one_line(error)}", file=sys.stderr, flush=True)
        return EXIT_NON_FINITE
    except Exception as error:
        # An error raised while an interrupt is being handled (e.g. a collective whose peer has gone)
        # belongs to the interrupt; anything else is a bug and keeps its traceback.
        if interrupt_signal() is not None or stopped_by_launcher():
            return _after_interrupt(ctx, args, holder, error)
        if ctx.distributed and is_peer_failure(error):
            # Another process failed (and reports why); the launcher is about to stop this one.
            if wait_for_launcher_stop(10.0) or interrupt_signal() is not None:
                return EXIT_BAD_INPUT
            if os.environ.get("LIBRA_DEBUG"):
                raise
            _cleanup(ctx, args)
            if reports_for_node(ctx):
                print(f"error: {process_label(ctx) or '(process 0) '}{peer_lost_message(args, holder.get('trainer'), error)}",
                      file=sys.stderr, flush=True)
            return EXIT_PEER_LOST
        raise


def _after_interrupt(ctx: DistributedContext, args: argparse.Namespace, holder: dict, error: BaseException) -> int:
    if stopped_by_launcher():
        return EXIT_BAD_INPUT
    if os.environ.get("LIBRA_DEBUG"):
        raise error
    _cleanup(ctx, args)
    if reports_for_node(ctx):
        print(f"error: {process_label(ctx)}{interrupt_message(args, holder.get('trainer'), error)}",
              file=sys.stderr, flush=True)
    return EXIT_INTERRUPTED


def _cleanup(ctx: DistributedContext, args: argparse.Namespace) -> None:
    """Failure paths: remove temporary files of interrupted writes (rank 0 writes the work dir)."""
    if ctx.is_main:
        try:
            remove_stale_temp_files(Path(args.work_dir))
        except OSError:
            pass


def _train(ctx: DistributedContext, args: argparse.Namespace, holder: dict | None = None) -> int:
    holder = holder if holder is not None else {}
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, ctx.world_size if ctx.device.type == "cpu" else 1))
    if ctx.device.type == "cpu":
        torch.set_num_threads(threads)
    seed_everything(args.seed + ctx.rank)

    # 1. Everything that can fail because of the input, before anything is written.
    settings = data_settings(args)
    if ctx.is_main or args.dataset != "synthetic":
        train_set = build_split(settings, train=True, proposals_file=args.proposals_file)
    if ctx.distributed and args.dataset == "synthetic":
        torch.distributed.barrier()  # rank 0 generated the synthetic files; the others read them now
        if not ctx.is_main:
            train_set = build_split(settings, train=True, proposals_file=args.proposals_file)
    val_set = None if args.no_eval else build_split(settings, train=False, proposals_file=args.val_proposals_file)
    class_names = tuple(getattr(train_set, "class_names", ()) or ()) or None
    checkpoint = None
    if args.resume:
        path = find_resume_checkpoint(args)
        checkpoint = load_checkpoint_file(path, map_location="cpu", trust=args.trust_checkpoint)
        if not is_libra_checkpoint(checkpoint):
            raise CheckpointError(f"{path} is not a libra training checkpoint (use eval.py for MMDetection checkpoints)")
        check_model_identity(checkpoint, args.model, train_set.num_classes, path, class_names=class_names)
        # The model continues as the checkpoint built it; a flag or --set given now must agree with it.
        args.model_config = resolve_model_config(args, {}, base=checkpoint_model_config(checkpoint, path))
        notes = check_resume_settings(checkpoint, args, path)
    model = build_detector(args, train_set.num_classes, train_set=train_set)
    if checkpoint is not None:
        load_model_state(model, checkpoint["model"], path)
    elif args.init_from:
        say(ctx, init_from_checkpoint(model, args.init_from, trust=args.trust_checkpoint))
    model = model.to(ctx.device)

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
        train_set, args.batch_size, args.workers, ctx.rank, ctx.world_size, args.seed, args.repeat_factor_sampling,
        args.repeat_threshold, args.repeat_rounding,
    )
    iters_per_epoch = len(batch_sampler)
    if checkpoint is not None and int(checkpoint.get("iter_in_epoch", 0)) > 0:
        saved_iters = checkpoint.get("iters_per_epoch")
        if saved_iters is not None and int(saved_iters) != iters_per_epoch:
            raise CheckpointError(
                f"{path} was written inside an epoch of {saved_iters} iterations but an epoch of this run has "
                f"{iters_per_epoch} (other data?): resume with the checkpoint's data, or from an epoch_N.pth checkpoint"
            )

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
        class_names=class_names,
        model_config=args.model_config,
        label_to_cat_id=tuple(int(c) for c in train_set.label_to_cat_id),
        args={
            k: v
            for k, v in vars(args).items()
            if isinstance(v, (int, float, str, bool, list, tuple, dict, type(None))) and k not in ("argv", "script", "dataset_default")
        },
    )
    trainer = Trainer(
        model, optimizer, scheduler, scaler, make_loader, ctx, config,
        evaluate=None if val_set is None else evaluate,
        print_fn=lambda line: print(line, flush=True),
    )
    if checkpoint is not None:
        trainer.load_state(checkpoint, path)
        say(ctx, f"resuming from {path}: epoch {checkpoint['epoch']}, iteration {checkpoint['iteration']}")
        if not trainer.resumes_exactly:
            notes.append("the checkpoint was written inside an epoch without generator states (older libra): "
                         "the continuation is not bit-identical")
        if notes:
            say(ctx, "note: " + "; ".join(notes))
        del checkpoint
    holder["trainer"] = trainer
    if args.tensorboard and trainer.log is not None:
        from libra.analysis.tensorboard import TensorBoardLog

        trainer.log = TensorBoardLog(trainer.log, work_dir / "tensorboard")  # log.jsonl records also as scalars

    # 3. From here on the work dir is written (rank 0 only).
    if ctx.is_main:
        try:
            if args.overwrite:
                removed = clear_previous_run(work_dir)
                if removed:
                    say(ctx, f"--overwrite: removed {len(removed)} files of the previous run in {work_dir}")
            work_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temp_files(work_dir)  # left by a killed run (never by a clean failure)
            config_text = json.dumps(config.args, indent=2, sort_keys=True, default=str) + "\n"
            atomic_write_text(config_text, work_dir / "config.json")
        except OSError as error:
            raise WorkDirError(f"cannot write to --work-dir {work_dir}: {error.strerror or error}") from None
        say(
            ctx,
            f"{args.dataset}: {len(train_set)} training images, {train_set.num_classes} classes; "
            f"batch {args.batch_size} x {ctx.world_size} processes, lr {args.lr:g}, steps after epochs "
            f"{list(args.lr_steps)} of {args.epochs}; work dir {work_dir}",
        )
    metrics = trainer.train()
    if ctx.is_main and metrics:
        # Percent, as the tables above; metrics.json holds the same values as fractions of 1.
        say(ctx, "final (%): " + "  ".join(f"{k} {100 * v:.2f}" if v >= 0 else f"{k} n/a" for k, v in metrics.items()))
    return 0


def signal_name(signum: int) -> str:
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


def _report_killed_worker(args: argparse.Namespace, index: int, signal_name: str) -> None:
    """``--gpus N``: a worker killed by a signal could not say so itself; the launcher says it (exit 5)."""
    print(f"error: process {index} of the run was killed by {signal_name} (kill -9, or the out-of-memory killer: it "
          f"could leave no message); the other processes were stopped; {resume_hint(args, None)}",
          file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    try:
        parsed = build_parser().parse_args(raw)
        under_srun = apply_slurm_environment()  # srun: one task per process, as under torchrun
        if under_srun and parsed.gpus > 1:
            raise ValueError(
                f"--gpus {parsed.gpus} under srun: every SLURM task is one process; ask srun for one task per GPU "
                "(--ntasks-per-node=GPUS) and leave --gpus at 1"
            )
        if parsed.gpus > 1 and parsed.device is None and not torch.cuda.is_available() and not torchrun_environment():
            raise ValueError(
                f"--gpus {parsed.gpus} asks for {parsed.gpus} processes but no CUDA GPU is visible: pass --device cpu "
                f"to train with {parsed.gpus} CPU processes (each holds a whole model and its data; about "
                f"{parsed.gpus} x the memory of one run), or leave out --gpus"
            )
        args = resolve_args(parsed)
    except ValueError as error:  # a bad --model / --set value, before anything is read or written
        if os.environ.get("LIBRA_DEBUG"):
            raise
        print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    args.argv = raw
    args.script = sys.argv[0] if argv is None and sys.argv and sys.argv[0].endswith(".py") else "train.py"
    if args.gpus < 1:
        print("error: --gpus must be >= 1", file=sys.stderr)
        return EXIT_BAD_INPUT
    lock = None
    try:
        if not torchrun_environment() or int(os.environ.get("RANK", "0")) == 0:
            # Rank 0 writes the work dir: its exclusive lock first (a second run into it is refused at
            # once), then the check for another run's files; held until this process exits.
            lock = claim_work_dir(args)
        return launch(train_worker, args.gpus, args.device, args, interrupts=True,
                      on_killed=lambda index, name: _report_killed_worker(args, index, name))
    except (ValueError, CheckpointError) as error:  # raised before any process started
        if os.environ.get("LIBRA_DEBUG"):
            raise
        print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as error:  # outside the workers' own handling (e.g. while spawning them)
        if os.environ.get("LIBRA_DEBUG"):
            raise
        what = signal_name(getattr(error, "signum", None) or signal.SIGINT)
        print(f"error: interrupted ({what}); {resume_hint(args, None)}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception as error:
        # Under torchrun: joining the process group failed because another node (the store's) is gone
        # or unreachable. Anything else is a bug and keeps its traceback.
        if not (torchrun_environment() and is_peer_failure(error)) or os.environ.get("LIBRA_DEBUG"):
            raise
        rank = os.environ.get("RANK", "?")
        print(f"error: (process {rank}) cannot reach the other processes of the run ({one_line(error)[:160]}): "
              "check that every node runs and can reach the rendezvous endpoint; " + resume_hint(args, None),
              file=sys.stderr, flush=True)
        return EXIT_PEER_LOST
    finally:
        if lock is not None:
            lock.release()


if __name__ == "__main__":
    sys.exit(main())
