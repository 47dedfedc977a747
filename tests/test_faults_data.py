"""Bad-input sweep of the data path and the shared command line (train.py / eval.py).

Each test reproduces a reported failure: a data folder overwritten by the synthetic builder,
undecodable images (random bytes, 0 bytes, truncated JPEG/PNG) ending in long PIL tracebacks,
ground-truth boxes outside the image kept unclipped (absurd ones crashing the step), and
``--set`` typos printing raw tracebacks. The fixed behaviour: one ``error: ...`` line that names
the file / annotation / key, exit code 1, and no file touched.

Script runs use tiny settings (64 px images, a thin one-block-per-stage ResNet, 1 iteration).
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from libra.data import DataError
from libra.data.synthetic import SYNTHETIC_MARKER, ensure_synthetic_dataset, synthetic_fingerprint
from libra.engine.builders import DataSettings, build_eval_loader, build_split, build_train_loader
from libra.engine.cli import one_line, parse_set_overrides

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)

TINY = [
    "--synthetic-num-train", "4", "--synthetic-num-val", "2", "--synthetic-image-size", "64",
    "--min-size", "64", "--max-size", "64", "--width-per-group", "8", "--stage-blocks", "1", "1", "1", "1",
    "--set", "fpn_channels=32", "--set", "fc_channels=64", "--set", "roi_batch_size=32", "--set", "rpn_batch_size=64",
    "--threads", "1", "--log-interval", "1", "--warmup-iters", "1", "--epochs", "1", "--max-iters", "1",
    "--batch-size", "1",
]
TINY_MODEL = dict(width_per_group=8, stage_blocks=(1, 1, 1, 1), fpn_channels=32, fc_channels=64, roi_batch_size=32,
                  rpn_batch_size=64)


def run_script(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("LIBRA_DEBUG", None)
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def assert_clean_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit code 1, exactly one 'error: ...' line on stderr containing ``fragments``, no traceback."""
    assert result.returncode == 1, f"exit {result.returncode}\nstdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes), folders included as b'<dir>'."""
    return {str(p.relative_to(root)): (b"<dir>" if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


# ---------------------------------------------------------------------------------------------
# Tiny COCO and VOC layouts (64 x 64 JPEGs, one box each)
# ---------------------------------------------------------------------------------------------
def jpeg_bytes(seed: int, size: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    array[16:48, 8:40] = (200, 30, 30)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def png_bytes(seed: int, size: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def make_coco(root: Path, boxes: dict[str, list] | None = None) -> Path:
    """COCO 2017 layout: 2 train + 2 val images; ``boxes[split]`` replaces the annotations' bboxes."""
    (root / "annotations").mkdir(parents=True)
    for split_index, split in enumerate(("train", "val")):
        folder = root / f"{split}2017"
        folder.mkdir()
        images, annotations = [], []
        for k in range(2):
            name = f"{split}_{k:03d}.jpg"
            (folder / name).write_bytes(jpeg_bytes(10 * split_index + k))
            images.append({"id": k + 1, "file_name": name, "width": 64, "height": 64})
            annotations.append({"id": k + 1, "image_id": k + 1, "category_id": 1, "bbox": [8, 16, 32, 32],
                                "area": 1024, "iscrowd": 0})
        for ann, bbox in zip(annotations, (boxes or {}).get(split, [])):
            ann["bbox"] = bbox
            ann["area"] = 100.0
        ann = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}
        # json.dumps writes inf as Infinity (which json.loads reads back): the "1e999" case
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(ann))
    return root


def make_voc(root: Path) -> Path:
    """VOCdevkit layout with VOC2007 only: trainval (2 images) and test (2 images)."""
    year = root / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (year / sub).mkdir(parents=True)
    for split_index, split in enumerate(("trainval", "test")):
        stems = [f"{split_index:02d}{k:04d}" for k in range(2)]
        (year / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(stems) + "\n")
        for k, stem in enumerate(stems):
            (year / "JPEGImages" / f"{stem}.jpg").write_bytes(jpeg_bytes(10 * split_index + k))
            (year / "Annotations" / f"{stem}.xml").write_text(
                "<annotation><size><width>64</width><height>64</height><depth>3</depth></size>"
                "<object><name>dog</name><difficult>0</difficult><bndbox><xmin>9</xmin><ymin>17</ymin>"
                "<xmax>40</xmax><ymax>48</ymax></bndbox></object></annotation>"
            )
    return root


def image_path(root: Path, layout: str, split: str) -> Path:
    """The first image of the training ('train') or evaluation ('val') split."""
    if layout == "coco":
        return root / f"{split}2017" / f"{split}_000.jpg"
    return root / "VOC2007" / "JPEGImages" / ("000000.jpg" if split == "train" else "010000.jpg")


def corrupt(path: Path, kind: str) -> None:
    data = path.read_bytes()
    if kind == "random":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":  # header intact (PIL opens it), the scan data cut short
        path.write_bytes(data[: len(data) * 6 // 10])
    else:
        raise AssertionError(kind)


def settings(layout: str, root: Path, check_images: str = "header") -> DataSettings:
    return DataSettings(dataset=layout, data_root=str(root), min_size=64, max_size=64, check_images=check_images)


KINDS = ("random", "empty", "truncated")


# ---------------------------------------------------------------------------------------------
# 1. The synthetic builder never deletes or overwrites a folder it did not make
# ---------------------------------------------------------------------------------------------
def test_train_with_default_dataset_refuses_a_coco_folder_and_leaves_it_untouched(tmp_path):
    root = make_coco(tmp_path / "coco")
    before = snapshot(root)
    work_dir = tmp_path / "work"
    result = run_script("train.py", *TINY, "--data-root", str(root), "--work-dir", str(work_dir))  # no --dataset
    line = assert_clean_error(result, str(root), "--dataset coco")
    assert "annotations" in line
    assert snapshot(root) == before
    assert not work_dir.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coco"]  # no temporary folder left behind


def test_eval_with_synthetic_checkpoint_refuses_a_coco_folder(tmp_path):
    root = make_coco(tmp_path / "coco")
    before = snapshot(root)
    checkpoint = tmp_path / "synthetic.pth"
    torch.save({"format": "libra-checkpoint", "model": {}, "model_name": "libra_faster_rcnn_r50_fpn", "num_classes": 4,
                "args": {"dataset": "synthetic", "synthetic_num_train": 4, "synthetic_num_val": 2,
                         "synthetic_image_size": 64}}, checkpoint)
    result = run_script("eval.py", "--checkpoint", str(checkpoint), "--data-root", str(root),
                        "--work-dir", str(tmp_path / "eval"))
    assert_clean_error(result, str(root), "--dataset coco")
    assert snapshot(root) == before


def test_synthetic_builder_refuses_foreign_folders(tmp_path):
    small = dict(num_train=2, num_val=1, image_size=(32, 32))
    # A folder of someone else's files (no marker): refused with what it holds and what to do.
    foreign = tmp_path / "mine"
    (foreign / "sub").mkdir(parents=True)
    (foreign / "notes.txt").write_text("keep me")
    (foreign / "sub" / "x.bin").write_bytes(b"\x00\x01")
    before = snapshot(foreign)
    with pytest.raises(DataError, match="notes.txt") as info:
        ensure_synthetic_dataset(foreign, **small)
    assert "\n" not in str(info.value) and "--data-root" in str(info.value)
    assert snapshot(foreign) == before
    # A VOC root is recognised as such.
    voc = make_voc(tmp_path / "voc")
    before = snapshot(voc)
    with pytest.raises(DataError, match="--dataset voc"):
        ensure_synthetic_dataset(voc, **small)
    assert snapshot(voc) == before
    # A file in place of the folder.
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(DataError, match="not a folder"):
        ensure_synthetic_dataset(a_file, **small)
    assert a_file.read_text() == "x"
    # An existing empty folder is fine (e.g. made by the user for it).
    empty = tmp_path / "empty"
    empty.mkdir()
    paths = ensure_synthetic_dataset(empty, **small)
    assert (empty / SYNTHETIC_MARKER).is_file() and len(list(paths["train_images"].glob("*.png"))) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file.txt", "mine", "voc"]


def test_synthetic_builder_regenerates_its_own_stale_folder(tmp_path):
    root = tmp_path / "syn"
    ensure_synthetic_dataset(root, num_train=2, num_val=1, image_size=(32, 32))
    marker = json.loads((root / SYNTHETIC_MARKER).read_text())
    assert marker["num_train"] == 2
    # Other parameters: its own (marked) folder is replaced.
    paths = ensure_synthetic_dataset(root, num_train=3, num_val=1, image_size=(32, 32))
    assert len(list(paths["train_images"].glob("*.png"))) == 3
    assert json.loads((root / SYNTHETIC_MARKER).read_text())["num_train"] == 3
    reference = ensure_synthetic_dataset(tmp_path / "ref", num_train=3, num_val=1, image_size=(32, 32))
    assert synthetic_fingerprint(root) == synthetic_fingerprint(reference["root"])
    # Incomplete (a PNG deleted): regenerated.
    next(paths["val_images"].glob("*.png")).unlink()
    ensure_synthetic_dataset(root, num_train=3, num_val=1, image_size=(32, 32))
    assert synthetic_fingerprint(root) == synthetic_fingerprint(reference["root"])
    # A user's file put into the marked folder is never deleted: a stale folder holding it is refused.
    (root / "my_results.txt").write_text("precious")
    before = snapshot(root)
    with pytest.raises(DataError, match="my_results.txt"):
        ensure_synthetic_dataset(root, num_train=2, num_val=1, image_size=(32, 32))
    assert snapshot(root) == before
    # ... while the matching parameters still just reuse it.
    ensure_synthetic_dataset(root, num_train=3, num_val=1, image_size=(32, 32))
    assert (root / "my_results.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref", "syn"]


def test_synthetic_builder_follows_a_link_to_its_folder(tmp_path):
    target = tmp_path / "real"
    ensure_synthetic_dataset(target, num_train=2, num_val=1, image_size=(32, 32))
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    ensure_synthetic_dataset(link, num_train=3, num_val=1, image_size=(32, 32))  # stale: regenerated in place
    assert link.is_symlink() and len(list((target / "train").glob("*.png"))) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
    # A link to someone else's folder is refused like the folder itself.
    other = make_coco(tmp_path / "coco")
    (tmp_path / "coco_link").symlink_to(other, target_is_directory=True)
    before = snapshot(other)
    with pytest.raises(DataError, match="--dataset coco"):
        ensure_synthetic_dataset(tmp_path / "coco_link", num_train=2, num_val=1, image_size=(32, 32))
    assert snapshot(other) == before


def test_synthetic_folder_of_the_previous_format_is_adopted(tmp_path):
    # Made before the marker existed: meta.json and the synthetic layout, nothing else.
    root = tmp_path / "old"
    ensure_synthetic_dataset(root, num_train=2, num_val=1, image_size=(32, 32))
    (root / SYNTHETIC_MARKER).unlink()
    ensure_synthetic_dataset(root, num_train=3, num_val=1, image_size=(32, 32))  # stale: regenerated
    assert len(list((root / "train").glob("*.png"))) == 3 and (root / SYNTHETIC_MARKER).is_file()


# ---------------------------------------------------------------------------------------------
# 2. Undecodable images: one line naming the file, before training when the header shows it
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["coco", "voc"])
def test_header_check_names_the_bad_image_before_training(tmp_path, layout):
    for split in ("train", "val"):
        for kind in KINDS:
            root = (make_coco if layout == "coco" else make_voc)(tmp_path / f"{split}_{kind}")
            bad = image_path(root, layout, split)
            corrupt(bad, kind)
            with pytest.raises(DataError) as info:
                build_split(settings(layout, root), train=split == "train")
            message = str(info.value)
            assert str(bad) in message and "\n" not in message, message
            # The other split is fine.
            build_split(settings(layout, root), train=split != "train")


def test_header_check_catches_size_mismatch_and_truncated_png(tmp_path):
    root = make_coco(tmp_path / "coco")
    bad = image_path(root, "coco", "train")
    Image.new("RGB", (50, 64)).save(bad, format="JPEG")  # annotated as 64 x 64
    with pytest.raises(DataError, match=f"{bad.name}.*50 x 64.*64 x 64"):
        build_split(settings("coco", root), train=True)
    bad.write_bytes(png_bytes(0)[:-200])  # a PNG (any extension) whose end is missing
    with pytest.raises(DataError, match=bad.name):
        build_split(settings("coco", root), train=True)
    # --check-images none skips the check (the error then comes when the sample is loaded)
    dataset = build_split(settings("coco", root, "none"), train=True)
    with pytest.raises(DataError, match=bad.name):
        dataset[0]
    # full: decodes every file; header with no confirmation budget leaves a truncated file to load time
    (root / "val2017" / "val_001.jpg").write_bytes(jpeg_bytes(5)[:-300])
    with pytest.raises(DataError, match="val_001.jpg"):
        build_split(settings("coco", root, "full"), train=False)
    from libra.data import check_image_files

    val = build_split(settings("coco", root, "none"), train=False)
    assert [r.file_path.name for r, _ in check_image_files(val.records, "header")] == ["val_001.jpg"]
    assert check_image_files(val.records, "header", max_full_decodes=0) == []


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("layout", ["coco", "voc"])
def test_decode_error_in_loader_is_one_line_naming_the_file(tmp_path, layout, workers):
    """What slips past the pre-flight check (or with --check-images none) fails at load time with
    a DataError whose message, also through DataLoader workers, is one line naming the file."""
    for kind in KINDS:
        for split in ("train", "val"):
            root = (make_coco if layout == "coco" else make_voc)(tmp_path / f"{kind}_{split}")
            bad = image_path(root, layout, split)
            corrupt(bad, kind)
            dataset = build_split(settings(layout, root, "none"), train=split == "train")
            if split == "train":
                loader, _ = build_train_loader(dataset, 2, workers, 0, 1, 0)
            else:
                loader = build_eval_loader(dataset, 1, workers, 0, 1)
            batches = iter(loader)
            try:
                with pytest.raises(ValueError) as info:
                    for _ in batches:
                        pass
            finally:
                if workers:
                    batches._shutdown_workers()  # now, not when the traceback is collected
            line = one_line(info.value)
            assert str(bad) in line and "Traceback" not in line and not line.startswith("libra."), line
            assert "remove" in line  # says how to skip it


@pytest.mark.parametrize(
    "layout, split, kind, workers",
    [("coco", "train", "random", 0), ("coco", "val", "empty", 2), ("coco", "val", "truncated", 0),
     ("voc", "train", "truncated", 2), ("voc", "val", "random", 0), ("voc", "train", "empty", 0)],
)
def test_train_script_refuses_bad_image_before_training(tmp_path, layout, split, kind, workers):
    root = (make_coco if layout == "coco" else make_voc)(tmp_path / "data")
    bad = image_path(root, layout, split)
    corrupt(bad, kind)
    work_dir = tmp_path / "work"
    result = run_script("train.py", *TINY, "--dataset", layout, "--data-root", str(root), "--workers", str(workers),
                        "--work-dir", str(work_dir))
    assert_clean_error(result, str(bad))
    assert not work_dir.exists() and "iter" not in result.stdout  # nothing trained, nothing written


@pytest.mark.parametrize(
    "layout, split, workers", [("coco", "train", 2), ("coco", "val", 0), ("voc", "train", 0), ("voc", "val", 2)]
)
def test_train_script_truncated_image_at_load_time_is_one_line(tmp_path, layout, split, workers):
    root = (make_coco if layout == "coco" else make_voc)(tmp_path / "data")
    bad = image_path(root, layout, split)
    corrupt(bad, "truncated")
    result = run_script("train.py", *TINY, "--dataset", layout, "--data-root", str(root), "--workers", str(workers),
                        "--check-images", "none", "--work-dir", str(tmp_path / "work"))
    assert_clean_error(result, str(bad), "truncated")


def test_eval_script_bad_val_image(tmp_path):
    from libra.engine.checkpoint import make_checkpoint
    from libra.presets import build_model

    root = make_coco(tmp_path / "coco")
    checkpoint = tmp_path / "model.pth"
    model = build_model("libra_faster_rcnn_r50_fpn", 1, **TINY_MODEL)
    torch.save(make_checkpoint(model, None, None, None, 1, 1, "libra_faster_rcnn_r50_fpn", 1), checkpoint)
    flags = ["--dataset", "coco", "--data-root", str(root), "--checkpoint", str(checkpoint), "--min-size", "64",
             "--max-size", "64", "--width-per-group", "8", "--stage-blocks", "1", "1", "1", "1", "--threads", "1",
             "--set", "fpn_channels=32", "--set", "fc_channels=64", "--set", "roi_batch_size=32",
             "--set", "rpn_batch_size=64", "--work-dir", str(tmp_path / "eval")]
    bad = image_path(root, "coco", "val")
    corrupt(bad, "empty")
    assert_clean_error(run_script("eval.py", *flags, "--workers", "0"), str(bad), "empty")
    corrupt(bad, "random")
    assert_clean_error(run_script("eval.py", *flags, "--workers", "2", "--check-images", "none"), str(bad))
    assert not (tmp_path / "eval" / "metrics.json").exists()


# ---------------------------------------------------------------------------------------------
# 3. Ground-truth boxes outside the image: clipped, empty ones dropped, absurd ones rejected
# ---------------------------------------------------------------------------------------------
def _coco_with_boxes(tmp_path: Path, annotations: list[dict]) -> DataSettings:
    root = tmp_path / "coco"
    make_coco(root)
    ann_file = root / "annotations" / "instances_train2017.json"
    ann = json.loads(ann_file.read_text())
    ann["annotations"] = annotations
    ann_file.write_text(json.dumps(ann))
    return settings("coco", root)


def test_out_of_image_boxes_are_clipped_and_empty_ones_dropped(tmp_path):
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [-10, 20, 30, 100], "area": 3000, "iscrowd": 0},  # partly out
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [70, 5, 20, 20], "area": 400, "iscrowd": 0},  # right of it
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": [63.5, 5, 20, 20], "area": 400, "iscrowd": 0},  # 0.5 px inside
        {"id": 4, "image_id": 1, "category_id": 1, "bbox": [-5, -5, 200, 200], "area": 4e4, "iscrowd": 1},  # crowd
        {"id": 5, "image_id": 2, "category_id": 1, "bbox": [100, 100, 30, 30], "area": 900, "iscrowd": 0},  # all outside
    ]
    dataset = build_split(_coco_with_boxes(tmp_path, annotations), train=True)
    assert dataset.image_ids == [1]  # image 2's only box is outside the image: no usable box, dropped in training
    record = dataset.records[0]
    np.testing.assert_allclose(record.boxes, [[0, 20, 20, 64]])
    np.testing.assert_allclose(record.ignore_boxes, [[0, 0, 64, 64]])
    dataset.transform.flip_prob = 0.0
    _, target = dataset[0]
    assert target["boxes"].tolist() == [[0.0, 20.0, 20.0, 64.0]] and target["labels"].tolist() == [0]
    assert target["ignore_boxes"].tolist() == [[0.0, 0.0, 64.0, 64.0]]
    # Evaluation keeps every image; the boxes are clipped the same way.
    val_root = Path(dataset.root).parent
    (val_root / "annotations" / "instances_val2017.json").write_text(
        (val_root / "annotations" / "instances_train2017.json").read_text().replace("train_", "val_"))
    val = build_split(settings("coco", val_root), train=False)
    assert val.image_ids == [1, 2] and val.records[1].boxes.shape == (0, 4)


def test_voc_boxes_are_clipped(tmp_path):
    root = make_voc(tmp_path / "voc")
    xml = root / "VOC2007" / "Annotations" / "000000.xml"
    xml.write_text(xml.read_text().replace("<xmax>40</xmax>", "<xmax>90</xmax>")
                   .replace("</annotation>", "<object><name>cat</name><bndbox><xmin>80</xmin><ymin>1</ymin>"
                            "<xmax>99</xmax><ymax>9</ymax></bndbox></object></annotation>"))
    dataset = build_split(settings("voc", root), train=True)
    record = dataset.records[0]
    np.testing.assert_allclose(record.boxes, [[8, 16, 64, 48]])  # the cat (all outside) is dropped
    assert record.labels.tolist() == [11] and record.difficult.tolist() == [False]


@pytest.mark.parametrize("value", [1e9, 1e30, float("inf"), -1e7])
def test_absurd_boxes_are_rejected_with_one_line(tmp_path, value):
    annotations = [{"id": 42, "image_id": 1, "category_id": 1, "bbox": [1, 2, value, 30], "area": 100, "iscrowd": 0}]
    with pytest.raises(DataError) as info:
        build_split(_coco_with_boxes(tmp_path, annotations), train=True)
    message = str(info.value)
    assert "annotation 42" in message and "image 1" in message and "\n" not in message, message


def test_absurd_voc_box_is_rejected(tmp_path):
    root = make_voc(tmp_path / "voc")
    xml = root / "VOC2007" / "Annotations" / "000000.xml"
    xml.write_text(xml.read_text().replace("<xmax>40</xmax>", "<xmax>1e9</xmax>"))
    with pytest.raises(DataError, match="000000.xml.*1e\\+?0?9|000000.xml.*1000000000"):
        build_split(settings("voc", root), train=True)


def test_train_script_absurd_box(tmp_path):
    root = make_coco(tmp_path / "coco", boxes={"train": [[1, 2, 1e30, 30]]})
    result = run_script("train.py", *TINY, "--dataset", "coco", "--data-root", str(root), "--workers", "0",
                        "--work-dir", str(tmp_path / "work"))
    assert_clean_error(result, "annotation 1", "image 1")


# ---------------------------------------------------------------------------------------------
# 4. --set: one line naming the key and the expected type, exit code 1, in both scripts
# ---------------------------------------------------------------------------------------------
def test_set_overrides_are_checked_against_the_preset():
    preset = "libra_faster_rcnn_r50_fpn"
    assert parse_set_overrides(["fpn_channels=32", "score_thr=0.1", "nms_thr=1", "refine_type=null",
                                "stage_blocks=[1, 1, 1, 1]", "box_loss=l1", "width_per_group=8"], preset) == {
        "fpn_channels": 32, "score_thr": 0.1, "nms_thr": 1.0, "refine_type": None, "stage_blocks": (1, 1, 1, 1),
        "box_loss": "l1", "width_per_group": 8}
    bad = {
        "noequals": "KEY=VALUE",
        "fpn_channels=abc": "expected an integer (preset default 256)",
        "fpn_channels=1.5": "expected an integer",
        "fpn_channels=true": "expected an integer",
        "fpn_channels=0": "expected an integer >= 1",
        "fc_channels=-2": "expected an integer >= 1",
        "score_thr=high": "expected a finite number",
        "score_thr=NaN": "finite",
        "box_loss=3": "expected one of",
        "neck=bfp2": "expected one of",
        "stage_blocks=[1, 1]": "4 integers",
        "width_per_group=abc": "integer",
        "fpn_chanels=32": "fpn_channels",  # did you mean
        "=3": "unknown",
    }
    for item, fragment in bad.items():
        with pytest.raises(DataError) as info:
            parse_set_overrides([item], preset)
        message = str(info.value)
        assert fragment in message and "\n" not in message, (item, message)
        assert item.split("=")[0] in message, (item, message)


@pytest.mark.parametrize("flags, fragments", [
    (["--set", "noequals"], ["--set", "noequals", "KEY=VALUE"]),
    (["--set", "fpn_channels=abc"], ["fpn_channels=abc", "integer", "256"]),
    (["--model", "nope"], ["nope", "libra_faster_rcnn_r50_fpn"]),
])
def test_scripts_report_bad_command_line_values_on_one_line(tmp_path, flags, fragments):
    data = ["--data-root", str(tmp_path / "syn"), "--synthetic-num-train", "2", "--synthetic-num-val", "1",
            "--synthetic-image-size", "32"]
    assert_clean_error(run_script("train.py", *data, *flags, "--work-dir", str(tmp_path / "work")), *fragments)
    assert_clean_error(run_script("eval.py", *data, *flags, "--fps", "--work-dir", str(tmp_path / "work")), *fragments)
    assert not (tmp_path / "syn").exists() and not (tmp_path / "work").exists()  # refused before anything is made
