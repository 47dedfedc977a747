"""Count the host synchronisations of one training iteration of ``train.py``'s default job.

    python tests/gpu/count_syncs.py --device cuda --iters 5 --json syncs.json
    python tests/gpu/count_syncs.py --device cpu --iters 1 --warmup 1      # runs; counts need CUDA

The model, data, optimizer, lr schedule and AMP scaler are built exactly as ``train.py`` builds
them for the given flags (default: the synthetic Libra R-CNN job), and libra's own
:class:`~libra.engine.trainer.Trainer` runs ``--warmup`` + ``--iters`` iterations of its
``train_one_epoch`` with logging pushed past the end (no log line, no checkpoint, no evaluation).
Each synchronizing CUDA call of the measured iterations is recorded with
``torch.cuda.set_sync_debug_mode("warn")`` (``tests/gpu/sync_debug.py``) and attributed to its
source line, and grouped:

- ``timing``: ``Timer.lap`` (``torch.cuda.synchronize`` twice per iteration, for the ``time`` and
  ``data_time`` of the log line);
- ``logging``: anything called from the log line's code in ``libra/engine/metric_logger.py``;
- ``work``: everything else (target validation, NMS output sizes, RoI level counts, the loss values
  read for the divergence check, gradient checks, clipping, ...).

``syncs_per_iter`` counts all of them, ``syncs_per_iter_outside_logging`` drops ``timing`` and
``logging``. With ``--profile`` a second run of the same iterations under ``torch.profiler`` counts
the CUDA runtime's synchronising calls (``cudaStreamSynchronize``, ``cudaDeviceSynchronize``,
``cudaEventSynchronize``) and device-to-host copies, as a cross-check that needs no debug mode.
On the CPU the iterations run (a dry run of the same code) and the counts are null.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

import train  # noqa: E402  (train.py: its parser and recipe resolution)
from libra.engine.builders import build_split, build_train_loader  # noqa: E402
from libra.engine.cli import build_detector, data_settings  # noqa: E402
from libra.engine.distributed import DistributedContext  # noqa: E402
from libra.engine.lr_schedule import WarmupMultiStepLR  # noqa: E402
from libra.engine.trainer import TrainConfig, Trainer  # noqa: E402
from sync_debug import SyncEvent, SyncRecorder  # noqa: E402

LOGGING_FUNCTIONS = {"format_line", "summary", "write", "plot_losses", "max_memory_mb", "update"}


def classify(event: SyncEvent) -> str:
    """``timing`` / ``logging`` / ``work`` (module docstring)."""
    frames = [event.site + " " + event.function, *event.via]
    for frame in frames:
        if "libra/engine/metric_logger.py" in frame:
            function = frame.rsplit(" ", 1)[-1]
            return "timing" if function in ("now", "lap", "__init__") else "logging"
    return "work"


class CountingLoader:
    """Wraps a loader; ``iteration`` is the index of the batch last handed out (-1 before the first)."""

    def __init__(self, loader) -> None:
        self.loader = loader
        self.iteration = -1
        self.on_batch = lambda: None

    def __iter__(self):
        for batch in self.loader:
            self.on_batch()  # the previous iteration ends here
            self.iteration += 1
            yield batch


def build_job(argv: list[str]):
    """Model, optimizer, scheduler, scaler, loader and context exactly as ``train.py`` builds them."""
    args = train.resolve_args(train.build_parser().parse_args(argv))
    device = torch.device(args.device)
    train.seed_everything(args.seed)
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    train_set = build_split(data_settings(args), train=True)
    model = build_detector(args, train_set.num_classes).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    scheduler = WarmupMultiStepLR(optimizer, args.lr_steps, 0.1, args.warmup_iters, args.warmup_ratio)
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp and device.type == "cuda")
    loader, batch_sampler = build_train_loader(train_set, args.batch_size, args.workers, 0, 1, args.seed)
    ctx = DistributedContext(rank=0, world_size=1, local_rank=0, device=device)
    return args, model, optimizer, scheduler, scaler, loader, len(batch_sampler), ctx, train_set.num_classes


def run_iterations(args, model, optimizer, scheduler, scaler, loader, iters_per_epoch, ctx, num_classes, total, recorder=None):
    """``total`` iterations of ``Trainer.train_one_epoch``; logging is pushed past the end."""
    counting = CountingLoader(loader)
    config = TrainConfig(
        num_epochs=1, max_iters=total, iters_per_epoch=iters_per_epoch, log_interval=10**9,
        seed=args.seed, amp=args.amp, grad_clip=args.grad_clip, work_dir=None, model_name=args.model,
        num_classes=num_classes,
    )
    trainer = Trainer(model, optimizer, scheduler, scaler, lambda epoch, skip: counting, ctx, config, print_fn=lambda line: None)
    if recorder is not None:
        recorder.tag = lambda: counting.iteration
        counting.on_batch = recorder.flush_cpp
    trainer.train_one_epoch(counting, 0)
    return trainer.iteration


def profile_counts(run, iters: int) -> dict:
    """Synchronising CUDA runtime calls and device-to-host copies per iteration, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
    counts: dict[str, int] = {}
    for event in prof.events():
        name = event.name
        if "Synchronize" in name or "DtoH" in name or "Device -> Pageable" in name or "Device -> Pinned" in name:
            counts[name] = counts.get(name, 0) + 1
    return {name: round(count / iters, 2) for name, count in sorted(counts.items())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=5, help="measured iterations")
    parser.add_argument("--warmup", type=int, default=2, help="iterations before (lazy initialisation, allocator)")
    parser.add_argument("--data-root", default=None, help="synthetic data folder (default: a temporary one)")
    parser.add_argument("--profile", action="store_true", help="also count with torch.profiler (CUDA only)")
    parser.add_argument("--json", default=None, help="write the result here")
    parser.add_argument("--train-args", default="", help="extra train.py flags, e.g. '--model faster_rcnn_r50_fpn --amp'")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 1

    total = args.warmup + args.iters
    with tempfile.TemporaryDirectory(prefix="libra_syncs_") as tmp:
        root = args.data_root or str(Path(tmp) / "data")
        # Enough images for warmup + iters batches of the recipe's batch (4) twice over.
        extra = args.train_args.split()
        train_argv = [
            "--device", args.device, "--data-root", root, "--work-dir", str(Path(tmp) / "work"), "--no-eval",
            "--synthetic-num-train", str(max(16, 8 * total)), "--synthetic-num-val", "1", "--workers", "0",
            "--check-images", "none", *extra,
        ]
        started = time.perf_counter()
        job = build_job(train_argv)
        job_args = job[0]
        print(f"{job_args.model} on {device}: {total} iterations ({args.warmup} warm-up), batch {job_args.batch_size}, "
              f"amp {job_args.amp}, validate_targets {getattr(job[1], 'validate_targets', None)}", flush=True)
        recorder = SyncRecorder(device)
        with recorder:
            done = run_iterations(*job, total=total, recorder=recorder)
        elapsed = time.perf_counter() - started
        result: dict = {
            "model": job_args.model,
            "device": str(device),
            "train_args": train_argv,
            "iterations": done,
            "warmup": args.warmup,
            "measured_iters": max(0, done - args.warmup),
            "seconds": round(elapsed, 2),
            "available": recorder.available,
        }
        measured = [e for e in recorder.events if isinstance(e.tag, int) and e.tag >= args.warmup]
        iters = max(1, done - args.warmup)
        if recorder.available:
            groups: dict[str, int] = {"work": 0, "timing": 0, "logging": 0}
            sites: dict[str, dict] = {}
            for event in measured:
                group = classify(event)
                groups[group] += 1
                entry = sites.setdefault(
                    event.site, {"site": event.site, "function": event.function, "code": event.code, "op": event.op,
                                 "via": event.via, "group": group, "count": 0}
                )
                entry["count"] += 1
            for entry in sites.values():
                entry["per_iter"] = round(entry.pop("count") / iters, 2)
            result.update(
                syncs_per_iter=round(len(measured) / iters, 2),
                syncs_per_iter_outside_logging=round(groups["work"] / iters, 2),
                groups_per_iter={k: round(v / iters, 2) for k, v in groups.items()},
                sites=sorted(sites.values(), key=lambda s: (-s["per_iter"], s["site"])),
                setup_syncs=len(recorder.events) - len(measured),
            )
        else:
            result.update(syncs_per_iter=None, syncs_per_iter_outside_logging=None, groups_per_iter=None, sites=[],
                          note="sync debug mode needs a CUDA device: the iterations ran, nothing was counted")
        if args.profile and device.type == "cuda":
            try:
                job = build_job(train_argv)
                result["profiler_per_iter"] = profile_counts(lambda: run_iterations(*job, total=args.iters), args.iters)
            except Exception as error:  # noqa: BLE001 - a cross-check; report and go on
                result["profiler_error"] = f"{type(error).__name__}: {error}"[:300]

    print(f"syncs per iteration: {result['syncs_per_iter']} (outside logging and timing: "
          f"{result['syncs_per_iter_outside_logging']})")
    for site in result["sites"]:
        print(f"  {site['per_iter']:6.2f}/iter  [{site['group']}] {site['site']} {site['function']}: {site['code']}"
              + (f"  -> {site['op']}" if site["op"] else ""))
    if "profiler_per_iter" in result:
        print("profiler, per iteration: " + ", ".join(f"{k} {v}" for k, v in result["profiler_per_iter"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
