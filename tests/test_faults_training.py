"""Fault cases of train.py: resume with other settings, exact mid-epoch resume, Ctrl-C / SIGTERM
(also during a checkpoint write and with 2 processes), divergences that escaped exit code 3, work
dirs that hold another run, checkpoints of another class list, stale temporary files.

Every run is tiny (synthetic 64 x 64 images, a thin detector, a few iterations); the scripts run
as subprocesses, as a user runs them, except where a module has to be replaced to reproduce a
failure (then ``train.main`` runs in-process).
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_clean_error, assert_ok, error_line

REPO = Path(__file__).resolve().parents[1]

TINY = [
    "--synthetic-image-size", "64", "--min-size", "64", "--max-size", "64",
    "--width-per-group", "8", "--set", "fpn_channels=32", "--set", "fc_channels=64",
    "--set", "roi_batch_size=32", "--set", "rpn_batch_size=64",
    "--workers", "0", "--threads", "1", "--log-interval", "1", "--warmup-iters", "5",
]


def _default_sigint() -> None:
    """Children get Ctrl-C back: a shell that starts the suite in the background (``cmd &``)
    ignores SIGINT, and an ignored signal stays ignored across exec (Python then installs no
    KeyboardInterrupt handler)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(autouse=True)
def _ctrl_c_raises():
    """The in-process tests need SIGINT to raise KeyboardInterrupt, also in a backgrounded suite."""
    before = signal.getsignal(signal.SIGINT)
    if before == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("LIBRA_DEBUG", None)
    return env


def run_script(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / script), *args],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout,
    )


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def snapshot(folder: Path) -> dict:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir()}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults") / "data"


def data_args(root: Path, num_train: int = 4) -> list[str]:
    return ["--data-root", str(root / f"n{num_train}"), "--synthetic-num-train", str(num_train),
            "--synthetic-num-val", "2", "--batch-size", "2", "--no-eval"]


@pytest.fixture(scope="module")
def sgd_run(tmp_path_factory, data_root) -> Path:
    """One epoch (2 iterations) with SGD: a work dir with epoch_1.pth to resume from."""
    work_dir = tmp_path_factory.mktemp("sgd") / "run"
    assert_ok(run_script("train.py", *TINY, *data_args(data_root), "--optimizer", "sgd", "--lr", "0.01",
                         "--epochs", "1", "--work-dir", str(work_dir)))
    return work_dir


# ---------------------------------------------------------------------------------------------
# 4. --resume with settings that make the continuation meaningless: refused, never a KeyError
# ---------------------------------------------------------------------------------------------
def test_resume_with_another_optimizer_is_refused_naming_both(sgd_run, data_root):
    before = snapshot(sgd_run)
    result = run_script("train.py", *TINY, *data_args(data_root), "--optimizer", "adamw", "--lr", "0.01",
                        "--epochs", "2", "--resume", "--work-dir", str(sgd_run))
    line = assert_clean_error(result, 1, "--optimizer sgd", "adamw", "--resume")
    assert "KeyError" not in result.stderr and "new --work-dir" in line
    # Other batch layout (the schedule's iteration counts would not continue).
    result = run_script("train.py", *TINY, *data_args(data_root), "--optimizer", "sgd", "--lr", "0.01",
                        "--batch-size", "1", "--epochs", "2", "--resume", "--work-dir", str(sgd_run))
    assert_clean_error(result, 1, "2 images per process x 1 processes", "--batch-size 2")
    # Another detector switch (same weights layout, another loss).
    result = run_script("train.py", *TINY, *data_args(data_root), "--optimizer", "sgd", "--lr", "0.01",
                        "--box-loss", "smooth_l1", "--epochs", "2", "--resume", "--work-dir", str(sgd_run))
    assert_clean_error(result, 1, "box_loss=balanced_l1 (this run: box_loss=smooth_l1)")
    assert snapshot(sgd_run) == before  # refused before anything was written


def test_optimizer_state_of_another_kind_is_refused_without_recorded_args(tmp_path):
    """Old checkpoints without args / optimizer type: the optimizer state itself is compared."""
    from libra.engine.checkpoint import CheckpointError
    from libra.engine.distributed import DistributedContext
    from libra.engine.lr_schedule import WarmupMultiStepLR
    from libra.engine.trainer import TrainConfig, Trainer

    def trainer_with(optimizer_class):
        model = torch.nn.Linear(2, 2)
        optimizer = optimizer_class(model.parameters(), lr=0.1)
        scheduler = WarmupMultiStepLR(optimizer, step_epochs=[1], warmup_iters=0)
        ctx = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
        config = TrainConfig(num_epochs=1, max_iters=10, iters_per_epoch=1, work_dir=tmp_path, model_name="toy")
        return Trainer(model, optimizer, scheduler, torch.amp.GradScaler("cuda", enabled=False), lambda e, s: [], ctx,
                       config, print_fn=lambda line: None)

    sgd = trainer_with(lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9))
    sgd.model(torch.ones(1, 2)).sum().backward()
    sgd.optimizer.step()
    checkpoint = sgd.state()
    del checkpoint["optimizer_type"], checkpoint["args"]
    with pytest.raises(CheckpointError, match="another optimizer.*AdamW.*--optimizer"):
        trainer_with(torch.optim.AdamW).load_state(checkpoint, "old.pth")
    trainer_with(lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9)).load_state(checkpoint, "old.pth")


# ---------------------------------------------------------------------------------------------
# Class names are recorded and compared (another data set with the same class count)
# ---------------------------------------------------------------------------------------------
def test_checkpoint_of_other_classes_with_the_same_count_is_refused(sgd_run, data_root, tmp_path):
    from libra.engine.checkpoint import CheckpointError, check_model_identity

    checkpoint = load(sgd_run / "epoch_1.pth")
    names = checkpoint["class_names"]
    assert isinstance(names, list) and len(names) == checkpoint["num_classes"] == 4
    other = dict(checkpoint, class_names=["aeroplane", names[1], "bird", names[3]])
    torch.save(other, tmp_path / "voc_like.pth")
    result = run_script("train.py", *TINY, *data_args(data_root), "--optimizer", "sgd", "--lr", "0.01", "--epochs", "2",
                        "--resume", str(tmp_path / "voc_like.pth"), "--work-dir", str(tmp_path / "work"))
    assert_clean_error(result, 1, "other classes", "'aeroplane' vs", "'bird' vs")
    assert not (tmp_path / "work").exists()
    # eval.py's call (no class names) and checkpoints written before class names were recorded still work.
    check_model_identity(other, "libra_faster_rcnn_r50_fpn", 4, "x.pth")
    old = {k: v for k, v in checkpoint.items() if k != "class_names"}
    check_model_identity(old, "libra_faster_rcnn_r50_fpn", 4, "x.pth", class_names=["a", "b", "c", "d"])
    with pytest.raises(CheckpointError, match="4 classes but this dataset has 3"):
        check_model_identity(old, "libra_faster_rcnn_r50_fpn", 3, "x.pth", class_names=["a", "b", "c"])


# ---------------------------------------------------------------------------------------------
# 5. Resume from a mid-epoch checkpoint (iter_N.pth) is bit-identical to the uninterrupted run
# ---------------------------------------------------------------------------------------------
def test_mid_epoch_resume_is_bit_identical(tmp_path, data_root):
    # 8 images / batch 2 = 4 iterations per epoch, 2 epochs; stopped at iteration 6 (inside epoch 2).
    common = [*TINY, *data_args(data_root, num_train=8), "--epochs", "2", "--lr-steps", "1", "--seed", "5"]
    assert_ok(run_script("train.py", *common, "--work-dir", str(tmp_path / "full")))
    part = tmp_path / "part"
    assert_ok(run_script("train.py", *common, "--max-iters", "6", "--work-dir", str(part)))
    assert (part / "last_checkpoint").read_text().strip() == "iter_6.pth"
    stale = part / ".epoch_2.pth.zz9_ab12.tmp"  # as left by a killed write
    stale.write_bytes(b"partial")
    # The resumed leg uses a data-loader worker process: the data does not depend on it.
    resumed_run = run_script("train.py", *common, "--workers", "1", "--resume", "--work-dir", str(part))
    assert_ok(resumed_run)
    assert "epoch 1, iteration 6" in resumed_run.stdout and "note:" not in resumed_run.stdout

    full, resumed = load(tmp_path / "full" / "epoch_2.pth"), load(part / "epoch_2.pth")
    assert full["iteration"] == resumed["iteration"] == 8
    differing = [k for k, v in full["model"].items() if not torch.equal(v, resumed["model"][k])]
    assert not differing, f"{len(differing)} of {len(full['model'])} tensors differ, e.g. {differing[:3]}"
    assert full["optimizer"]["state"].keys() == resumed["optimizer"]["state"].keys()
    for index, state in full["optimizer"]["state"].items():
        for key, value in state.items():
            other = resumed["optimizer"]["state"][index][key]
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(other)), (index, key)
    part_log = [json.loads(x) for x in (part / "log.jsonl").read_text().splitlines()]
    full_log = [json.loads(x) for x in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in part_log] == list(range(1, 9))
    assert [r["lr"] for r in part_log] == [r["lr"] for r in full_log]
    assert len(load(part / "iter_6.pth")["rng_states"]) == 1  # one per process
    assert not stale.exists()  # temporary files of killed writes are removed when a run starts


# ---------------------------------------------------------------------------------------------
# 6. Ctrl-C / SIGTERM: one line naming the last checkpoint and the resume command, exit 130
# ---------------------------------------------------------------------------------------------
def _start(args: list[str], new_session: bool = False) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=new_session, preexec_fn=_default_sigint,
    )


def _interrupt_after_first_checkpoint(process: subprocess.Popen, send) -> tuple[str, str]:
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith("saved checkpoint"):
            break
    else:
        process.wait()
        pytest.fail("no checkpoint before the end:\n" + "".join(seen) + process.stderr.read())
    send()
    out, err = process.communicate(timeout=120)
    return "".join(seen) + out, err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_stops_cleanly_naming_checkpoint_and_resume_command(tmp_path, data_root, signum):
    work_dir = tmp_path / "run"
    args = [*TINY, *data_args(data_root), "--epochs", "50", "--work-dir", str(work_dir)]
    process = _start(args)
    out, err = _interrupt_after_first_checkpoint(process, lambda: process.send_signal(signum))
    assert process.returncode == 130, err[-3000:]
    line = error_line(err)
    assert "interrupted" in line and "the last checkpoint is" in line and "resume with: python " in line, line
    checkpoint = Path(line.split("the last checkpoint is ")[1].split(" (iteration")[0])
    assert checkpoint.parent == work_dir and checkpoint.name.startswith("epoch_")
    assert (work_dir / "last_checkpoint").read_text().strip() == checkpoint.name
    assert load(checkpoint)["iteration"] >= 2
    assert not [p for p in work_dir.iterdir() if p.name.endswith(".tmp")]
    if signum == signal.SIGINT:
        # The printed command resumes (one more iteration here).
        command = shlex.split(line.split("resume with: ")[1])
        assert command[0] == "python" and command[-1] == "--resume"
        iteration = load(checkpoint)["iteration"]
        with open(work_dir / "log.jsonl", "a") as handle:
            handle.write('{"mode": "train", "ep')  # as if killed in the middle of a log line
        resumed = subprocess.run([sys.executable, *command[1:], "--max-iters", str(iteration + 1)], cwd=REPO, env=_env(),
                                 capture_output=True, text=True, timeout=300)
        assert_ok(resumed)
        assert f"resuming from {checkpoint}" in resumed.stdout
        # The log holds each iteration once: the records after the checkpoint were dropped on resume.
        records = [json.loads(x) for x in (work_dir / "log.jsonl").read_text().splitlines()]
        assert [r["iter"] for r in records] == list(range(1, iteration + 2))


def test_ctrl_c_reaches_two_processes_cleanly(tmp_path, data_root):
    work_dir = tmp_path / "ddp"
    args = [*TINY, *data_args(data_root), "--gpus", "2", "--device", "cpu", "--epochs", "50", "--work-dir", str(work_dir)]
    process = _start(args, new_session=True)  # its own process group: Ctrl-C at a terminal reaches all of it
    out, err = _interrupt_after_first_checkpoint(process, lambda: os.killpg(process.pid, signal.SIGINT))
    assert process.returncode == 130, err[-3000:]
    line = error_line(err)  # rank 0 only, no traceback of any process
    assert "interrupted (Ctrl-C)" in line and "--gpus 2" in line and line.endswith("--resume"), line
    assert load(work_dir / (work_dir / "last_checkpoint").read_text().strip())["world_size"] == 2


_INTERRUPTING_SAVE = '''
import os, signal, sys, torch
sys.path.insert(0, {repo!r})
import train

real_save = torch.save
AT = {at!r}  # write calls of the epoch-2 checkpoint at which a SIGINT arrives

class Writer:
    def __init__(self, handle):
        self.handle, self.calls = handle, 0
    def write(self, data):
        self.calls += 1
        if self.calls in AT:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C in the middle of torch.save
        return self.handle.write(data)
    def flush(self):
        self.handle.flush()

def save(obj, f, *args, **kwargs):
    if isinstance(obj, dict) and obj.get("epoch") == 2:
        f = Writer(f)
    return real_save(obj, f, *args, **kwargs)

torch.save = save
sys.exit(train.main(sys.argv[1:]))
'''


@pytest.mark.parametrize("presses", [1, 2], ids=["once", "twice"])
def test_ctrl_c_during_a_checkpoint_write(tmp_path, data_root, presses):
    """Once: the write completes, then the run stops cleanly. Twice: the write is abandoned (no
    temporary file left), the previous checkpoint stays the last one. Never torch.save's
    'RuntimeError: [enforce fail ...]'."""
    driver = tmp_path / "driver.py"
    driver.write_text(_INTERRUPTING_SAVE.format(repo=str(REPO), at=(3, 6)[:presses]))
    work_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(driver), *TINY, *data_args(data_root), "--epochs", "3", "--work-dir", str(work_dir)],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300, preexec_fn=_default_sigint,
    )
    line = assert_clean_error(result, 130, "interrupted (Ctrl-C) at iteration 4 (epoch 3)")
    assert "RuntimeError" not in result.stderr and "enforce fail" not in result.stderr
    assert not [p for p in work_dir.iterdir() if p.name.endswith(".tmp")]
    last = "epoch_2.pth" if presses == 1 else "epoch_1.pth"
    assert (work_dir / "last_checkpoint").read_text().strip() == last
    assert f"the last checkpoint is {work_dir / last}" in line
    assert load(work_dir / last)["iteration"] == (4 if presses == 1 else 2)
    assert load(work_dir / "epoch_1.pth")["iteration"] == 2  # the previous one still loads
    if presses == 2:
        assert "while writing" in line and "(not written)" in line
        assert not (work_dir / "epoch_2.pth").exists()


def test_atomic_save_defers_one_interrupt_and_aborts_on_the_second(tmp_path):
    from libra.engine.checkpoint import atomic_save

    handler = signal.getsignal(signal.SIGINT)
    target = tmp_path / "model.pth"
    atomic_save({"w": torch.zeros(3)}, target)

    class Interrupting:
        def __init__(self, times):
            self.times = times

        def __reduce__(self):
            for _ in range(self.times):
                signal.raise_signal(signal.SIGINT)
            return (int, (7,))

    with pytest.raises(KeyboardInterrupt):
        atomic_save({"w": torch.ones(3), "x": Interrupting(1), "v": torch.ones(2)}, target)
    assert torch.equal(load(target)["w"], torch.ones(3)) and load(target)["x"] == 7  # completed first
    with pytest.raises(KeyboardInterrupt):  # not RuntimeError
        atomic_save({"w": torch.full((3,), 2.0), "x": Interrupting(2)}, target)
    assert torch.equal(load(target)["w"], torch.ones(3))  # abandoned: the previous file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pth"]
    assert signal.getsignal(signal.SIGINT) is handler  # restored


# ---------------------------------------------------------------------------------------------
# 7. Every divergence ends with exit code 3 and names what diverged
# ---------------------------------------------------------------------------------------------
class _NaNInside(torch.nn.Module):
    """Finite weights; an inner module's output overflows to NaN, then an op rejects it (as
    torch.bincount did with the RoI levels of NaN proposals)."""

    def __init__(self, error: Exception, make_nan: bool = True) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.rpn = torch.nn.Identity()
        self.error, self.make_nan = error, make_nan

    def forward(self, batch, mode="loss"):
        return self.loss(batch)

    def loss(self, batch):
        boxes = self.rpn(batch.images * (float("inf") if self.make_nan else 1.0) * 0.0 + self.weight)
        if self.error is not None:
            raise self.error
        return {"loss_cls": self.weight * boxes.mean()}


def _toy_run(tmp_path, model):
    from libra.engine.distributed import DistributedContext
    from libra.engine.lr_schedule import WarmupMultiStepLR
    from libra.engine.trainer import TrainConfig, Trainer
    from libra.structures import Batch

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = WarmupMultiStepLR(optimizer, step_epochs=[1], warmup_iters=0)
    batch = Batch(torch.ones(1, 3, 4, 4), [(4, 4)], targets=[{"img_shape": (4, 4)}])
    config = TrainConfig(num_epochs=1, max_iters=10, iters_per_epoch=2, work_dir=tmp_path, model_name="toy")
    ctx = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    trainer = Trainer(model, optimizer, scheduler, torch.amp.GradScaler("cuda", enabled=False),
                      lambda epoch, skip: [batch] * (2 - skip), ctx, config, print_fn=lambda line: None)
    trainer.train()


def test_forward_errors_with_non_finite_activations_are_divergence(tmp_path):
    from libra.engine.trainer import NonFiniteLossError

    bincount = RuntimeError("bincount only supports 1-d non-negative integral inputs.")
    with pytest.raises(NonFiniteLossError, match=r"diverged at iteration 1 .*output of rpn .*NaN.*bincount"):
        _toy_run(tmp_path, _NaNInside(bincount))
    # A module that rejects the NaN boxes with a ValueError (exit 1, "bad input", otherwise).
    rejected = ValueError("RoIs must be finite: got non-finite boxes")
    with pytest.raises(NonFiniteLossError, match="diverged.*output of rpn.*RoIs must be finite"):
        _toy_run(tmp_path, _NaNInside(rejected))
    # Without evidence of non-finite values an error stays what it is: a bad input's message (even
    # one that says "not finite"), a bug's traceback.
    bad_target = ValueError("targets[0]['boxes'][1] = [5, 5, 1, 1] is not finite or has x2 < x1 / y2 < y1")
    for error in (bad_target, RuntimeError("shape mismatch")):
        with pytest.raises(type(error), match=str(error)[:12].replace("[", r"\[")) as info:
            _toy_run(tmp_path, _NaNInside(error, make_nan=False))
        assert not isinstance(info.value, NonFiniteLossError)


def _old_map_rois_to_levels(rois, num_levels, finest_scale=56.0):
    """The level mapping before NaN RoIs were mapped to level 0: NaN proposals become an invalid
    index and torch.bincount raises (the issue's failure; stands for any op rejecting NaN boxes)."""
    widths = rois[:, 3] - rois[:, 1]
    heights = rois[:, 4] - rois[:, 2]
    scale = torch.sqrt((widths * heights).clamp(min=0))
    levels = torch.floor(torch.log2(scale / finest_scale + 1e-6))
    return levels.clamp(0, num_levels - 1).long()


@pytest.mark.parametrize("strict_op", ["old_level_mapping", "extractor_rejecting_nan_rois"])
def test_large_lr_divergence_exits_3_even_where_nan_proposals_crash_an_op(tmp_path, data_root, monkeypatch, capsys,
                                                                          strict_op):
    sys.path.insert(0, str(REPO))
    import train  # noqa: E402

    import libra.roi_heads.roi_extractor as extractor

    if strict_op == "old_level_mapping":  # the torch.bincount error
        monkeypatch.setattr(extractor, "map_rois_to_levels", _old_map_rois_to_levels)
    else:  # a RoI extractor that rejects non-finite boxes with a clear ValueError (exit 1 unless mapped)
        real_forward = extractor.MultiLevelRoIExtractor.forward

        def strict_forward(self, feats, rois):
            if not bool(torch.isfinite(rois).all()):
                raise ValueError("RoIs must be finite boxes, got NaN / inf")
            return real_forward(self, feats, rois)

        monkeypatch.setattr(extractor.MultiLevelRoIExtractor, "forward", strict_forward)
    # (lr, seed) pairs whose NaN proposals reached torch.bincount with finite weights (or huge ones) before.
    for lr, seed in [(0.1, 1), (0.05, 2), (2.0, 2)]:
        code = train.main([*TINY, *data_args(data_root, num_train=8), "--optimizer", "sgd", "--lr", str(lr), "--seed",
                           str(seed), "--grad-clip", "0", "--warmup-iters", "0", "--log-interval", "100", "--epochs", "3",
                           "--work-dir", str(tmp_path / f"lr{lr}_{seed}")])
        err = capsys.readouterr().err
        assert code == 3, (lr, seed, err[-2000:])
        assert "diverged" in error_line(err), (lr, seed)


def test_absurd_lr_exits_3_with_one_line_naming_the_divergence(tmp_path, data_root):
    result = run_script("train.py", *TINY, *data_args(data_root), "--optimizer", "sgd", "--lr", "1e4",
                        "--grad-clip", "0", "--epochs", "3", "--work-dir", str(tmp_path / "run"))
    assert_clean_error(result, 3, "training diverged", "iteration")


# ---------------------------------------------------------------------------------------------
# 10. A new run into a work dir that holds another run: refused unless --resume / --overwrite
# ---------------------------------------------------------------------------------------------
def test_work_dir_with_a_previous_run_is_refused_unless_overwrite(tmp_path, data_root):
    work_dir = tmp_path / "old"
    work_dir.mkdir()
    for name in ("config.json", "log.jsonl", "epoch_1.pth", "last_checkpoint", "metrics.json"):
        (work_dir / name).write_text("old run\n")
    (work_dir / "notes.txt").write_text("mine\n")
    (work_dir / ".epoch_2.pth.k3x_9q2a.tmp").write_bytes(b"partial")  # a killed write
    (work_dir / ".my.tmp").write_text("not libra's\n")
    before = snapshot(work_dir)
    common = [*TINY, *data_args(data_root), "--epochs", "1", "--max-iters", "0", "--work-dir", str(work_dir)]
    result = run_script("train.py", *common)
    assert_clean_error(result, 1, str(work_dir), "already holds a libra run", "--resume", "--overwrite")
    assert snapshot(work_dir) == before
    assert_clean_error(run_script("train.py", *common, "--overwrite", "--resume"), 1, "--overwrite", "--resume")
    assert snapshot(work_dir) == before

    assert_ok(run_script("train.py", *common, "--overwrite"))
    assert sorted(p.name for p in work_dir.iterdir()) == [".my.tmp", "config.json", "notes.txt"]
    assert json.loads((work_dir / "config.json").read_text())["overwrite"] is True
    assert (work_dir / "notes.txt").read_text() == "mine\n"
    # --resume with a pointer to a checkpoint that is gone.
    (work_dir / "last_checkpoint").write_text("epoch_9.pth\n")
    assert_clean_error(run_script("train.py", *common, "--resume"), 1, "last_checkpoint names 'epoch_9.pth'",
                       "--resume PATH")
