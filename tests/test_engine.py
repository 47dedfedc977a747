"""Unit tests of libra.engine: lr schedule, metric logger / ETA, atomic checkpoint writes."""
from __future__ import annotations

import json
import math

import pytest
import torch

from libra.engine.checkpoint import (
    CheckpointError,
    atomic_save,
    atomic_write_text,
    check_model_identity,
    load_checkpoint_file,
    load_model_state,
    make_checkpoint,
)
from libra.engine.distributed import all_gather_object, all_reduce_dict, get_world_size
from libra.engine.lr_schedule import WarmupMultiStepLR, warmup_multistep_factor
from libra.engine.metric_logger import (
    JSONLinesLog,
    MetricLogger,
    SmoothedValue,
    estimate_eta,
    format_duration,
    plot_losses,
)


# ---------------------------------------------------------------- lr schedule
def test_warmup_starts_at_0_001_and_reaches_1():
    steps = [8, 11]
    assert warmup_multistep_factor(0, 0, steps) == pytest.approx(0.001)
    assert warmup_multistep_factor(250, 0, steps) == pytest.approx(0.001 + 0.999 * 0.5)
    assert warmup_multistep_factor(499, 0, steps) == pytest.approx(0.001 + 0.999 * 499 / 500)
    assert warmup_multistep_factor(500, 0, steps) == pytest.approx(1.0)


def test_steps_multiply_by_0_1_after_epochs_8_and_11():
    steps = [8, 11]
    assert warmup_multistep_factor(7999, 7, steps) == pytest.approx(1.0)
    assert warmup_multistep_factor(8000, 8, steps) == pytest.approx(0.1)
    assert warmup_multistep_factor(10999, 10, steps) == pytest.approx(0.1)
    assert warmup_multistep_factor(11000, 11, steps) == pytest.approx(0.01)
    # 2x schedule: steps after epochs 16 and 22.
    assert warmup_multistep_factor(1, 16, [16, 22], warmup_iters=0) == pytest.approx(0.1)
    # A step inside the warmup multiplies the warmup factor.
    assert warmup_multistep_factor(0, 1, [1], warmup_iters=10) == pytest.approx(0.0001)


def test_scheduler_writes_lr_into_optimizer_and_resumes_from_counters():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.02, momentum=0.9)
    scheduler = WarmupMultiStepLR(optimizer, step_epochs=[2, 3], warmup_iters=10)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.02 * 0.001)
    scheduler.set_position(10, 0)
    assert scheduler.get_last_lr()[0] == pytest.approx(0.02)
    scheduler.set_position(25, 2)
    state = scheduler.state_dict()
    other_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.02)
    other = WarmupMultiStepLR(other_optimizer, step_epochs=[2, 3], warmup_iters=10)
    other.load_state_dict(state)
    assert other_optimizer.param_groups[0]["lr"] == pytest.approx(0.002)
    with pytest.raises(ValueError):
        warmup_multistep_factor(-1, 0, [])


# ---------------------------------------------------------------- metric logger
def test_smoothed_value_median_and_global_average():
    value = SmoothedValue(window=3)
    for v in [1.0, 100.0, 2.0, 3.0]:
        value.update(v)
    assert value.median == 3.0  # window holds 100, 2, 3
    assert value.global_avg == pytest.approx(106.0 / 4)
    assert value.latest == 3.0


def test_eta_follows_the_whole_run_not_the_last_window():
    """A slow stretch at the end (a shared machine) moves the ETA by its share of the run, not 5x."""
    logger = MetricLogger(max_iters=100, window=4)
    for _ in range(46):
        logger.update(time=0.5)
    for _ in range(4):
        logger.update(time=2.5)
    assert logger.eta_seconds(50) == pytest.approx(50 * (46 * 0.5 + 4 * 2.5) / 50)


def test_eta_from_average_iteration_time():
    logger = MetricLogger(max_iters=100, window=4)
    for _ in range(4):
        logger.update(time=0.5, loss=1.0)
    assert logger.eta_seconds(60) == pytest.approx(40 * 0.5)
    assert estimate_eta(2.0, 100, 100) == 0.0
    assert format_duration(3725) == "1:02:05"
    assert format_duration(float("nan")) == "?"
    line = logger.format_line(epoch=0, num_epochs=12, iteration=60, memory_mb=123.0)
    assert "eta 0:00:20" in line and "loss: 1.0000" in line and "mem 123MB" in line


def test_jsonl_log_and_png_plot(tmp_path):
    log = JSONLinesLog(tmp_path / "log.jsonl")
    for it in range(1, 6):
        log.write({"mode": "train", "iter": it, "loss": 2.0 / it, "loss_cls": 1.0 / it, "lr": 0.01})
    log.write({"mode": "val", "iter": 5, "AP": 0.1})
    records = log.read()
    assert len(records) == 6 and records[0]["loss"] == 2.0
    assert json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])["AP"] == 0.1
    out = plot_losses(records, tmp_path / "losses.png")
    from PIL import Image

    with Image.open(out) as image:
        assert image.size == (800, 480)
        # Something other than white was drawn.
        assert image.convert("L").getextrema()[0] < 200
    assert plot_losses([{"mode": "val", "iter": 1}], tmp_path / "none.png") is None


# ---------------------------------------------------------------- checkpoints
def test_atomic_save_roundtrip(tmp_path):
    path = tmp_path / "sub" / "ckpt.pth"
    atomic_save({"a": torch.arange(3)}, path)
    assert torch.equal(load_checkpoint_file(path)["a"], torch.arange(3))
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pth"]  # no temporary left behind


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth"
    atomic_save({"version": 1}, path)

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"partial garbage")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="simulated"):
        atomic_save({"version": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint_file(path)["version"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]


def test_atomic_write_text(tmp_path):
    atomic_write_text("hello\n", tmp_path / "x.txt")
    assert (tmp_path / "x.txt").read_text() == "hello\n"


def test_load_errors_are_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint_file(tmp_path / "missing.pth")
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint_file(tmp_path / "bad.pth")


def test_model_identity_and_state_mismatch():
    model = torch.nn.Linear(4, 3)
    checkpoint = make_checkpoint(model, None, None, None, 1, 10, "libra_faster_rcnn_r50_fpn", 3)
    check_model_identity(checkpoint, "libra_faster_rcnn_r50_fpn", 3)
    with pytest.raises(CheckpointError, match="faster_rcnn_r50_fpn"):
        check_model_identity(checkpoint, "faster_rcnn_r50_fpn", 3)
    with pytest.raises(CheckpointError, match="classes"):
        check_model_identity(checkpoint, "libra_faster_rcnn_r50_fpn", 80)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_model_state(torch.nn.Linear(4, 5), checkpoint["model"])
    other = torch.nn.Linear(4, 3)
    load_model_state(other, checkpoint["model"])
    assert torch.equal(other.weight, model.weight)


# ---------------------------------------------------------------- distributed helpers (single process)
def test_distributed_helpers_without_process_group():
    assert get_world_size() == 1
    reduced = all_reduce_dict({"loss": torch.tensor(2.0, requires_grad=True)})
    assert not reduced["loss"].requires_grad and reduced["loss"].item() == 2.0
    assert all_gather_object({"x": 1}) == [{"x": 1}]
    assert math.isfinite(reduced["loss"].item())


# ---------------------------------------------------------------- launcher and training loop
def test_launch_reads_the_torchrun_environment(monkeypatch):
    from libra.engine.distributed import launch

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    seen = {}

    def worker(ctx, args):
        seen.update(rank=ctx.rank, world=ctx.world_size, device=ctx.device.type, args=args)
        return 7

    assert launch(worker, num_processes=4, device_type="cpu", args="x") == 7  # torchrun wins over --gpus
    assert seen == {"rank": 0, "world": 1, "device": "cpu", "args": "x"}


class _ToyDetector(torch.nn.Module):
    """Returns a finite loss dict, except loss_cls = NaN on call number ``nan_at`` (1-based)."""

    def __init__(self, nan_at: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.calls = 0
        self.nan_at = nan_at

    def forward(self, batch, mode="loss"):
        return self.loss(batch)

    def loss(self, batch):
        self.calls += 1
        loss_cls = self.weight * batch.images.mean()
        if self.calls == self.nan_at:
            loss_cls = loss_cls * float("nan")
        return {"loss_cls": loss_cls, "loss_bbox": self.weight * 0.5, "acc": torch.tensor(50.0)}


def _toy_trainer(tmp_path, nan_at: int, epochs: int = 2):
    from libra.engine.distributed import DistributedContext
    from libra.engine.trainer import TrainConfig, Trainer
    from libra.structures import Batch

    model = _ToyDetector(nan_at)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = WarmupMultiStepLR(optimizer, step_epochs=[1], warmup_iters=0)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    batch = Batch(torch.ones(1, 3, 4, 4), [(4, 4)], targets=[{"img_shape": (4, 4)}])
    config = TrainConfig(num_epochs=epochs, max_iters=100, iters_per_epoch=3, log_interval=1, work_dir=tmp_path,
                         model_name="toy", num_classes=1)
    ctx = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    return Trainer(model, optimizer, scheduler, scaler, lambda epoch, skip: [batch] * (3 - skip), ctx, config,
                   print_fn=lambda line: None), model


def test_non_finite_loss_stops_training_naming_loss_and_iteration(tmp_path):
    from libra.engine.trainer import NonFiniteLossError

    trainer, model = _toy_trainer(tmp_path, nan_at=5)
    with pytest.raises(NonFiniteLossError, match=r"iteration 5 \(epoch 2\): loss_cls = nan"):
        trainer.train()
    assert trainer.iteration == 4  # the bad step was not applied
    assert torch.isfinite(model.weight).all()
    assert (tmp_path / "epoch_1.pth").is_file() and not (tmp_path / "epoch_2.pth").exists()


def test_trainer_counts_epochs_logs_and_steps_lr(tmp_path):
    trainer, _ = _toy_trainer(tmp_path, nan_at=-1)
    trainer.train()
    assert (trainer.epoch, trainer.iteration) == (2, 6)
    records = JSONLinesLog(tmp_path / "log.jsonl").read()
    assert [r["iter"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["lr"] for r in records] == pytest.approx([0.1, 0.1, 0.1, 0.01, 0.01, 0.01])
    assert load_checkpoint_file(tmp_path / "epoch_2.pth")["iteration"] == 6
    assert (tmp_path / "last_checkpoint").read_text().strip() == "epoch_2.pth"


# ------------------------------------------------------------------------------ recipes and CLI
def test_recipes_are_the_papers_and_a_detector_entry_changes_every_dataset(monkeypatch):
    from libra import recipes

    coco = recipes.recipe("coco")
    assert coco["lr_per_16_images"] == 0.02 and coco["schedules"]["1x"] == (12, (8, 11)) and coco["warmup_iters"] == 500
    assert recipes.recipe("voc")["lr_per_16_images"] == 0.01 and recipes.recipe("voc")["min_size"] == 600
    assert recipes.recipe("synthetic")["optimizer"] == "adamw"
    # a new detector's schedule is one entry
    monkeypatch.setitem(recipes.DETECTOR_RECIPES, "retinanet", {"lr_per_16_images": 0.01, "overrides": {"x": 1}})
    changed = recipes.recipe("coco", "retinanet")
    assert changed["lr_per_16_images"] == 0.01 and changed["overrides"] == {"x": 1} and changed["max_size"] == 1333
    assert recipes.recipe("synthetic", "retinanet")["overrides"]["fpn_channels"] == 128  # merged, not replaced
    with pytest.raises(ValueError, match="detector"):
        recipes.recipe("coco", "yolo")


def test_eval_script_does_not_import_train_script():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = "import sys, eval; print('train' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert result.stdout.strip() == "False"
