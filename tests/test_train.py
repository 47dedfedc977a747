"""End-to-end tests of train.py / eval.py on tiny synthetic data (CPU).

The scripts run as subprocesses (as a user would run them) except where a failure has to be
injected (interrupted checkpoint write), which runs ``train.main`` in-process. Every run uses a
small detector (thin ResNet-50, 32-channel FPN) and tiny images so the whole file stays within a
few minutes on 2 cores.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# A small, fast detector and data set for every run (all are ordinary command-line flags).
TINY = [
    "--synthetic-image-size", "64", "--min-size", "64", "--max-size", "64",
    "--width-per-group", "8", "--set", "fpn_channels=32", "--set", "fc_channels=64",
    "--set", "roi_batch_size=32", "--set", "rpn_batch_size=64",
    "--workers", "0", "--threads", "1", "--log-interval", "1", "--warmup-iters", "5",
]


def run_script(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("LIBRA_DEBUG", None)
    return subprocess.run(
        [sys.executable, str(REPO / script), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"


def assert_clean_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Non-zero exit, a one-line 'error: ...' message naming the problem, no traceback."""
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    """One tiny synthetic data set shared by the runs of this module (generated on first use)."""
    return tmp_path_factory.mktemp("synthetic") / "data"


def load_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


# ---------------------------------------------------------------------------------------------
# Learning, multi-process, resume
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def memorize_root(tmp_path_factory, synthetic_root) -> Path:
    """COCO layout whose val2017 is a copy of train2017 (4 synthetic 128 x 128 images): a detector
    that learns anything at all scores far above an untrained one on it, within a minute."""
    from libra.data.synthetic import ensure_synthetic_dataset

    paths = ensure_synthetic_dataset(synthetic_root / "memorize_src", num_train=4, num_val=1, image_size=(128, 128))
    root = tmp_path_factory.mktemp("memorize") / "coco"
    (root / "annotations").mkdir(parents=True)
    for split in ("train2017", "val2017"):
        shutil.copytree(paths["train_images"], root / split)
        shutil.copy(paths["train_ann"], root / "annotations" / f"instances_{split}.json")
    return root


def test_short_training_beats_untrained_model(tmp_path, memorize_root):
    # From scratch with the synthetic recipe's knobs: trainable BN, nothing frozen, AdamW, clipped
    # gradients. (SGD at lr 0.02 from scratch learns or not depending on the initialisation draw.)
    common = TINY + [
        "--dataset", "coco", "--data-root", str(memorize_root), "--min-size", "128", "--max-size", "128",
        "--stage-blocks", "1", "1", "1", "1", "--backbone-norm", "bn", "--frozen-stages", "-1",
        "--grad-clip", "10", "--warmup-iters", "10", "--optimizer", "adamw", "--lr", "3e-4", "--batch-size", "4",
        "--checkpoint-interval", "100", "--log-interval", "10",
    ]
    # --max-iters 0: no step at all; the final evaluation measures the untrained detector.
    untrained = run_script("train.py", *common, "--epochs", "1", "--max-iters", "0", "--work-dir", str(tmp_path / "untrained"))
    assert_ok(untrained)
    trained = run_script("train.py", *common, "--epochs", "60", "--work-dir", str(tmp_path / "trained"), timeout=400)
    assert_ok(trained)
    ap50_untrained = json.loads((tmp_path / "untrained" / "metrics.json").read_text())["AP50"]
    ap50_trained = json.loads((tmp_path / "trained" / "metrics.json").read_text())["AP50"]
    assert ap50_trained > max(0.3, ap50_untrained + 0.25), (ap50_untrained, ap50_trained)
    # The training log: one JSON line per logged iteration with every loss, lr, times, memory.
    records = [json.loads(line) for line in (tmp_path / "trained" / "log.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["mode"] == "train"]
    assert [r["iter"] for r in train_records] == [10, 20, 30, 40, 50, 60]
    for key in ("loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "lr", "time", "data_time", "memory_mb"):
        assert key in train_records[-1]
    assert train_records[-1]["lr"] == pytest.approx(3e-4 * 0.01)  # after the steps at epochs 40 and 55
    assert [r for r in records if r["mode"] == "val"][-1]["AP50"] == pytest.approx(ap50_trained)
    assert (tmp_path / "trained" / "losses.png").stat().st_size > 1000
    assert sorted(p.name for p in (tmp_path / "trained").glob("*.pth")) == ["epoch_60.pth"]
    assert "Average Precision" in trained.stdout and "AP50" in trained.stdout


def test_two_process_cpu_training_checkpoints_and_evaluates(tmp_path, synthetic_root):
    work_dir = tmp_path / "ddp"
    result = run_script(
        "train.py", *TINY, "--gpus", "2", "--device", "cpu", "--data-root", str(synthetic_root / "ddp"),
        "--synthetic-num-train", "8", "--synthetic-num-val", "4", "--batch-size", "1", "--epochs", "1",
        "--work-dir", str(work_dir),
    )
    assert_ok(result)
    # 8 images / (2 processes x 1 image) = 4 iterations in the epoch.
    checkpoint = load_state(work_dir / "epoch_1.pth")
    assert checkpoint["iteration"] == 4 and checkpoint["epoch"] == 1
    assert checkpoint["model_name"] == "libra_faster_rcnn_r50_fpn" and checkpoint["num_classes"] == 4
    assert not any(k.startswith("module.") for k in checkpoint["model"])  # saved unwrapped from DDP
    metrics = json.loads((work_dir / "metrics.json").read_text())
    assert set(metrics) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    detections = json.loads((work_dir / "detections.json").read_text())
    assert {d["image_id"] for d in detections} <= {1, 2, 3, 4}
    # Only rank 0 logs: each iteration appears once.
    assert result.stdout.count("iter 4/4") == 1
    # Two-process evaluation of the checkpoint gathers all 4 images on rank 0.
    evaluation = run_script("eval.py", "--checkpoint", str(work_dir / "epoch_1.pth"), "--gpus", "2", "--device", "cpu",
                            "--workers", "0", "--show", "2", "--show-score-thr", "0", "--work-dir", str(tmp_path / "eval"))
    assert_ok(evaluation)
    eval_metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert eval_metrics["AP50"] == pytest.approx(metrics["AP50"], abs=1e-6)
    assert len(list((tmp_path / "eval" / "show").glob("*.png"))) == 2
    # Proposal recall and inference speed, single process.
    proposals = run_script("eval.py", "--checkpoint", str(work_dir / "epoch_1.pth"), "--proposals", "--fps",
                           "--fps-images", "2", "--workers", "0", "--threads", "1", "--work-dir", str(tmp_path / "eval"))
    assert_ok(proposals)
    recall = json.loads((tmp_path / "eval" / "proposals_metrics.json").read_text())
    assert set(recall) == {f"AR@{k}{kind}" for k in (100, 300, 1000) for kind in ("", "_mmdet")}
    assert 0.0 <= recall["AR@100"] <= 1.0
    assert json.loads((tmp_path / "eval" / "fps.json").read_text())["fps"] > 0
    assert "images/s" in proposals.stdout


def test_resume_continues_at_the_same_iteration_and_lr_with_identical_weights(tmp_path, synthetic_root):
    data = ["--data-root", str(synthetic_root / "resume"), "--synthetic-num-train", "4", "--synthetic-num-val", "2",
            "--batch-size", "2", "--epochs", "2", "--lr-steps", "1", "--no-eval", "--seed", "3"]
    # Uninterrupted: 2 epochs x 2 iterations.
    assert_ok(run_script("train.py", *TINY, *data, "--work-dir", str(tmp_path / "full")))
    # Interrupted after epoch 1, then resumed from the work dir's last checkpoint.
    assert_ok(run_script("train.py", *TINY, *data, "--max-iters", "2", "--work-dir", str(tmp_path / "part")))
    assert (tmp_path / "part" / "last_checkpoint").read_text().strip() == "epoch_1.pth"
    resumed = run_script("train.py", *TINY, *data, "--resume", "--work-dir", str(tmp_path / "part"))
    assert_ok(resumed)
    assert "resuming from" in resumed.stdout and "epoch 1, iteration 2" in resumed.stdout

    full = load_state(tmp_path / "full" / "epoch_2.pth")
    part = load_state(tmp_path / "part" / "epoch_2.pth")
    assert part["iteration"] == full["iteration"] == 4
    full_log = [json.loads(x) for x in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    part_log = [json.loads(x) for x in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    # The resumed run logged iterations 1-2 (first run) and 3-4 (after resuming) with the same lr.
    assert [r["iter"] for r in part_log] == [1, 2, 3, 4]
    for a, b in zip(full_log, part_log):
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-9)
    assert part_log[2]["lr"] < part_log[1]["lr"]  # lr x 0.1 after epoch 1 (--lr-steps 1)
    for key, value in full["model"].items():
        assert torch.equal(value, part["model"][key]), f"{key} differs after resuming"


def test_interrupted_checkpoint_write_keeps_previous_checkpoint(tmp_path, synthetic_root, monkeypatch):
    sys.path.insert(0, str(REPO))
    import train  # noqa: E402  (the script's functions, run in-process to inject the failure)

    import libra.engine.checkpoint as checkpoint_module

    work_dir = tmp_path / "atomic"
    data = ["--data-root", str(synthetic_root / "resume"), "--synthetic-num-train", "4", "--synthetic-num-val", "2",
            "--batch-size", "2", "--no-eval", "--work-dir", str(work_dir)]
    assert train.main([*TINY, *data, "--epochs", "1"]) == 0
    good = load_state(work_dir / "epoch_1.pth")

    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        real_save({"partial": torch.zeros(10)}, f)  # some bytes reach the temporary file...
        raise OSError("simulated crash during torch.save")  # ...then the process "dies"

    monkeypatch.setattr(checkpoint_module.torch, "save", failing_save)
    # A failed write is one line naming the file and the cause (exit 4), no traceback (issue 18).
    assert train.main([*TINY, *data, "--epochs", "2", "--resume"]) == 4
    monkeypatch.undo()

    assert sorted(p.name for p in work_dir.iterdir() if p.suffix == ".pth") == ["epoch_1.pth"]
    assert not [p for p in work_dir.iterdir() if p.name.endswith(".tmp")]
    assert (work_dir / "last_checkpoint").read_text().strip() == "epoch_1.pth"
    again = load_state(work_dir / "epoch_1.pth")
    assert again["iteration"] == good["iteration"] == 2
    for key, value in good["model"].items():
        assert torch.equal(value, again["model"][key])


# ---------------------------------------------------------------------------------------------
# Bad input: one clear line, non-zero exit, nothing written or overwritten
# ---------------------------------------------------------------------------------------------
@pytest.fixture()
def coco_layout(tmp_path, synthetic_root) -> Path:
    """A COCO-2017-style folder built from tiny synthetic images (annotations + train2017/val2017)."""
    from libra.data.synthetic import ensure_synthetic_dataset

    paths = ensure_synthetic_dataset(synthetic_root / "coco_src", num_train=4, num_val=2, image_size=(64, 64))
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    shutil.copytree(paths["train_images"], root / "train2017")
    shutil.copytree(paths["val_images"], root / "val2017")
    shutil.copy(paths["train_ann"], root / "annotations" / "instances_train2017.json")
    shutil.copy(paths["val_ann"], root / "annotations" / "instances_val2017.json")
    return root


def _existing_work_dir(tmp_path: Path) -> Path:
    work_dir = tmp_path / "work"
    work_dir.mkdir()
    (work_dir / "metrics.json").write_text('{"AP": 0.5}\n')
    return work_dir


def _assert_untouched(work_dir: Path) -> None:
    assert sorted(p.name for p in work_dir.iterdir()) == ["metrics.json"]
    assert (work_dir / "metrics.json").read_text() == '{"AP": 0.5}\n'


def test_missing_data_root(tmp_path):
    work_dir = _existing_work_dir(tmp_path)
    result = run_script("train.py", "--dataset", "coco", "--data-root", str(tmp_path / "nowhere"), "--work-dir", str(work_dir))
    assert_clean_error(result, "not found", "nowhere")
    _assert_untouched(work_dir)


def test_missing_image_file(tmp_path, coco_layout):
    work_dir = _existing_work_dir(tmp_path)
    missing = sorted((coco_layout / "train2017").glob("*.png"))[1]
    missing.unlink()
    result = run_script("train.py", *TINY, "--dataset", "coco", "--data-root", str(coco_layout), "--work-dir", str(work_dir))
    assert_clean_error(result, "image file not found", missing.name)
    _assert_untouched(work_dir)


def test_malformed_annotation_file(tmp_path, coco_layout):
    work_dir = _existing_work_dir(tmp_path)
    (coco_layout / "annotations" / "instances_val2017.json").write_text('{"images": [')
    result = run_script("train.py", *TINY, "--dataset", "coco", "--data-root", str(coco_layout), "--work-dir", str(work_dir))
    assert_clean_error(result, "annotation")
    _assert_untouched(work_dir)
    # The same data for eval.py.
    checkpoint = tmp_path / "model.pth"
    torch.save({"format": "libra-checkpoint", "model": {}, "model_name": "libra_faster_rcnn_r50_fpn", "num_classes": 4,
                "args": {}}, checkpoint)
    result = run_script("eval.py", "--dataset", "coco", "--data-root", str(coco_layout), "--checkpoint", str(checkpoint),
                        "--work-dir", str(work_dir))
    assert_clean_error(result, "annotation")
    _assert_untouched(work_dir)


def test_checkpoint_of_another_model(tmp_path, synthetic_root):
    from libra.engine.checkpoint import make_checkpoint

    checkpoint = tmp_path / "other.pth"
    torch.save(make_checkpoint(torch.nn.Linear(2, 2), None, None, None, 1, 10, "faster_rcnn_r50_fpn", 4), checkpoint)
    work_dir = _existing_work_dir(tmp_path)
    data = ["--data-root", str(synthetic_root / "resume"), "--synthetic-num-train", "4", "--synthetic-num-val", "2"]
    result = run_script("train.py", *TINY, *data, "--resume", str(checkpoint), "--work-dir", str(work_dir))
    assert_clean_error(result, "faster_rcnn_r50_fpn", "libra_faster_rcnn_r50_fpn")
    _assert_untouched(work_dir)
    result = run_script("eval.py", *data, "--checkpoint", str(checkpoint), "--model", "libra_faster_rcnn_r50_fpn",
                        "--work-dir", str(work_dir))
    assert_clean_error(result, "faster_rcnn_r50_fpn")
    _assert_untouched(work_dir)
    # Same model name, other class count.
    torch.save(make_checkpoint(torch.nn.Linear(2, 2), None, None, None, 1, 10, "libra_faster_rcnn_r50_fpn", 80), checkpoint)
    result = run_script("train.py", *TINY, *data, "--resume", str(checkpoint), "--work-dir", str(work_dir))
    assert_clean_error(result, "80 classes")
    _assert_untouched(work_dir)
