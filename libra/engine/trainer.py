"""The training loop: epochs of SGD steps with warmup/step lr, AMP, logging and checkpoints.

One ``Trainer`` runs in every process. Per iteration it
1. sets the lr of this iteration (``WarmupMultiStepLR``, a pure function of the counter),
2. runs the detector on the batch (it returns a dict of named losses, e.g. ``loss_rpn_cls``),
3. backpropagates the sum of the ``loss*`` entries (DDP averages the gradients),
4. averages the loss dict over processes and stops every process if a loss is not finite,
5. on rank 0: logs every ``log_interval`` iterations (console line + JSON line + PNG plot).
At the end of each epoch rank 0 writes an atomic checkpoint; evaluation runs every
``eval_interval`` epochs and after the last one (through the ``evaluate`` callback).

Reproducibility: at the start of every epoch all random generators are re-seeded from
(seed, epoch, rank) and the sampler gets ``set_epoch(epoch)``, so the data order,
augmentation and RoI sampling of an epoch do not depend on what happened before it;
``--resume`` from an epoch checkpoint therefore continues exactly as the uninterrupted run.
"""
from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from .checkpoint import atomic_save, atomic_write_text, make_checkpoint
from .distributed import DistributedContext, all_reduce_dict, synchronize
from .lr_schedule import WarmupMultiStepLR
from .metric_logger import JSONLinesLog, MetricLogger, Timer, format_duration, max_memory_mb, plot_losses


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite: training stops (on every process)."""


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) generators."""
    seed = int(seed) % (2**31)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A distinct, reproducible seed per (run seed, epoch, rank)."""
    return (int(seed) * 1_000_003 + int(epoch) * 10_007 + int(rank)) % (2**31)


def move_targets(targets: list[dict], device: torch.device) -> list[dict]:
    """Copy the tensors of each target dict to ``device`` (other entries unchanged)."""
    moved = []
    for target in targets:
        moved.append(
            {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in target.items()}
        )
    return moved


def image_sizes_of(targets: list[dict], images: torch.Tensor) -> list[tuple[int, int]]:
    """``(h, w)`` of each image before padding (``img_shape`` of the dataset target)."""
    sizes = []
    for target in targets:
        shape = target.get("img_shape")
        sizes.append((int(shape[0]), int(shape[1])) if shape is not None else (images.shape[-2], images.shape[-1]))
    return sizes


def autocast_context(device: torch.device, enabled: bool):
    """fp16 autocast on CUDA, bf16 on the CPU (fp16 matmuls are slow there); a no-op when disabled."""
    if not enabled:
        return nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


class SkipBatches:
    """Iterate over ``batch_sampler`` but drop its first ``skip`` batches (mid-epoch resume)."""

    def __init__(self, batch_sampler: Any, skip: int) -> None:
        self.batch_sampler = batch_sampler
        self.skip = int(skip)

    def __iter__(self) -> Iterator:
        for index, batch in enumerate(self.batch_sampler):
            if index >= self.skip:
                yield batch

    def __len__(self) -> int:
        return max(0, len(self.batch_sampler) - self.skip)


@dataclass
class TrainConfig:
    num_epochs: int
    max_iters: int  # stop after this many iterations in all (may end inside an epoch)
    iters_per_epoch: int  # for the ETA and the log (the loader decides when an epoch ends)
    log_interval: int = 20
    eval_interval: int = 0  # epochs between evaluations; 0 = only after training
    checkpoint_interval: int = 1  # epochs between checkpoints
    keep_checkpoints: int = 0  # keep only the newest K epoch checkpoints; 0 = keep all
    seed: int = 0
    amp: bool = False
    grad_clip: float = 0.0  # max total gradient norm; 0 = no clipping (the paper's recipe)
    work_dir: Path | None = None
    model_name: str = ""
    num_classes: int = 0
    args: dict | None = None


class Trainer:
    """Owns the model, optimizer, lr schedule and AMP scaler of one process and runs the epochs.

    Args:
        model: the detector (wrapped in DistributedDataParallel when world size > 1).
        optimizer: SGD over the trainable parameters.
        scheduler: ``WarmupMultiStepLR`` bound to ``optimizer``.
        scaler: ``torch.amp.GradScaler`` (enabled only for AMP on CUDA).
        make_loader: ``(epoch, batches to skip) -> iterable of (images, targets)`` over that
            epoch's batches (sampler already ``set_epoch``-ed; the skip is > 0 only when
            resuming from a checkpoint written inside an epoch).
        ctx: this process's ``DistributedContext``.
        config: ``TrainConfig``.
        evaluate: optional callback ``(model, epoch) -> metrics`` run on every process.
        print_fn: where log lines go (used on rank 0 only).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: WarmupMultiStepLR,
        scaler: torch.amp.GradScaler,
        make_loader: Callable[[int, int], Iterable],
        ctx: DistributedContext,
        config: TrainConfig,
        evaluate: Callable[[torch.nn.Module, int], dict] | None = None,
        print_fn: Callable[[str], None] = print,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.make_loader = make_loader
        self.ctx = ctx
        self.config = config
        self.evaluate_fn = evaluate
        self.print = print_fn if ctx.is_main else (lambda *_: None)
        self.epoch = 0  # completed epochs
        self.iteration = 0  # completed iterations in all
        self.iter_in_epoch = 0  # completed iterations of the current, unfinished epoch
        self.log = JSONLinesLog(config.work_dir / "log.jsonl") if (ctx.is_main and config.work_dir) else None
        self.last_metrics: dict = {}
        self.evaluated_at: int | None = None  # iteration of the last evaluation

    # ---------------------------------------------------------------- checkpoints
    def state(self) -> dict:
        checkpoint = make_checkpoint(
            self.model,
            self.optimizer,
            self.scheduler,
            self.scaler,
            epoch=self.epoch,
            iteration=self.iteration,
            model_name=self.config.model_name,
            num_classes=self.config.num_classes,
            args=self.config.args,
        )
        checkpoint["iter_in_epoch"] = self.iter_in_epoch
        return checkpoint

    def load_state(self, checkpoint: dict) -> None:
        """Restore optimizer / scaler / counters (the model weights are loaded by the caller)."""
        if checkpoint.get("optimizer") is not None:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.epoch = int(checkpoint["epoch"])
        self.iteration = int(checkpoint["iteration"])
        self.iter_in_epoch = int(checkpoint.get("iter_in_epoch", 0))
        self.scheduler.set_position(self.iteration, self.epoch)
        if checkpoint.get("scaler") is not None and self.scaler.is_enabled():
            self.scaler.load_state_dict(checkpoint["scaler"])

    def save_checkpoint(self, name: str) -> Path | None:
        """Rank 0 writes ``work_dir/name`` atomically and points ``work_dir/last_checkpoint`` at it."""
        if not (self.ctx.is_main and self.config.work_dir):
            return None
        path = self.config.work_dir / name
        atomic_save(self.state(), path)
        atomic_write_text(name + "\n", self.config.work_dir / "last_checkpoint")
        self.print(f"saved checkpoint {path}")
        if self.config.keep_checkpoints > 0:
            epochs = sorted(
                (int(p.stem.split("_")[1]), p) for p in self.config.work_dir.glob("epoch_*.pth") if p.stem.split("_")[1].isdigit()
            )
            for _, old in epochs[: -self.config.keep_checkpoints]:
                if old != path:
                    old.unlink(missing_ok=True)
        return path

    # ---------------------------------------------------------------- loop
    def train(self) -> dict:
        """Run the remaining epochs; returns the last evaluation metrics (or {})."""
        config = self.config
        start_time = time.perf_counter()
        self.print(
            f"training {config.model_name}: {config.num_epochs} epochs x {config.iters_per_epoch} iterations, "
            f"world size {self.ctx.world_size}, device {self.ctx.device}"
            + (f", stopping at iteration {config.max_iters}" if config.max_iters < config.num_epochs * config.iters_per_epoch else "")
        )
        while self.epoch < config.num_epochs and self.iteration < config.max_iters:
            epoch = self.epoch
            # Re-seed from (seed, epoch, rank): the RoI samplers' draws of this epoch do not depend
            # on earlier epochs, so a resumed run repeats them exactly.
            seed_everything(epoch_seed(config.seed, epoch, self.ctx.rank))
            loader = self.make_loader(epoch, self.iter_in_epoch)
            completed = self.train_one_epoch(loader, epoch)
            if completed:
                self.epoch, self.iter_in_epoch = epoch + 1, 0
            last = self.epoch >= config.num_epochs or self.iteration >= config.max_iters
            if completed and (self.epoch % config.checkpoint_interval == 0 or last):
                self.save_checkpoint(f"epoch_{self.epoch}.pth")
            elif last:
                self.save_checkpoint(f"iter_{self.iteration}.pth")
            synchronize()
            evaluate_now = last or (config.eval_interval > 0 and completed and self.epoch % config.eval_interval == 0)
            if evaluate_now:
                self._evaluate()
        if self.evaluated_at != self.iteration:  # nothing left to train (e.g. --max-iters 0): evaluate as is
            self._evaluate()
        self.print(f"training done in {format_duration(time.perf_counter() - start_time)} ({self.iteration} iterations)")
        return self.last_metrics

    def _raise_if_diverged(self, epoch: int, error: BaseException) -> None:
        """A forward pass that fails on a diverged model (NaN boxes reach an op that cannot take
        them) is reported as divergence, not as the op's error."""
        with torch.no_grad():
            norms = torch.stack(torch._foreach_norm([p.detach().float() for p in self.model.parameters()]))
        if not bool(torch.isfinite(norms).all()) or float(norms.max()) > 1e15:
            raise NonFiniteLossError(
                f"training diverged before iteration {self.iteration + 1} (epoch {epoch + 1}): the weights are "
                f"non-finite or huge (max parameter norm {float(norms.max()):.3g}) and the forward pass failed "
                f"({str(error).splitlines()[0]}); lower --lr or set --grad-clip"
            ) from error

    def _check_gradients(self, epoch: int) -> None:
        """Stop before the step when a gradient is NaN/inf although the loss was finite.

        One fused per-tensor norm (``torch._foreach_norm``) and one host sync; the names of
        the offending parameters are only looked up when something is wrong.
        """
        named = [(n, p.grad) for n, p in self.model.named_parameters() if p.grad is not None]
        if not named:
            return
        norms = torch.stack(torch._foreach_norm([g for _, g in named]))
        if bool(torch.isfinite(norms).all()):
            return
        finite = torch.isfinite(norms).tolist()
        names = [n for (n, _), ok in zip(named, finite) if not ok]
        raise NonFiniteLossError(
            f"non-finite gradient at iteration {self.iteration + 1} (epoch {epoch + 1}) in "
            f"{', '.join(names[:3])}{' ...' if len(names) > 3 else ''} ({len(names)} parameters); "
            "lower --lr, set --grad-clip, or check the data"
        )

    def _evaluate(self) -> None:
        if self.evaluate_fn is None:
            return
        self.last_metrics = self.evaluate_fn(self.model, self.epoch) or {}
        self.evaluated_at = self.iteration
        if self.log is not None and self.last_metrics:
            numbers = {k: v for k, v in self.last_metrics.items() if isinstance(v, (int, float))}
            self.log.write({"mode": "val", "epoch": self.epoch, "iter": self.iteration, **numbers})

    def train_one_epoch(self, loader: Iterable, epoch: int) -> bool:
        """Run the batches of ``loader``; True when the epoch ran to its end (not stopped by max_iters)."""
        config = self.config
        device = self.ctx.device
        model = self.model
        model.train()
        total_iters = min(config.max_iters, config.num_epochs * config.iters_per_epoch)
        logger = MetricLogger(total_iters)
        timer = Timer(device)
        for images, targets in loader:
            if self.iteration >= config.max_iters:
                return False
            data_time = timer.lap()
            images = images.to(device, non_blocking=True)
            targets = move_targets(targets, device)
            image_sizes = image_sizes_of(targets, images)
            self.scheduler.set_position(self.iteration, epoch)

            try:
                with autocast_context(device, config.amp):
                    loss_dict = model(images, image_sizes, targets)
            except RuntimeError as error:
                self._raise_if_diverged(epoch, error)
                raise
            losses = {k: v for k, v in loss_dict.items() if k.startswith("loss")}
            total = sum(v.float() for v in losses.values())

            # One collective + one host transfer for all values; checked before the step so that a
            # non-finite loss never reaches the weights (every rank sees the same reduced values).
            reduced = all_reduce_dict({**loss_dict, "loss": total})
            values = dict(zip(reduced, torch.stack(list(reduced.values())).cpu().tolist()))
            bad = [k for k, v in values.items() if k.startswith("loss_") and not math.isfinite(v)]
            if bad or not math.isfinite(values["loss"]):
                names = bad or ["loss"]
                raise NonFiniteLossError(
                    f"non-finite loss at iteration {self.iteration + 1} (epoch {epoch + 1}): "
                    + ", ".join(f"{k} = {values[k]}" for k in names)
                    + "; lower --lr or check the data"
                )
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(total).backward()
            if not self.scaler.is_enabled():  # with AMP the scaler skips steps with inf gradients itself
                self._check_gradients(epoch)
            if config.grad_clip > 0:
                # Not part of the paper's recipe (MMDetection's `schedule_1x.py` sets no
                # `optim_wrapper.clip_grad`); used to train from scratch.
                self.scaler.unscale_(self.optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    [p for group in self.optimizer.param_groups for p in group["params"]], config.grad_clip
                )
                values["grad_norm"] = float(grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.iteration += 1
            self.iter_in_epoch += 1
            iter_time = timer.lap() + data_time
            logger.update(**values, lr=self.optimizer.param_groups[0]["lr"], time=iter_time, data_time=data_time)

            if self.iteration % config.log_interval == 0 or self.iteration == total_iters:
                memory = max_memory_mb(device)
                self.print(logger.format_line(epoch, config.num_epochs, self.iteration, memory))
                if self.log is not None:
                    record = {"mode": "train", "epoch": epoch + 1, "iter": self.iteration, "memory_mb": round(memory, 1)}
                    record.update({k: round(v, 6) for k, v in logger.summary().items()})
                    self.log.write(record)
                    plot_losses(self.log.read(), config.work_dir / "losses.png")
        return True  # the loader ran out of batches: the epoch is complete
