"""The second sweep of bad inputs and faults (issue 18): each test reproduces one reported case.

1. two runs in one work dir; 2. checkpoints unpickled with code execution; 3. invalid ground-truth
masks of the evaluation split; 4. every training mask invalid; 5. writes that fail (disk full,
read-only, a file in the way) and output folders checked only after the work; 6. 16-bit PNGs
clipped to 255; 7. very elongated images; 8. LVIS categories without a frequency; 9. an all-crowd
training split; 10. a process of a multi-node run killed; 11. batch-dependent predictions of the
Libra models.

Every run is tiny (synthetic 64 x 64 images, a thin one-block-per-stage detector, 1-2 iterations);
the scripts run as subprocesses, as a user runs them, except where a failure has to be injected
(then the script's ``main`` runs in-process). The disk-full and read-only cases also run for real
in a private mount namespace with a tiny tmpfs (``unshare``; skipped where that is not allowed).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

TINY = [
    "--synthetic-image-size", "64", "--min-size", "64", "--max-size", "64",
    "--width-per-group", "8", "--stage-blocks", "1", "1", "1", "1", "--set", "fpn_channels=32",
    "--set", "fc_channels=64", "--set", "roi_batch_size=32", "--set", "rpn_batch_size=64",
    "--workers", "0", "--threads", "1", "--log-interval", "1", "--warmup-iters", "1",
]
TINY_MODEL = dict(width_per_group=8, stage_blocks=(1, 1, 1, 1), fpn_channels=32, fc_channels=64, roi_batch_size=32,
                  rpn_batch_size=64)
EVAL_TINY = [
    "--min-size", "64", "--max-size", "64", "--threads", "1", "--workers", "0",
]


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("LIBRA_DEBUG", None)
    return env


def run_script(script: str, *args: str, timeout: float = 300, prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*(prefix or []), sys.executable, str(REPO / script), *args], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"


def error_line(stderr: str) -> str:
    """The one 'error: ...' line of a failed run (and no traceback)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


def assert_clean_error(result: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    assert result.returncode == code, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    line = error_line(result.stderr)
    for fragment in fragments:
        assert fragment in line, line
    return line


def data_args(root: Path, num_train: int = 4, no_eval: bool = True) -> list[str]:
    return ["--data-root", str(root), "--synthetic-num-train", str(num_train), "--synthetic-num-val", "2",
            "--batch-size", "2", *(["--no-eval"] if no_eval else [])]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    from libra.data.synthetic import ensure_synthetic_dataset

    root = tmp_path_factory.mktemp("sweep2") / "data"
    ensure_synthetic_dataset(root, num_train=4, num_val=2, image_size=(64, 64), seed=0)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_root) -> Path:
    """One epoch (2 iterations) of the tiny detector: a work dir holding epoch_1.pth."""
    work_dir = tmp_path_factory.mktemp("trained") / "run"
    assert_ok(run_script("train.py", *TINY, *data_args(data_root), "--epochs", "1", "--work-dir", str(work_dir)))
    return work_dir


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


_UNSHARE = shutil.which("unshare")


def _can_mount() -> bool:
    if _UNSHARE is None:
        return False
    probe = subprocess.run([_UNSHARE, "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt 2>/dev/null || "
                            "mount -t tmpfs -o size=64k tmpfs /tmp"], capture_output=True, timeout=30)
    return probe.returncode == 0


needs_mount = pytest.mark.skipif(not _can_mount(), reason="needs unshare -rm and tmpfs mounts (user namespaces)")


def in_small_fs(folder: Path, size: str, read_only: bool = False) -> list[str]:
    """A command prefix that runs the command in a private mount namespace where ``folder`` is a fresh
    tmpfs of ``size`` (read-only with ``read_only``): a real full or read-only disk, no root needed."""
    folder.mkdir(parents=True, exist_ok=True)
    mount = f"mount -t tmpfs -o size={size} tmpfs {folder}" + (f" && mount -o remount,ro {folder}" if read_only else "")
    return [_UNSHARE, "-rm", "sh", "-c", f'{mount} && exec "$@"', "sh"]


# ---------------------------------------------------------------------------------------------
# 1. Two runs in one work dir: the second is refused at once, naming the running one
# ---------------------------------------------------------------------------------------------
def test_a_locked_work_dir_is_refused_naming_the_run_that_holds_it(tmp_path, data_root):
    from libra.engine.run_dir import LOCK_NAME, WorkDirLock

    work_dir = tmp_path / "run"
    lock = WorkDirLock(work_dir, "train.py", "train.py --epochs 12")
    assert lock.acquire() is None
    try:
        result = run_script("train.py", *TINY, *data_args(data_root), "--epochs", "1", "--work-dir", str(work_dir))
        assert_clean_error(result, 1, f"--work-dir {work_dir} is in use by another run", f"process {os.getpid()}",
                           "train.py --epochs 12", "another --work-dir")
        assert sorted(p.name for p in work_dir.iterdir()) == [LOCK_NAME]  # nothing of the second run
        # --overwrite and --resume do not get past it either, nor does eval.py into that folder.
        assert_clean_error(run_script("train.py", *TINY, *data_args(data_root), "--overwrite", "--work-dir",
                                      str(work_dir)), 1, "is in use by another run")
    finally:
        lock.release()
    assert not work_dir.exists()  # the folder made for the lock goes with it


def test_two_runs_started_together_into_one_work_dir(tmp_path, data_root):
    work_dir = tmp_path / "run"
    command = [sys.executable, str(REPO / "train.py"), *TINY, *data_args(data_root), "--epochs", "2",
               "--work-dir", str(work_dir)]
    processes = [subprocess.Popen(command, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]
    results = [(p, *p.communicate(timeout=300)) for p in processes]
    codes = sorted(p.returncode for p, _, _ in results)
    assert codes == [0, 1], [(p.returncode, err[-1500:]) for p, _, err in results]
    winner = next(p for p, _, _ in results if p.returncode == 0)
    loser_err = next(err for p, _, err in results if p.returncode == 1)
    assert f"process {winner.pid}" in error_line(loser_err) and "in use by another run" in loser_err
    records = [json.loads(line) for line in (work_dir / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records] == [1, 2, 3, 4]  # one run's log, not two interleaved
    assert not (work_dir / ".libra.lock").exists()  # released at the end


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_note(tmp_path, data_root):
    work_dir = tmp_path / "run"
    process = subprocess.Popen([sys.executable, str(REPO / "train.py"), *TINY, *data_args(data_root), "--epochs", "50",
                                "--work-dir", str(work_dir)], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        if line.startswith("saved checkpoint"):
            break
    process.kill()  # kill -9: no handler runs, the kernel drops the lock
    process.communicate(timeout=60)
    left = json.loads((work_dir / ".libra.lock").read_text())
    assert left["pid"] == process.pid
    result = run_script("train.py", *TINY, *data_args(data_root), "--epochs", "50", "--max-iters", "3", "--resume",
                        "--work-dir", str(work_dir))
    assert_ok(result)
    assert "did not end cleanly" in result.stderr and f"process {process.pid}" in result.stderr
    assert not (work_dir / ".libra.lock").exists()


# ---------------------------------------------------------------------------------------------
# 2. Checkpoints are read weights-only: a crafted file never runs; old ones need the opt-in
# ---------------------------------------------------------------------------------------------
_CRAFT = '''
import os, sys, torch
class Payload:
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[2],))
torch.save({"format": "libra-checkpoint", "model": {}, "model_name": "libra_faster_rcnn_r50_fpn", "num_classes": 4,
            "args": {"dataset": "synthetic"}, "epoch": 1, "iteration": 1, "payload": Payload()}, sys.argv[1])
'''


@pytest.fixture
def crafted(tmp_path) -> tuple[Path, Path]:
    path, marker = tmp_path / "crafted.pth", tmp_path / "code_ran"
    script = tmp_path / "craft.py"
    script.write_text(_CRAFT)
    subprocess.run([sys.executable, str(script), str(path), str(marker)], check=True, env=_env(), timeout=120)
    assert not marker.exists()
    return path, marker


@pytest.mark.parametrize("command", ["eval", "resume", "analyze-bfp", "analyze-loss-curves"])
def test_a_crafted_checkpoint_runs_no_code(tmp_path, data_root, crafted, command):
    path, marker = crafted
    if command == "eval":
        result = run_script("eval.py", "--checkpoint", str(path), "--work-dir", str(tmp_path / "eval"))
    elif command == "resume":
        result = run_script("train.py", *TINY, *data_args(data_root), "--resume", str(path), "--work-dir",
                            str(tmp_path / "work"))
    elif command == "analyze-bfp":
        result = run_script("analyze.py", "bfp", "--checkpoint", str(path), "--out-dir", str(tmp_path / "figs"))
    else:
        result = run_script("analyze.py", "loss-curves", "--checkpoint", str(path), "--out-dir", str(tmp_path / "figs"))
    assert_clean_error(result, 1, str(path), "run code", "posix.system", "--trust-checkpoint")
    assert not marker.exists()


def test_crafted_files_run_no_code_in_the_python_loaders(tmp_path, crafted):
    from libra.backbone import build_resnet, load_pretrained
    from libra.engine.loading import load_detector
    from libra.mmdet_checkpoint import load_mmdet_checkpoint
    from libra.presets import build_model
    from libra.safe_load import UntrustedCheckpointError

    path, marker = crafted
    with pytest.raises(UntrustedCheckpointError, match="trust_checkpoint=True"):
        load_detector(path)
    with pytest.raises(UntrustedCheckpointError, match="trust=True"):
        load_mmdet_checkpoint(build_model("faster_rcnn_r50_fpn", 4, **TINY_MODEL), path)
    with pytest.raises(UntrustedCheckpointError, match="--trust-checkpoint"):
        load_pretrained(build_resnet("resnet50", stage_blocks=(1, 1, 1, 1), width_per_group=8), path)
    assert not marker.exists()
    assert "--trust-checkpoint" in run_script("eval.py", "--help").stdout
    assert "--trust-checkpoint" in run_script("train.py", "--help").stdout


def test_checkpoints_load_weights_only_and_older_ones_need_the_opt_in(tmp_path, trained, data_root):
    checkpoint = torch.load(trained / "epoch_1.pth", map_location="cpu", weights_only=True)
    assert isinstance(checkpoint["rng_states"][0]["numpy"]["keys"], torch.Tensor)
    # A checkpoint of an older libra: NumPy's state as the tuple with an array.
    old = dict(checkpoint)
    state = checkpoint["rng_states"][0]["numpy"]
    old["rng_states"] = [dict(checkpoint["rng_states"][0], numpy=(
        state["kind"], state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"], state["cached_gaussian"]))]
    old_path = tmp_path / "old.pth"
    torch.save(old, old_path)
    eval_args = ["--checkpoint", str(old_path), *data_args(data_root, no_eval=False)[:6], *EVAL_TINY]
    assert_clean_error(run_script("eval.py", *eval_args, "--work-dir", str(tmp_path / "e1")), 1, "numpy",
                       "--trust-checkpoint")
    assert_ok(run_script("eval.py", *eval_args, "--trust-checkpoint", "--work-dir", str(tmp_path / "e2")))
    # --resume of it continues with the opt-in (its generator state restored from the old form).
    work = tmp_path / "resumed"
    result = run_script("train.py", *TINY, *data_args(data_root), "--epochs", "2", "--resume", str(old_path),
                        "--work-dir", str(work))
    assert_clean_error(result, 1, "--trust-checkpoint")
    assert_ok(run_script("train.py", *TINY, *data_args(data_root), "--epochs", "2", "--resume", str(old_path),
                         "--trust-checkpoint", "--work-dir", str(work)))
    assert torch.load(work / "epoch_2.pth", weights_only=True)["iteration"] == 4


# ---------------------------------------------------------------------------------------------
# 5. Writes that fail: one line (what, where, why), a documented exit code, earlier files intact
# ---------------------------------------------------------------------------------------------
def test_work_dir_below_a_file_is_one_line(tmp_path, data_root):
    (tmp_path / "afile").write_text("x")
    result = run_script("train.py", *TINY, *data_args(data_root), "--epochs", "1", "--work-dir",
                        str(tmp_path / "afile" / "sub"))
    assert_clean_error(result, 1, str(tmp_path / "afile"), "is a file, not a folder")


def test_eval_and_analyze_check_their_output_folder_before_the_work(tmp_path, trained, data_root):
    checkpoint = trained / "epoch_1.pth"
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the output folder should be")
    result = run_script("eval.py", "--checkpoint", str(checkpoint), *EVAL_TINY, "--work-dir", str(blocked / "out"))
    assert_clean_error(result, 1, str(blocked), "is a file, not a folder")
    assert "evaluating" not in result.stdout  # refused before the model ran
    result = run_script("eval.py", "--checkpoint", str(checkpoint), *EVAL_TINY, "--work-dir", str(tmp_path / "ok"),
                        "--save-proposals", str(blocked / "proposals.pt"))
    assert_clean_error(result, 1, "--save-proposals", "is a file, not a folder")
    assert "evaluating" not in result.stdout
    for command in (["bfp"], ["neg-iou", "--images", "1"]):
        result = run_script("analyze.py", *command, "--checkpoint", str(checkpoint), "--out-dir", str(blocked))
        assert_clean_error(result, 1, str(blocked), "is a file")
    result = run_script("analyze.py", "curves", "--work-dir", str(trained), "--out-dir", str(blocked / "x"))
    assert_clean_error(result, 1, "is a file")
    assert blocked.read_text() == "a file where the output folder should be"


def _fail_writes(monkeypatch, name_part: str, code: int = errno.ENOSPC) -> None:
    """Make the atomic writer's flush to disk fail (as a full disk makes it) for temporary files of
    destinations whose name contains ``name_part``."""
    import libra.atomic_io as atomic_io

    real_fsync = os.fsync

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        if name_part in os.path.basename(target):
            raise OSError(code, os.strerror(code))
        return real_fsync(fd)

    monkeypatch.setattr(atomic_io.os, "fsync", fsync)


def test_disk_full_during_a_checkpoint_is_one_line_and_keeps_the_previous_one(tmp_path, data_root, monkeypatch, capsys):
    sys.path.insert(0, str(REPO))
    import train  # noqa: E402

    work_dir = tmp_path / "run"
    assert train.main([*TINY, *data_args(data_root), "--epochs", "1", "--work-dir", str(work_dir)]) == 0
    before = (work_dir / "epoch_1.pth").read_bytes()
    capsys.readouterr()
    _fail_writes(monkeypatch, "epoch_2.pth")
    code = train.main([*TINY, *data_args(data_root), "--epochs", "2", "--resume", "--work-dir", str(work_dir)])
    err = capsys.readouterr().err
    assert code == 4, err[-3000:]
    line = error_line(err)
    assert f"cannot write checkpoint {work_dir / 'epoch_2.pth'}: no space left on device" in line, line
    assert "the last checkpoint is" in line and str(work_dir / "epoch_1.pth") in line and "--resume" in line, line
    assert (work_dir / "epoch_1.pth").read_bytes() == before
    assert (work_dir / "last_checkpoint").read_text().strip() == "epoch_1.pth"
    assert not [p for p in work_dir.iterdir() if p.name.endswith(".tmp")] and not (work_dir / ".libra.lock").exists()


@pytest.mark.parametrize("target", ["metrics.json", "detections.json"])
def test_eval_output_write_failure_is_one_line_and_keeps_earlier_outputs(tmp_path, trained, monkeypatch, capsys, target):
    sys.path.insert(0, str(REPO))
    import eval as eval_script  # noqa: E402

    out = tmp_path / "eval"
    flags = ["--checkpoint", str(trained / "epoch_1.pth"), *EVAL_TINY, "--work-dir", str(out)]
    assert eval_script.main(flags) == 0
    before = snapshot(out)
    capsys.readouterr()
    _fail_writes(monkeypatch, target, errno.EROFS)
    code = eval_script.main(flags)
    err = capsys.readouterr().err
    assert code == 4, err[-3000:]
    assert f"cannot write {out / target}: read-only file system" in error_line(err)
    assert snapshot(out) == before


def test_save_proposals_write_failure_is_one_line(tmp_path, trained, monkeypatch, capsys):
    sys.path.insert(0, str(REPO))
    import eval as eval_script  # noqa: E402

    _fail_writes(monkeypatch, "props.pt")
    code = eval_script.main(["--checkpoint", str(trained / "epoch_1.pth"), *EVAL_TINY, "--work-dir", str(tmp_path / "e"),
                             "--save-proposals", str(tmp_path / "props.pt")])
    err = capsys.readouterr().err
    assert code == 4 and "cannot write" in error_line(err) and "props.pt: no space left on device" in err
    assert not (tmp_path / "props.pt").exists()


def test_analyze_figure_write_failure_is_one_line(tmp_path, trained, monkeypatch, capsys):
    sys.path.insert(0, str(REPO))
    import analyze  # noqa: E402

    _fail_writes(monkeypatch, "curves.png")
    code = analyze.main(["curves", "--work-dir", str(trained), "--out-dir", str(tmp_path / "figs")])
    err = capsys.readouterr().err
    assert code == 4 and "curves.png: no space left on device" in error_line(err)


@needs_mount
def test_a_really_full_disk_during_training(tmp_path, data_root):
    """The work dir on a tmpfs with room for one checkpoint: the second write fails with ENOSPC."""
    probe = tmp_path / "probe"
    assert_ok(run_script("train.py", *TINY, *data_args(data_root), "--epochs", "1", "--work-dir", str(probe)))
    size = (probe / "epoch_1.pth").stat().st_size
    work_dir = tmp_path / "small"
    result = run_script("train.py", *TINY, *data_args(data_root), "--epochs", "3", "--work-dir", str(work_dir),
                        prefix=in_small_fs(work_dir, f"{int(size * 1.6) // 1024 + 64}k"))
    line = assert_clean_error(result, 4, "cannot write checkpoint", "epoch_2.pth", "no space left on device (ENOSPC)",
                              "epoch_1.pth", "--resume")
    assert "free space" in line


@needs_mount
def test_read_only_output_folders_are_refused_before_the_work(tmp_path, trained, data_root):
    ro = tmp_path / "ro"
    prefix = in_small_fs(ro, "1m", read_only=True)
    result = run_script("eval.py", "--checkpoint", str(trained / "epoch_1.pth"), *EVAL_TINY, "--work-dir",
                        str(ro / "eval"), prefix=prefix)
    assert_clean_error(result, 1, str(ro / "eval"), "read-only file system")
    assert "evaluating" not in result.stdout
    result = run_script("train.py", *TINY, *data_args(data_root), "--epochs", "1", "--work-dir", str(ro / "run"),
                        prefix=prefix)
    assert_clean_error(result, 1, "read-only file system")
    result = run_script("analyze.py", "bfp", "--checkpoint", str(trained / "epoch_1.pth"), "--out-dir", str(ro / "f"),
                        prefix=prefix)
    assert_clean_error(result, 1, "read-only file system")
