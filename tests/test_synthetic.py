"""Tests of the embedded synthetic shapes dataset (libra.data.synthetic)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from libra.data import CocoDetection, build_dataset, collate, ensure_synthetic_dataset
from libra.evaluation import build_evaluator
from libra.data.synthetic import SYNTHETIC_CLASSES, render_synthetic_image, synthetic_fingerprint

torch.set_num_threads(1)
SMALL = dict(num_train=12, num_val=6, image_size=(96, 128))


def test_generation_is_deterministic_and_idempotent(tmp_path):
    a = ensure_synthetic_dataset(tmp_path / "a", **SMALL, seed=3)
    b = ensure_synthetic_dataset(tmp_path / "b", **SMALL, seed=3)
    c = ensure_synthetic_dataset(tmp_path / "c", **SMALL, seed=4)
    assert a["train_ann"].read_bytes() == b["train_ann"].read_bytes()
    assert synthetic_fingerprint(a["root"]) == synthetic_fingerprint(b["root"])
    assert synthetic_fingerprint(a["root"]) != synthetic_fingerprint(c["root"])
    assert len(list(a["train_images"].glob("*.png"))) == 12 and len(list(a["val_images"].glob("*.png"))) == 6
    # A second call reuses the files (no rewrite) ...
    stamp = a["train_ann"].stat().st_mtime_ns
    ensure_synthetic_dataset(tmp_path / "a", **SMALL, seed=3)
    assert a["train_ann"].stat().st_mtime_ns == stamp
    # ... and an incomplete folder is regenerated; no temporary folders are left behind.
    next(a["val_images"].glob("*.png")).unlink()
    ensure_synthetic_dataset(tmp_path / "a", **SMALL, seed=3)
    assert synthetic_fingerprint(a["root"]) == synthetic_fingerprint(b["root"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]
    with pytest.raises(ValueError):
        ensure_synthetic_dataset(tmp_path / "d", num_train=0)


def test_boxes_tightly_bound_the_drawn_shapes():
    for index in range(8):
        image, background, owner, objects = render_synthetic_image(0, "train", index, (128, 160))
        assert 1 <= len(objects) <= 6
        inside_any = np.zeros(owner.shape, bool)
        for k, obj in enumerate(objects):
            x1, y1, x2, y2 = (int(v) for v in obj["box"])
            ys, xs = np.nonzero(owner == k)
            # Tight: the box is exactly the extent of the shape's visible pixels (continuous coords).
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x1, y1, x2, y2)
            assert 0 <= obj["label"] < len(SYNTHETIC_CLASSES)
            inside_any[y1:y2, x1:x2] = True
        # Everything drawn lies inside some box: outside all boxes the image is the background.
        assert np.array_equal(image[~inside_any], background[~inside_any])
        # The shapes really changed the pixels they own (fill colours differ from the background).
        changed = np.any(image != background, axis=-1)
        assert changed[owner >= 0].mean() > 0.9


def test_scales_and_classes_are_varied():
    sizes, labels = [], set()
    for index in range(40):
        _, _, _, objects = render_synthetic_image(1, "train", index, (256, 256))
        for obj in objects:
            x1, y1, x2, y2 = obj["box"]
            sizes.append(max(x2 - x1, y2 - y1))
            labels.add(obj["label"])
    assert labels == set(range(4))
    assert min(sizes) < 32 and max(sizes) > 100


def test_loads_through_coco_loader_and_evaluates_to_ap_one(tmp_path):
    paths = ensure_synthetic_dataset(tmp_path / "syn", **SMALL)
    raw = json.loads(paths["val_ann"].read_text())
    assert [c["name"] for c in raw["categories"]] == list(SYNTHETIC_CLASSES)
    val = CocoDetection(paths["val_images"], paths["val_ann"], train=False, min_size=64, max_size=96)
    assert len(val) == 6 and val.num_classes == 4
    image, target = val[0]
    assert target["img_shape"] == (64, 85) and tuple(image.shape) == (3, 64, 85)
    with Image.open(paths["val_images"] / raw["images"][0]["file_name"]) as im:
        assert im.size == (128, 96)
    evaluator = build_evaluator(val.evaluation_protocol, val.coco_api, val.label_to_cat_id, ("bbox",), verbose=False)
    for record in val.records:
        detection = {"boxes": torch.from_numpy(record.boxes), "scores": torch.ones(len(record.labels)),
                     "labels": torch.from_numpy(record.labels)}
        evaluator.update([record.image_id], [detection])
    assert evaluator.evaluate()["AP"] == pytest.approx(1.0)

    train = build_dataset("synthetic", tmp_path / "syn", "train", synthetic_kwargs=SMALL)
    assert train.transform.min_size == 256 and train.transform.max_size == 384 and train.train
    images, targets = collate([train[(0, 0)], train[(1, 0)]])
    assert images.shape[-1] % 32 == 0 and len(targets) == 2
    assert all(len(t["boxes"]) == len(t["labels"]) > 0 for t in targets)


def test_annotations_carry_exact_instance_masks_and_older_formats_are_regenerated(tmp_path):
    from libra.data import load_coco_api

    paths = ensure_synthetic_dataset(tmp_path / "syn", **SMALL)
    coco = load_coco_api(paths["train_ann"])
    for image_id in sorted(coco.imgs)[:4]:
        _, _, owner, objects = render_synthetic_image(0, "train", image_id - 1, SMALL["image_size"])
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        assert len(anns) == len(objects)
        for ann, obj in zip(anns, objects):
            mask = coco.annToMask(ann).astype(bool)  # the RLE segmentation
            assert np.array_equal(mask, owner == obj["owner"])  # exactly the object's visible pixels
            assert ann["area"] == int(mask.sum())
    # A folder written by format version 1 (boxes only) is this builder's own: it is regenerated.
    marker = json.loads(paths["marker"].read_text())
    assert marker["version"] == 2
    for name in ("marker", "meta"):
        content = json.loads(paths[name].read_text())
        paths[name].write_text(json.dumps({**content, "version": 1}))
    raw = json.loads(paths["train_ann"].read_text())
    for ann in raw["annotations"]:
        del ann["segmentation"]
    paths["train_ann"].write_text(json.dumps(raw))
    ensure_synthetic_dataset(tmp_path / "syn", **SMALL)
    assert json.loads(paths["marker"].read_text())["version"] == 2
    assert all("segmentation" in ann for ann in json.loads(paths["train_ann"].read_text())["annotations"])
