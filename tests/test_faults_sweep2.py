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
from conftest import assert_clean_error, assert_ok, error_line
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


# ---------------------------------------------------------------------------------------------
# Tiny COCO / LVIS layouts with masks (items 3, 4, 6, 7, 8, 9)
# ---------------------------------------------------------------------------------------------
def write_image(path: Path, width: int, height: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    array[height // 4: 3 * height // 4, width // 4: 3 * width // 4] = (200, 30, 30)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG" if path.suffix == ".png" else "JPEG", quality=95)


def box_polygon(x: float, y: float, w: float, h: float) -> list[list[float]]:
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def ann(ann_id: int, image_id: int, bbox, segmentation="box", iscrowd: int = 0, category_id: int = 1) -> dict:
    record = {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": list(bbox),
              "area": float(bbox[2] * bbox[3]), "iscrowd": iscrowd}
    if segmentation == "box":
        record["segmentation"] = box_polygon(*bbox)
    elif segmentation is not None:
        record["segmentation"] = segmentation
    return record


def write_coco(root: Path, split: str, images: list[tuple[int, int, int]], annotations: list[dict],
               categories: list[dict] | None = None, suffix: str = ".jpg") -> Path:
    """``images``: (id, width, height); the files are written too."""
    infos = []
    for image_id, width, height in images:
        name = f"{split}_{image_id:03d}{suffix}"
        write_image(root / f"{split}2017" / name, width, height, seed=image_id)
        infos.append({"id": image_id, "file_name": name, "width": width, "height": height})
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    path = root / "annotations" / f"instances_{split}2017.json"
    path.write_text(json.dumps({"images": infos, "annotations": annotations,
                                "categories": categories or [{"id": 1, "name": "thing"}]}))
    return path


def coco_settings(root: Path, with_masks: bool = False, check_images: str = "header"):
    from libra.engine.builders import DataSettings

    return DataSettings(dataset="coco", data_root=str(root), min_size=64, max_size=64, with_masks=with_masks,
                        check_images=check_images)


def garbage_rle(height: int, width: int) -> dict:
    """A compressed RLE whose run lengths claim ~2.7e9 pixels: pycocotools' ``rleIou`` walks the runs of
    a detection and of this mask together and, once the detection's are used up, loops forever
    (``c = min(0, cb) = 0``) for every detection whose box overlaps its 500 foreground pixels."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.frPyObjects({"size": [height, width], "counts": [100, 500, 2_700_000_000]}, height, width)
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def good_val_layout(root: Path, bad: list[dict]) -> None:
    """COCO layout: 2 training images, 2 val images with one good instance each plus ``bad`` ones."""
    write_coco(root, "train", [(1, 64, 64), (2, 64, 64)], [ann(1, 1, [8, 8, 30, 30]), ann(2, 2, [20, 10, 30, 40])])
    write_coco(root, "val", [(1, 64, 64), (2, 64, 64)], [ann(1, 1, [8, 8, 30, 30]), ann(7, 2, [10, 20, 30, 30]), *bad])


BAD_EVAL_MASKS = {
    2: ([1, 2, 20, 20], [[10, 10, 30, 30]], "polygon 0 has 4 coordinates"),
    3: ([1, 2, 20, 20], "not a segmentation", "unsupported segmentation type str"),
    4: ([1, 2, 20, 20], {"size": [32, 32], "counts": "PPY1"}, "does not match the image"),
    5: ([1, 2, 20, 20], [[100, 100, 120, 100, 120, 120]], "entirely outside the image"),
}


# ---------------------------------------------------------------------------------------------
# 3. Ground-truth masks of the evaluation split are checked before pycocotools sees them
# ---------------------------------------------------------------------------------------------
def test_invalid_evaluation_masks_are_dropped_naming_them_before_pycocotools(tmp_path):
    from libra.engine.builders import build_split
    from libra.evaluation import build_evaluator
    from libra.masks import MaskWarning, decode_segmentation

    root = tmp_path / "coco"
    good_val_layout(root, [ann(i, 1, bbox, segm) for i, (bbox, segm, _) in BAD_EVAL_MASKS.items()])
    with pytest.warns(MaskWarning) as caught:
        dataset = build_split(coco_settings(root, with_masks=True), train=False)
    messages = [str(w.message) for w in caught]
    for ann_id, (_, _, reason) in BAD_EVAL_MASKS.items():
        assert any(f"image 1, annotation {ann_id}" in m and reason in m for m in messages), (ann_id, messages)
    assert sorted(dataset.coco_api.anns) == [1, 7]
    # The evaluator now runs: a perfect detection of both usable instances scores mask AP 1.
    evaluator = build_evaluator("coco", dataset.coco_api, dataset.label_to_cat_id, ("bbox", "segm"), verbose=False)
    for image_id in (1, 2):
        (gt,) = dataset.coco_api.imgToAnns[image_id]
        x, y, w, h = gt["bbox"]
        mask = decode_segmentation(gt["segmentation"], 64, 64).astype(bool)
        evaluator.update([image_id], [{"boxes": torch.tensor([[x, y, x + w, y + h]]), "scores": torch.tensor([0.9]),
                                       "labels": torch.tensor([0]), "masks": torch.from_numpy(mask)[None]}])
    metrics = evaluator.evaluate()
    assert metrics["segm_AP"] == pytest.approx(1.0) and metrics["AP"] == pytest.approx(1.0)


def test_the_evaluators_refuse_invalid_ground_truth_masks_in_one_line(tmp_path):
    from libra.evaluation import build_evaluator

    for ann_id, (bbox, segmentation, reason) in BAD_EVAL_MASKS.items():
        gt = {"images": [{"id": 1, "width": 64, "height": 64}], "categories": [{"id": 1, "name": "a", "frequency": "f"}],
              "annotations": [ann(1, 1, [8, 8, 30, 30]), ann(ann_id, 1, bbox, segmentation)]}
        for protocol in ("coco", "lvis"):
            with pytest.raises(ValueError) as info:
                build_evaluator(protocol, json.loads(json.dumps(gt)), [1], ("bbox", "segm"), verbose=False)
            message = str(info.value)
            assert f"annotation {ann_id} of image 1" in message and reason in message and "\n" not in message, message


def _mask_checkpoint(path: Path, num_classes: int = 1) -> Path:
    from libra.engine.checkpoint import make_checkpoint
    from libra.presets import build_model

    model = build_model("mask_rcnn_r50_fpn", num_classes, **TINY_MODEL, mask_conv_channels=16)
    torch.save(make_checkpoint(model, None, None, None, 1, 1, "mask_rcnn_r50_fpn", num_classes,
                               args={"dataset": "coco", "model": "mask_rcnn_r50_fpn", "min_size": 64, "max_size": 64},
                               model_config={**TINY_MODEL, "mask_conv_channels": 16}), path)
    return path


def test_eval_script_with_a_garbage_rle_in_the_ground_truth_finishes(tmp_path):
    """A ground-truth RLE claiming 2.7e9 pixels made pycocotools' mask IoU loop for hours."""
    root = tmp_path / "coco"
    good_val_layout(root, [ann(6, 2, [1, 2, 20, 20], garbage_rle(64, 64))])
    checkpoint = _mask_checkpoint(tmp_path / "mask.pth")
    result = run_script("eval.py", "--checkpoint", str(checkpoint), "--dataset", "coco", "--data-root", str(root),
                        *EVAL_TINY, "--set", "score_thr=0.0", "--work-dir", str(tmp_path / "eval"),
                        timeout=120)  # ~5 s; pycocotools' mask IoU against that RLE hung before
    assert_ok(result)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert "segm_AP" in metrics and "AP" in metrics


# ---------------------------------------------------------------------------------------------
# 4. Every training mask invalid: refused, never a Mask R-CNN trained on no objects
# ---------------------------------------------------------------------------------------------
def test_a_training_split_without_a_usable_mask_is_refused(tmp_path, data_root):
    from libra.data import DataError
    from libra.engine.builders import build_split
    from libra.masks import MaskWarning

    root = tmp_path / "coco"
    write_coco(root, "train", [(1, 64, 64), (2, 64, 64)], [ann(i, 1 + i % 2, [8, 8, 30, 30], []) for i in range(1, 15)])
    write_coco(root, "val", [(1, 64, 64)], [ann(1, 1, [8, 8, 30, 30])])
    with pytest.raises(DataError) as info, pytest.warns(MaskWarning):
        build_split(coco_settings(root, with_masks=True), train=True)
    message = str(info.value)
    assert "no usable instance" in message and "all 14 segmentations are invalid" in message and "box-only" in message
    result = run_script("train.py", *TINY, "--model", "mask_rcnn_r50_fpn", "--set", "mask_conv_channels=16",
                        "--dataset", "coco", "--data-root", str(root), "--batch-size", "2", "--epochs", "1",
                        "--work-dir", str(tmp_path / "work"))
    assert_clean_error(result, 1, "no usable instance", "empty polygon list")
    assert not (tmp_path / "work").exists()


def test_invalid_training_masks_are_dropped_up_front(tmp_path):
    from libra.engine.builders import build_split
    from libra.masks import MaskWarning

    root = tmp_path / "coco"
    write_coco(root, "train", [(1, 64, 64), (2, 64, 64)], [
        ann(1, 1, [8, 8, 30, 30]), ann(2, 1, [30, 30, 20, 20], [[1, 2, 3, 4], *box_polygon(30, 30, 20, 20)]),
        ann(3, 2, [8, 8, 30, 30], None)])  # image 2's only instance has no segmentation
    write_coco(root, "val", [(1, 64, 64)], [ann(1, 1, [8, 8, 30, 30])])
    with pytest.warns(MaskWarning) as caught:
        dataset = build_split(coco_settings(root, with_masks=True), train=True)
    messages = [str(w.message) for w in caught]
    assert any("image 2, annotation 3" in m and "no segmentation" in m for m in messages), messages
    assert any("image 1, annotation 2" in m and "dropped invalid polygon parts" in m for m in messages), messages
    assert dataset.image_ids == [1]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", MaskWarning)  # checked once: loading warns no more
        _, target = dataset[0]
    assert target["masks"].shape[0] == len(target["boxes"]) == 2


# ---------------------------------------------------------------------------------------------
# 6. 16-bit grayscale images are scaled, not clipped at 255
# ---------------------------------------------------------------------------------------------
def test_sixteen_bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    from libra.data.base import check_image_files, load_rgb_image
    from libra.engine.builders import build_split

    gradient = np.linspace(0, 65535, 64).round().astype(np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(np.tile(gradient, (48, 1))).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")  # really 16-bit samples
    image = load_rgb_image(path)
    expected = torch.from_numpy(gradient.astype(np.float32) * (255.0 / 65535.0))
    assert torch.allclose(image[0, 0], expected, atol=1e-3) and torch.equal(image[0], image[2])
    assert float(image[0, 0, 32]) == pytest.approx(32 / 63 * 255, abs=0.01)  # was 255 (clipped)
    # Through a dataset, with --check-images full.
    root = tmp_path / "coco"
    write_coco(root, "train", [(1, 64, 48)], [ann(1, 1, [8, 8, 30, 30])], suffix=".png")
    Image.fromarray(np.tile(gradient, (48, 1))).save(root / "train2017" / "train_001.png")
    dataset = build_split(coco_settings(root, check_images="full"), train=True)
    dataset.transform.flip_prob = 0.0
    sample, _ = dataset[0]
    from libra.data import denormalize_image

    restored = denormalize_image(sample)
    assert float(restored.max()) > 250 and float(restored[:, :, 10:54].std()) > 50  # a gradient, not a white image
    # Pixels without a defined range (32-bit float) are refused in one line, by the header check too.
    tiff = tmp_path / "float.tif"
    Image.fromarray(np.ones((8, 8), np.float32)).save(tiff)
    from libra.data import ImageFileError
    from libra.data.base import ImageRecord

    with pytest.raises(ImageFileError, match="32-bit floating point"):
        load_rgb_image(tiff)
    problems = check_image_files([ImageRecord(1, tiff, 8, 8)], "header")
    assert problems and "32-bit floating point" in problems[0][1]


# ---------------------------------------------------------------------------------------------
# 7. Very elongated images train and evaluate (short side resized to 32 px); absurd ones refused
# ---------------------------------------------------------------------------------------------
def test_elongated_images_train_and_evaluate(tmp_path):
    root = tmp_path / "coco"
    write_coco(root, "train", [(1, 64, 64), (2, 400, 20)], [ann(1, 1, [8, 8, 30, 30]), ann(2, 2, [100, 2, 150, 15])])
    write_coco(root, "val", [(1, 400, 20)], [ann(1, 1, [100, 2, 150, 15])])
    work = tmp_path / "work"
    result = run_script("train.py", *TINY, "--dataset", "coco", "--data-root", str(root), "--batch-size", "2",
                        "--epochs", "1", "--work-dir", str(work))
    assert_ok(result)
    detections = json.loads((work / "detections.json").read_text())
    for det in detections:  # in the original 400 x 20 image
        x, y, w, h = det["bbox"]
        assert -1e-3 <= x and x + w <= 400 + 1e-3 and -1e-3 <= y and y + h <= 20 + 1e-3
    from libra.data import get_resize_size

    assert get_resize_size(20, 2000, 800, 1333, min_side=32) == (32, 3200)  # the 20 x 2000 image
    assert get_resize_size(375, 500, 800, 1333, min_side=32) == (800, 1067)  # others as before


def test_an_absurdly_elongated_image_is_refused_up_front_naming_it(tmp_path):
    root = tmp_path / "coco"
    write_coco(root, "train", [(1, 64, 64), (7, 3000, 2)], [ann(1, 1, [8, 8, 30, 30]), ann(2, 7, [10, 0, 100, 2])])
    write_coco(root, "val", [(1, 64, 64)], [ann(1, 1, [8, 8, 30, 30])])
    result = run_script("train.py", *TINY, "--dataset", "coco", "--data-root", str(root), "--work-dir",
                        str(tmp_path / "work"))
    assert_clean_error(result, 1, "image 7", "train_007.jpg", "1500:1", "crop or split it", "image id 7")
    assert not (tmp_path / "work").exists()


# ---------------------------------------------------------------------------------------------
# 8. LVIS categories without 'frequency': one rule for the dataset and the evaluator, a warning
# ---------------------------------------------------------------------------------------------
def _lvis_gt() -> dict:
    images = [{"id": i, "width": 64, "height": 64, "file_name": f"val2017/{i:03d}.jpg", "neg_category_ids": [],
               "not_exhaustive_category_ids": []} for i in (1, 2, 3)]
    annotations = [ann(i, i, [8, 8, 30, 30], category_id=i) for i in (1, 2, 3)]
    categories = [{"id": 1, "name": "rare_one", "frequency": "r"}, {"id": 2, "name": "counted", "image_count": 500},
                  {"id": 3, "name": "unknown"}]
    return {"images": images, "annotations": annotations, "categories": categories}


def test_lvis_categories_without_frequency_follow_one_rule_with_a_warning(tmp_path, capsys):
    from libra.data.lvis import LVISDetection
    from libra.evaluation import LVISEvaluator

    root = tmp_path / "lvis"
    gt = _lvis_gt()
    for info in gt["images"]:
        write_image(root / info["file_name"], 64, 64, seed=info["id"])
    (root / "lvis_v1_val.json").write_text(json.dumps(gt))
    with pytest.warns(UserWarning, match=r"2 of the 3 categories.*2 'counted' -> f.*in no group.*3 'unknown'"):
        dataset = LVISDetection(root, root / "lvis_v1_val.json", train=False)
    assert dataset.frequencies == ["r", "f", None]
    evaluator = LVISEvaluator(dataset.coco_api, dataset.label_to_cat_id, verbose=True)
    for image_id in (1, 2, 3):
        evaluator.update([image_id], [{"boxes": torch.tensor([[8.0, 8.0, 38.0, 38.0]]), "scores": torch.tensor([0.9]),
                                       "labels": torch.tensor([image_id - 1])}])
    metrics = evaluator.evaluate()
    assert metrics["APr"] == pytest.approx(1.0) and metrics["APf"] == pytest.approx(1.0) and metrics["APc"] == -1.0
    assert "APc = -1 (n/a)" in capsys.readouterr().out
    # The evaluator on its own warns the same way (once per ground truth).
    with pytest.warns(UserWarning, match="have no valid 'frequency'"):
        LVISEvaluator(_lvis_gt(), [1, 2, 3], verbose=False).evaluate()


# ---------------------------------------------------------------------------------------------
# 9. A training split of crowd regions only: the message says so and what to do
# ---------------------------------------------------------------------------------------------
def test_an_all_crowd_training_split_names_the_cause(tmp_path):
    root = tmp_path / "coco"
    write_coco(root, "train", [(1, 64, 64), (2, 64, 64)], [ann(1, 1, [8, 8, 30, 30], iscrowd=1),
                                                           ann(2, 2, [8, 8, 30, 30], iscrowd=1)])
    write_coco(root, "val", [(1, 64, 64)], [ann(1, 1, [8, 8, 30, 30])])
    result = run_script("train.py", *TINY, "--dataset", "coco", "--data-root", str(root), "--work-dir",
                        str(tmp_path / "work"))
    assert_clean_error(result, 1, "no usable images", "all 2 annotations", "crowd regions (iscrowd=1)",
                       "iscrowd=0", "instances_train2017.json")
    from libra.data import DataError
    from libra.engine.builders import build_split

    write_coco(root, "train", [(1, 64, 64)], [ann(1, 1, [8, 8, 30, 30], iscrowd=1), ann(2, 1, [70, 70, 5, 5]),
                                              ann(3, 1, [8, 8, 0, 5])])
    with pytest.raises(DataError, match="1 are crowd regions.*1 have area <= 0.*1 lie outside their image"):
        build_split(coco_settings(root), train=True)


# ---------------------------------------------------------------------------------------------
# 10. A process of a multi-process run killed: a libra line on the surviving side, with the resume
#     command (two local processes with torchrun's environment, gloo over loopback; the node
#     holding the rendezvous store is rank 0's)
# ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_two_nodes(work_dir: Path, data_root: Path) -> list[subprocess.Popen]:
    """Ranks 0 and 1 as two one-process "nodes" (GROUP_RANK 0 / 1), as torchrun starts them."""
    port = _free_port()
    processes = []
    for rank in (0, 1):
        env = dict(_env(), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", GROUP_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        processes.append(subprocess.Popen(
            [sys.executable, str(REPO / "train.py"), *TINY, *data_args(data_root)[:-3], "--batch-size", "1", "--no-eval",
             "--device", "cpu", "--epochs", "50", "--work-dir", str(work_dir)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for line in processes[0].stdout:
        if line.startswith("saved checkpoint"):
            return processes
    for process in processes:
        process.kill()
    pytest.fail("no checkpoint: " + processes[0].stderr.read()[-2000:])


def _finish(processes: list[subprocess.Popen]) -> list[tuple[int, str]]:
    return [(p.returncode, p.communicate(timeout=180)[1]) for p in processes]


@pytest.mark.parametrize("killed", [0, 1], ids=["store-node-killed", "peer-killed"])
def test_a_killed_process_of_a_multi_node_run_is_reported_with_the_resume_command(tmp_path, data_root, killed):
    work_dir = tmp_path / "run"
    processes = _start_two_nodes(work_dir, data_root)
    processes[killed].kill()  # kill -9: it leaves no message
    (_, err_0), (_, err_1) = _finish(processes)
    survivor = processes[1 - killed]
    err = (err_0, err_1)[1 - killed]
    assert survivor.returncode == 5, err[-3000:]
    line = error_line(err)
    label = "(process 0) " if killed == 1 else "(process 1, node 1) "
    assert line.startswith(f"error: {label}another process of the run is gone"), line
    assert "may have left no message" in line and "see its message" not in line
    assert f"the last checkpoint is {work_dir / 'epoch_1.pth'}" in line and line.endswith("--resume"), line
    assert "the same launcher with:" in line


@pytest.mark.parametrize("killed", [0, 1], ids=["store-node-killed", "peer-killed"])
def test_a_killed_process_of_a_multi_node_evaluation_is_reported_and_nothing_is_written(tmp_path, data_root, killed):
    """eval.py's side of the same: the survivor meets the gone process in the final gather of the
    results and says so in one line (exit 5), and no metrics file is written."""
    from libra.data.synthetic import ensure_synthetic_dataset

    trained = tmp_path / "trained"
    assert_ok(run_script("train.py", *TINY, *data_args(data_root), "--epochs", "1", "--work-dir", str(trained)))
    val_root = tmp_path / "val_data"  # enough images that the evaluation is still running at the kill
    ensure_synthetic_dataset(val_root, num_train=1, num_val=400, image_size=(64, 64), seed=0)
    port, out = _free_port(), tmp_path / "eval"
    processes = []
    for rank in (0, 1):
        env = dict(_env(), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", GROUP_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        processes.append(subprocess.Popen(
            [sys.executable, str(REPO / "eval.py"), "--checkpoint", str(trained / "epoch_1.pth"), *EVAL_TINY,
             "--device", "cpu", "--data-root", str(val_root), "--synthetic-num-train", "1", "--synthetic-num-val",
             "400", "--work-dir", str(out)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    # Rank 0 prints "evaluating ..." once the process group is up (both ranks joined it).
    for line in processes[0].stdout:
        if line.startswith("evaluating"):
            break
    else:
        pytest.fail("the evaluation did not start: " + processes[0].stderr.read()[-2000:])
    processes[killed].kill()
    (_, err_0), (_, err_1) = _finish(processes)
    survivor, err = processes[1 - killed], (err_0, err_1)[1 - killed]
    assert survivor.returncode == 5, err[-3000:]
    line = error_line(err)
    label = "(process 0) " if killed == 1 else "(process 1, node 1) "
    assert line.startswith(f"error: {label}another process of the evaluation is gone"), line
    assert "may have left no message" in line and "run the evaluation again" in line, line
    assert not list(out.glob("**/metrics.json")) and not list(out.glob("**/*.tmp*"))


def test_the_launcher_stopping_a_surviving_node_leaves_a_libra_line_there(tmp_path, data_root):
    """torchrun's agent on the surviving node SIGTERMs its workers when the store's node is gone."""
    work_dir = tmp_path / "run"
    processes = _start_two_nodes(work_dir, data_root)
    processes[0].kill()
    processes[1].send_signal(signal.SIGTERM)
    _, (_, err) = _finish(processes)
    line = error_line(err)
    assert line.startswith("error: (process 1, node 1) "), line
    assert f"the last checkpoint is {work_dir / 'epoch_1.pth'}" in line and "--resume" in line, line


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_a_killed_local_worker_is_reported_by_the_launcher(tmp_path, data_root):
    work_dir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *TINY, *data_args(data_root), "--gpus", "2", "--device", "cpu",
         "--epochs", "50", "--work-dir", str(work_dir)],
        cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        if line.startswith("saved checkpoint"):
            break
    workers = [pid for pid in _children(process.pid) if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()]
    assert len(workers) == 2, workers
    os.kill(max(workers), signal.SIGKILL)
    _, err = process.communicate(timeout=180)
    assert process.returncode == 5, err[-3000:]
    line = error_line(err)
    assert "was killed by SIGKILL" in line and "could leave no message" in line, line
    assert f"the last checkpoint is {work_dir / 'epoch_1.pth'}" in line and line.endswith("--resume"), line


def test_real_torchrun_two_nodes_store_node_killed(tmp_path, data_root):
    """The same with torchrun itself (two agents with --nnodes 2 on loopback, static rendezvous): the
    surviving node's output holds libra's line (before torchrun's own report of the failed worker)."""
    port, work_dir = _free_port(), tmp_path / "run"
    agents = []
    for node in (0, 1):
        agents.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node",
             "1", "--master-addr", "127.0.0.1", "--master-port", str(port), str(REPO / "train.py"), *TINY,
             *data_args(data_root)[:-3], "--batch-size", "1", "--no-eval", "--device", "cpu", "--epochs", "500",
             "--work-dir", str(work_dir)],
            cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"err{node}", "w")))
    deadline = time.monotonic() + 240
    while not (work_dir / "epoch_1.pth").exists():
        assert time.monotonic() < deadline and agents[0].poll() is None, (tmp_path / "err0").read_text()[-3000:]
        time.sleep(0.2)
    for pid in [agents[0].pid, *_children(agents[0].pid)]:  # node 0 dies: its agent (the store) and its worker
        os.kill(pid, signal.SIGKILL)
    agents[1].wait(timeout=180)
    err = (tmp_path / "err1").read_text()
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith("error: (process 1, node 1) another process of the run is gone"), lines[0]
    assert "the last checkpoint is" in lines[0] and lines[0].endswith("--resume"), lines[0]


# ---------------------------------------------------------------------------------------------
# 11. Batch dependence of the Libra models, and the mode that removes it
# ---------------------------------------------------------------------------------------------
def _trained_like(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """A model whose every parameter and BN statistic is random (as after training: the non-local
    block is no longer the identity, BN shifts are not zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif tensor.dim() > 1:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * (1.0 / tensor[0].numel()) ** 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
    return model.eval()


@pytest.mark.parametrize("preset", ["libra_faster_rcnn_r50_fpn", "libra_retinanet_r50_fpn"])
def test_batch_independent_predictions_are_bit_identical_to_a_batch_of_one(preset):
    from libra.data import preprocess_images
    from libra.presets import build_model
    from libra.structures import Batch

    torch.manual_seed(0)
    model = _trained_like(build_model(preset, 3, **{**TINY_MODEL, "score_thr": 0.0}
                                      if "retinanet" not in preset else dict(width_per_group=8,
                                                                             stage_blocks=(1, 1, 1, 1), fpn_channels=32,
                                                                             head_channels=32, score_thr=0.0)))
    small = torch.randint(0, 256, (3, 70, 100), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    large = torch.randint(0, 256, (3, 150, 90), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))

    def batch_of(images):
        tensor, sizes, originals = preprocess_images(images, min_size=96, max_size=160)
        return Batch(tensor, sizes, originals)

    with torch.no_grad():
        alone = model.predict(batch_of([small]))[0]
        together = model.predict(batch_of([small, large]))[0]
        # The issue: the same image scores differently next to a larger one.
        assert alone["scores"].shape != together["scores"].shape or not torch.equal(alone["scores"], together["scores"])
        model.batch_independent = True
        first, second = model.predict(batch_of([small, large]))
        reversed_second, reversed_first = model.predict(batch_of([large, small]))
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(first[key], alone[key]) and torch.equal(reversed_first[key], alone[key]), key
        assert torch.equal(second[key], reversed_second[key]), key
    if model.makes_proposals:
        with torch.no_grad():
            proposals = model.predict_proposals(batch_of([small, large]))[0]
            model.batch_independent = False
            proposals_alone = model.predict_proposals(batch_of([small]))[0]
        assert torch.equal(proposals["proposals"], proposals_alone["proposals"])


def test_eval_script_batch_independent_flag(tmp_path, trained):
    out = [tmp_path / f"e{i}" for i in range(3)]
    flags = ["--checkpoint", str(trained / "epoch_1.pth"), *EVAL_TINY]
    assert_ok(run_script("eval.py", *flags, "--work-dir", str(out[0])))
    assert_ok(run_script("eval.py", *flags, "--batch-size", "2", "--batch-independent", "--work-dir", str(out[1])))
    assert (out[0] / "detections.json").read_text() == (out[1] / "detections.json").read_text()


def test_a_run_refused_in_the_moment_before_the_holder_writes_its_record_still_names_it(tmp_path):
    """The holder takes the lock, then writes its record: a run refused in between used to say "a
    process that left no record" (seen in CI when two runs start together)."""
    import fcntl
    import threading

    from libra.engine.run_dir import LOCK_NAME, WorkDirBusyError, WorkDirLock

    work_dir = tmp_path / "run"
    work_dir.mkdir()
    fd = os.open(work_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # locked, record not written yet
    record = json.dumps({"pid": 4242, "host": "elsewhere", "script": "train.py", "command": "train.py --epochs 3"})
    writer = threading.Timer(0.3, lambda: os.pwrite(fd, record.encode(), 0))
    writer.start()
    try:
        with pytest.raises(WorkDirBusyError, match="process 4242 on elsewhere.*train.py --epochs 3"):
            WorkDirLock(work_dir, "train.py", "train.py").acquire()
    finally:
        writer.join()
        os.close(fd)


def test_a_work_dir_on_a_file_system_without_locks_runs_with_a_note(tmp_path, monkeypatch):
    import fcntl

    from libra.engine.run_dir import WorkDirLock

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    lock = WorkDirLock(tmp_path / "run")
    note = lock.acquire()
    assert note is not None and "no locks available" in note and "would not be refused" in note
    lock.release()
    assert not (tmp_path / "run").exists()


def test_a_polygon_vertex_far_outside_the_image_never_reaches_pycocotools():
    """pycocotools rasterises a polygon edge pixel by pixel: a vertex at 1e9 took hours."""
    from libra.masks import InvalidMaskError, MaskWarning, check_segmentation, decode_segmentation

    with pytest.raises(InvalidMaskError, match="annotation 2: .*polygon 0 reaches .*more than 10 image sizes outside"):
        check_segmentation([[10, 10, 20, 10, 1e9, 1e9]], 64, 64, 1, 2)
    with pytest.warns(MaskWarning, match="polygon 0 reaches"):
        bitmap = decode_segmentation([[10, 10, 20, 10, 1e9, 1e9], [1, 1, 20, 1, 20, 20]], 64, 64, 1, 2, strict=False)
    assert bitmap.sum() > 0
