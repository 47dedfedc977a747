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
Inside an epoch the data side is a pure function of (seed, index, epoch) (the samplers' order
and each sample's augmentation generator), but the RoI / anchor samplers draw from the global
generators; so every checkpoint also holds each rank's global generator states (torch CPU and
CUDA, ``random``, NumPy) as they were after its last iteration, and a run resumed from a
checkpoint written inside an epoch (``iter_N.pth``) re-seeds the epoch, skips the batches
already trained, and restores those states before its first batch: the continuation is
bit-identical to the uninterrupted run (same world size and settings, which ``train.py``
enforces; on CUDA as far as the uninterrupted run is itself deterministic: kernels that
accumulate with atomics, e.g. RoIAlign's backward, are not).

Failures: a non-finite loss or gradient, and any error of the forward / backward pass that
comes with non-finite weights or activations (e.g. NaN proposals reaching an op that rejects
them), raise :class:`NonFiniteLossError` ("training diverged ...": exit code 3 in ``train.py``);
a checkpoint write is never left half done by Ctrl-C (``libra.engine.checkpoint``).
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch


from libra.atomic_io import WriteError

from .checkpoint import CheckpointError, atomic_save, atomic_write_text, deferred_interrupts, make_checkpoint
from .distributed import DistributedContext, all_gather_object, all_reduce_dict, synchronize
from .divergence import NonFiniteLossError, check_gradients, raise_if_diverged
from .lr_schedule import WarmupMultiStepLR
from .metric_logger import JSONLinesLog, MetricLogger, Timer, format_duration, max_memory_mb, plot_losses
from .rng import epoch_seed, get_rng_state, seed_everything, set_rng_state

__all__ = ["NonFiniteLossError", "SkipBatches", "TrainConfig", "Trainer", "autocast_context", "seed_everything"]


def _optimizer_family(group: dict) -> str:
    """'adam' (betas), 'sgd' (momentum) or the sorted keys of a param group: what its state needs."""
    if "betas" in group:
        return "adam"
    if "momentum" in group:
        return "sgd"
    return ",".join(sorted(k for k in group if k != "params"))


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
    class_names: tuple[str, ...] | None = None  # the dataset's, in label order (recorded in checkpoints)
    args: dict | None = None
    model_config: dict | None = None  # the complete config the model was built from (recorded in checkpoints)
    label_to_cat_id: tuple[int, ...] | None = None  # the dataset's category id of each label


class Trainer:
    """Owns the model, optimizer, lr schedule and AMP scaler of one process and runs the epochs.

    Args:
        model: the detector (wrapped in DistributedDataParallel when world size > 1).
        optimizer: SGD over the trainable parameters.
        scheduler: ``WarmupMultiStepLR`` bound to ``optimizer``.
        scaler: ``torch.amp.GradScaler`` (enabled only for AMP on CUDA).
        make_loader: ``(epoch, batches to skip) -> iterable of`` :class:`~libra.structures.Batch` over that
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
        self.last_checkpoint: Path | None = None  # written by this run (or resumed from)
        self.last_checkpoint_iteration: int | None = None
        self.writing_checkpoint: Path | None = None  # set while a checkpoint is being written
        self.stage = "setup"  # "training" / "evaluating" / "checkpoint": where an interrupt found the run
        self._rng_after_step: dict | None = None  # global generator states after the last iteration
        self._resume_rng: dict | None = None  # states to restore before the first batch of a mid-epoch resume

    # ---------------------------------------------------------------- checkpoints
    def state(self, rng_states: list | None = None) -> dict:
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
            class_names=self.config.class_names,
            model_config=self.config.model_config,
            label_to_cat_id=self.config.label_to_cat_id,
        )
        checkpoint["iter_in_epoch"] = self.iter_in_epoch
        checkpoint["iters_per_epoch"] = self.config.iters_per_epoch
        checkpoint["world_size"] = self.ctx.world_size
        checkpoint["rng_states"] = rng_states if rng_states is not None else [self._rng_now()]
        return checkpoint

    def _rng_now(self) -> dict:
        """This rank's generator states as of the end of its last iteration."""
        return self._rng_after_step if self._rng_after_step is not None else get_rng_state(self.ctx.device)

    def load_state(self, checkpoint: dict, path: Any = "checkpoint") -> None:
        """Restore optimizer / scaler / counters / generator states (the model weights are loaded by
        the caller). Raises ``CheckpointError`` when the optimizer state is of another kind or size."""
        saved = checkpoint.get("optimizer")
        if saved is not None:
            saved_type = checkpoint.get("optimizer_type")
            own_type = type(self.optimizer).__name__
            saved_groups = saved.get("param_groups", [])
            own_groups = self.optimizer.param_groups
            if (saved_type is not None and saved_type != own_type) or (
                saved_groups and own_groups and _optimizer_family(saved_groups[0]) != _optimizer_family(own_groups[0])
            ):
                raise CheckpointError(
                    f"{path} holds the state of another optimizer ({saved_type or _optimizer_family(saved_groups[0])}) "
                    f"than this run's {own_type}: resume with the checkpoint's --optimizer, or start a new --work-dir "
                    "without --resume"
                )
            sizes = [len(g["params"]) for g in saved_groups]
            own_sizes = [len(g["params"]) for g in own_groups]
            if sizes != own_sizes:
                raise CheckpointError(
                    f"{path} holds optimizer state for {sum(sizes)} trainable parameter tensors but this model has "
                    f"{sum(own_sizes)} (groups {sizes} vs {own_sizes}): resume with the settings of the checkpoint "
                    "(e.g. the same --frozen-stages / --backbone-norm), or start a new --work-dir without --resume"
                )
            try:
                self.optimizer.load_state_dict(saved)
            except (ValueError, KeyError, TypeError, RuntimeError) as error:
                raise CheckpointError(f"{path}: cannot restore the optimizer state: {error}") from None
        self.epoch = int(checkpoint["epoch"])
        self.iteration = int(checkpoint["iteration"])
        self.iter_in_epoch = int(checkpoint.get("iter_in_epoch", 0))
        self.scheduler.set_position(self.iteration, self.epoch)
        if checkpoint.get("scaler") is not None and self.scaler.is_enabled():
            self.scaler.load_state_dict(checkpoint["scaler"])
        rng_states = checkpoint.get("rng_states")
        self._resume_rng = None
        if self.iter_in_epoch > 0 and rng_states and len(rng_states) == self.ctx.world_size:
            self._resume_rng = rng_states[self.ctx.rank]
        self.last_checkpoint = Path(path) if path != "checkpoint" else None
        self.last_checkpoint_iteration = self.iteration

    @property
    def resumes_exactly(self) -> bool:
        """False for a mid-epoch checkpoint without the generator states of every rank (an old one)."""
        return self.iter_in_epoch == 0 or self._resume_rng is not None

    def save_checkpoint(self, name: str) -> Path | None:
        """Rank 0 writes ``work_dir/name`` atomically and points ``work_dir/last_checkpoint`` at it.

        Called on every rank (the generator states of all ranks are gathered into the checkpoint).
        Ctrl-C / SIGTERM are deferred until checkpoint and pointer are both written.
        """
        if not self.config.work_dir:
            return None
        rng_states = all_gather_object(self._rng_now())
        if not self.ctx.is_main:
            # Rank 0 writes it; the other ranks remember where (named if the run stops on their side).
            self.last_checkpoint, self.last_checkpoint_iteration = self.config.work_dir / name, self.iteration
            return None
        path = self.config.work_dir / name
        previous_stage, self.stage, self.writing_checkpoint = self.stage, "checkpoint", path
        with deferred_interrupts():
            try:
                atomic_save(self.state(rng_states), path)
                atomic_write_text(name + "\n", self.config.work_dir / "last_checkpoint")
            except WriteError as error:  # disk full, read-only, ...: the previous checkpoint stays as it was
                error.what = error.what or ("checkpoint" if error.path == path else "checkpoint pointer")
                self.writing_checkpoint, self.stage = None, previous_stage
                raise
            self.last_checkpoint, self.last_checkpoint_iteration = path, self.iteration
            self.writing_checkpoint, self.stage = None, previous_stage
            self.print(f"saved checkpoint {path}")
            if self.config.keep_checkpoints > 0:
                epochs = sorted(
                    (int(p.stem.split("_")[1]), p)
                    for p in self.config.work_dir.glob("epoch_*.pth")
                    if p.stem.split("_")[1].isdigit()
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
        if self.log is not None:
            # A resumed run repeats the iterations after its checkpoint: their old records go.
            self.log.keep_until(self.iteration)
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
            self.stage = "training"
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

    def _evaluate(self) -> None:
        if self.evaluate_fn is None:
            return
        previous_stage, self.stage = self.stage, "evaluating"
        self.last_metrics = self.evaluate_fn(self.model, self.epoch) or {}
        self.stage = previous_stage
        self.evaluated_at = self.iteration
        if self.log is not None and self.last_metrics:
            numbers = {k: v for k, v in self.last_metrics.items() if isinstance(v, (int, float))}
            self.log.drop("val", self.iteration)  # a finished run resumed evaluates again: one record
            self.log.write({"mode": "val", "epoch": self.epoch, "iter": self.iteration, **numbers})
            # Redrawn after every evaluation, so that the picture shows the final metrics too.
            plot_losses(self.log.read(), self.config.work_dir / "losses.png")

    def train_one_epoch(self, loader: Iterable, epoch: int) -> bool:
        """Run the batches of ``loader``; True when the epoch ran to its end (not stopped by max_iters)."""
        config = self.config
        device = self.ctx.device
        model = self.model
        model.train()
        total_iters = min(config.max_iters, config.num_epochs * config.iters_per_epoch)
        logger = MetricLogger(total_iters)
        timer = Timer(device)
        iterator = iter(loader)
        if self._resume_rng is not None:
            # Mid-epoch resume: the epoch was re-seeded and its first iter_in_epoch batches skipped;
            # continue with the generator states the interrupted run had after its last iteration.
            set_rng_state(self._resume_rng, device)
            self._resume_rng = None
        self._rng_after_step = get_rng_state(device)  # the states before this epoch's next batch
        for batch in iterator:
            if self.iteration >= config.max_iters:
                return False
            data_time = timer.lap()
            batch = batch.to(device)
            self.scheduler.set_position(self.iteration, epoch)

            rng_before = self._rng_after_step  # (the data fetch draws nothing from the global generators)
            try:
                with autocast_context(device, config.amp):
                    # Through forward (mode="loss"), so that DistributedDataParallel sees the call.
                    loss_dict = model(batch, mode="loss")
            except Exception as error:
                if isinstance(error, NonFiniteLossError):
                    raise
                raise_if_diverged(model, self.iteration, epoch, error, "forward pass", batch, rng_before, device, config.amp)
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
                    f"training diverged: non-finite loss at iteration {self.iteration + 1} (epoch {epoch + 1}): "
                    + ", ".join(f"{k} = {values[k]}" for k in names)
                    + "; lower --lr or check the data"
                )
            self.optimizer.zero_grad(set_to_none=True)
            try:
                self.scaler.scale(total).backward()
            except Exception as error:
                raise_if_diverged(model, self.iteration, epoch, error, "backward pass")
                raise
            if not self.scaler.is_enabled():  # with AMP the scaler skips steps with inf gradients itself
                check_gradients(model, self.iteration, epoch)
            if config.grad_clip > 0:
                # Not part of the v2/v3 recipe (MMDetection's `schedule_1x.py` sets no
                # `optim_wrapper.clip_grad`); MMDetection v1, which the paper's ablations ran, clipped
                # at 35 (train.py --recipe v1); the synthetic recipe clips to train from scratch.
                self.scaler.unscale_(self.optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    [p for group in self.optimizer.param_groups for p in group["params"]], config.grad_clip
                )
                values["grad_norm"] = float(grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.iteration += 1
            self.iter_in_epoch += 1
            self._rng_after_step = get_rng_state(device)  # what a checkpoint of this point must restore
            iter_time = timer.lap() + data_time
            logger.update(**values, lr=self.optimizer.param_groups[0]["lr"], time=iter_time, data_time=data_time)

            if self.iteration % config.log_interval == 0 or self.iteration == total_iters:
                memory = max_memory_mb(device)
                self.print(logger.format_line(epoch, config.num_epochs, self.iteration, memory))
                if self.log is not None:
                    record = {"mode": "train", "epoch": epoch + 1, "iter": self.iteration, "memory_mb": round(memory, 1),
                              "eta_s": round(logger.eta_seconds(self.iteration), 1)}
                    record.update({k: round(v, 6) for k, v in logger.summary().items()})
                    self.log.write(record)
                    # The matplotlib plot costs ~0.3 s of CPU: redraw it once an epoch (and at the end).
                    if self.iteration % config.iters_per_epoch == 0 or self.iteration == total_iters:
                        plot_losses(self.log.read(), config.work_dir / "losses.png")
        return True  # the loader ran out of batches: the epoch is complete
