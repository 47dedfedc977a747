"""Tests of libra.data: loaders (real_mini and hand-made files), transforms, collate, samplers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from libra.data import (
    CocoDetection,
    DetectionTransform,
    GroupedBatchSampler,
    InfiniteOrEpochDistributedSampler,
    LVISDetection,
    RepeatFactorSampler,
    VOCDetection,
    build_dataset,
    collate,
    compute_repeat_factors,
    draw_detections,
    get_resize_size,
    image_counts_per_class,
    preprocess_images,
)
from libra.data.samplers import stochastic_repeats
from libra.data.transforms import PIXEL_MEAN, PIXEL_STD, denormalize_image, hflip_boxes
from libra.data.voc import VOC_CLASSES, voc_split_parts

REAL_MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "real_mini"
needs_real_mini = pytest.mark.skipif(not REAL_MINI.is_dir(), reason=f"real_mini data not found at {REAL_MINI}")

torch.set_num_threads(1)


# ---------------------------------------------------------------- helpers: hand-made datasets
def _write_image(path: Path, width: int, height: int, box: tuple[int, int, int, int] | None = None) -> None:
    """Black image with an optional white rectangle covering pixel columns x1..x2-1, rows y1..y2-1."""
    array = np.zeros((height, width, 3), np.uint8)
    if box is not None:
        x1, y1, x2, y2 = box
        array[y1:y2, x1:x2] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _make_coco(tmp_path: Path, annotations: list[dict] | None = None, images: list[dict] | None = None) -> tuple[Path, Path]:
    image_dir = tmp_path / "images"
    images = images if images is not None else [
        {"id": 7, "file_name": "a.png", "width": 64, "height": 48},
        {"id": 9, "file_name": "b.png", "width": 40, "height": 60},
        {"id": 11, "file_name": "c.png", "width": 32, "height": 32},
    ]
    for im in images:
        _write_image(image_dir / im["file_name"], im["width"], im["height"])
    annotations = annotations if annotations is not None else [
        {"id": 1, "image_id": 7, "category_id": 5, "bbox": [10, 5, 20, 10], "area": 200, "iscrowd": 0},
        {"id": 2, "image_id": 7, "category_id": 3, "bbox": [0, 0, 30, 30], "area": 900, "iscrowd": 1},
        {"id": 3, "image_id": 7, "category_id": 3, "bbox": [1, 1, 0.5, 10], "area": 5, "iscrowd": 0},  # w < 1: skipped
        {"id": 4, "image_id": 9, "category_id": 3, "bbox": [2, 3, 10, 20], "area": 200, "iscrowd": 0},
        {"id": 5, "image_id": 9, "category_id": 5, "bbox": [2, 3, 10, 20], "area": 0, "iscrowd": 0},  # area 0: skipped
        {"id": 6, "image_id": 11, "category_id": 3, "bbox": [2, 3, 10, 0.5], "area": 5, "iscrowd": 0},  # h < 1: skipped
    ]
    ann = {"images": images, "annotations": annotations,
           "categories": [{"id": 3, "name": "cat3"}, {"id": 5, "name": "cat5"}]}
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps(ann))
    return image_dir, ann_file


# ---------------------------------------------------------------- resize / flip / normalise
def test_resize_sizes_follow_the_spec_rule():
    # s = min(1333 / long, 800 / short); new size = round(w s) x round(h s) (MMDetection
    # `coco_detection.py`: `Resize scale=(1333, 800) keep_ratio=True`, mmcv's half-up rounding).
    assert get_resize_size(375, 500) == (800, 1067)  # 500 * 800/375 = 1066.67 -> 1067
    assert get_resize_size(500, 375) == (1067, 800)
    assert get_resize_size(480, 640) == (800, 1067)
    assert get_resize_size(427, 640) == (800, 1199)  # 640 * 800/427 = 1199.06
    assert get_resize_size(300, 1000) == (400, 1333)  # long side caps: s = 1.333
    assert get_resize_size(800, 1333) == (800, 1333)
    assert get_resize_size(256, 256, 256, 384) == (256, 256)
    with pytest.raises(ValueError):
        get_resize_size(0, 10)


def test_transform_keeps_box_aligned_with_pixels_through_resize_and_flip():
    width, height, box = 100, 60, (10, 20, 40, 50)  # white pixels: columns 10..39, rows 20..49
    image = torch.zeros(3, height, width)
    image[:, box[1]:box[3], box[0]:box[2]] = 255.0
    gt = torch.tensor([box], dtype=torch.float32)
    for flip_prob in (0.0, 1.0):
        transform = DetectionTransform(train=True, min_size=150, max_size=1000, flip_prob=flip_prob)
        out, boxes, meta = transform(image, {"boxes": gt}, torch.Generator().manual_seed(0))
        assert meta["flip"] == (flip_prob == 1.0)
        assert meta["img_shape"] == (150, 250) and tuple(out.shape) == (3, 150, 250)
        assert meta["scale_factor"] == (2.5, 2.5)
        raw = denormalize_image(out)[0]
        white = raw > 200
        ys, xs = torch.nonzero(white, as_tuple=True)
        x1, y1, x2, y2 = boxes["boxes"][0].tolist()
        # Every clearly white pixel centre lies inside the transformed box ...
        assert xs.min() + 0.5 >= x1 and xs.max() + 0.5 <= x2
        assert ys.min() + 0.5 >= y1 and ys.max() + 0.5 <= y2
        # ... and the box is tight (within a pixel of the white region at 2.5x scale).
        assert abs((xs.min().item()) - x1) <= 1.5 and abs((xs.max().item() + 1) - x2) <= 1.5
        assert abs((ys.min().item()) - y1) <= 1.5 and abs((ys.max().item() + 1) - y2) <= 1.5
    flipped = hflip_boxes(torch.tensor([[10.0, 1.0, 40.0, 2.0]]), 100)
    assert flipped.tolist() == [[60.0, 1.0, 90.0, 2.0]]


def test_normalisation_uses_imagenet_mean_and_std():
    image = torch.stack([torch.full((4, 4), m) for m in PIXEL_MEAN])
    out, _, _ = DetectionTransform(train=False, min_size=4, max_size=4)(image, {})
    assert torch.allclose(out, torch.zeros_like(out), atol=1e-5)
    image = image + torch.tensor(PIXEL_STD)[:, None, None]
    out, _, _ = DetectionTransform(train=False, min_size=4, max_size=4)(image, {})
    assert torch.allclose(out, torch.ones_like(out), atol=1e-5)


def test_multiscale_training_draws_short_side_in_range_and_is_seeded():
    transform = DetectionTransform(train=True, min_size=800, max_size=1333, multi_scale_range=(640, 800), flip_prob=0.5)
    image = torch.zeros(3, 30, 40)
    shorts, flips = set(), set()
    for seed in range(12):
        _, _, meta = transform(image, {}, torch.Generator().manual_seed(seed))
        _, _, meta2 = transform(image, {}, torch.Generator().manual_seed(seed))
        assert meta == meta2
        h, w = meta["img_shape"]
        assert 640 <= h <= 800 and w <= 1333
        shorts.add(h)
        flips.add(meta["flip"])
    assert len(shorts) > 3 and flips == {True, False}


def test_collate_pads_to_multiple_of_32_with_zeros():
    a, b = torch.ones(3, 50, 70), torch.ones(3, 65, 33)
    images, targets = collate([(a, {"id": 1}), (b, {"id": 2})])
    assert tuple(images.shape) == (2, 3, 96, 96)
    assert images[0, :, :50, :70].eq(1).all() and images[0, :, 50:].eq(0).all() and images[0, :, :, 70:].eq(0).all()
    assert images[1, :, :65, :33].eq(1).all() and images[1, :, 65:].eq(0).all()
    assert [t["id"] for t in targets] == [1, 2]


def test_preprocess_images_for_raw_inference():
    raw = [torch.randint(0, 256, (3, 375, 500), dtype=torch.uint8), torch.rand(3, 100, 50) * 255]
    batch, sizes, originals = preprocess_images(raw)
    assert sizes == [(800, 1067), (1333, 667)]
    assert originals == [(375, 500), (100, 50)]
    assert batch.shape[-2] % 32 == 0 and batch.shape[-1] % 32 == 0
    assert batch.shape[-2] >= 1333 and batch.shape[-1] >= 1067
    with pytest.raises(ValueError, match="Tensor\\[3, h, w\\]"):
        preprocess_images([torch.zeros(1, 10, 10)])


# ---------------------------------------------------------------- COCO loader (hand-made)
def test_coco_loader_boxes_labels_crowd_and_skips(tmp_path):
    image_dir, ann_file = _make_coco(tmp_path)
    train = CocoDetection(image_dir, ann_file, train=True, min_size=48, max_size=1000, flip_prob=0.0)
    # Image 11 has only an unusable box: dropped in training, kept in evaluation.
    assert train.image_ids == [7, 9]
    assert train.label_to_cat_id == [3, 5] and train.class_names == ["cat3", "cat5"] and train.num_classes == 2
    rec = train.records[0]
    np.testing.assert_allclose(rec.boxes, [[10, 5, 30, 15]])
    assert rec.labels.tolist() == [1]
    np.testing.assert_allclose(rec.ignore_boxes, [[0, 0, 30, 30]])  # crowd -> ignore
    assert train.records[1].labels.tolist() == [0] and len(train.records[1].boxes) == 1
    assert train.aspect_ratio_flags == [0, 1]
    image, target = train[0]
    assert target["image_id"] == 7 and target["ori_shape"] == (48, 64) and target["img_shape"] == (48, 64)
    assert torch.allclose(target["boxes"], torch.tensor([[10.0, 5.0, 30.0, 15.0]]))
    assert target["labels"].dtype == torch.int64 and target["boxes"].dtype == torch.float32
    assert tuple(target["ignore_boxes"].shape) == (1, 4)

    val = CocoDetection(image_dir, ann_file, train=False, min_size=96, max_size=1000)
    assert val.image_ids == [7, 9, 11]
    _, target = val[0]
    assert target["scale_factor"] == (2.0, 2.0) and target["flip"] is False
    assert torch.allclose(target["boxes"], torch.tensor([[20.0, 10.0, 60.0, 30.0]]))
    _, empty = val[2]
    assert tuple(empty["boxes"].shape) == (0, 4) and empty["labels"].numel() == 0


def test_coco_errors_name_paths_and_ids(tmp_path):
    image_dir, ann_file = _make_coco(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing_root"):
        build_dataset("coco", tmp_path / "missing_root", "train")
    with pytest.raises(FileNotFoundError, match="instances_train2017.json"):
        (tmp_path / "train2017").mkdir()
        build_dataset("coco", tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="annotations"):
        CocoDetection(image_dir, tmp_path / "nope.json", train=True)
    # Missing image file: clear error naming the file when the sample is loaded.
    (image_dir / "b.png").unlink()
    ds = CocoDetection(image_dir, ann_file, train=True)
    with pytest.raises(FileNotFoundError, match="b.png"):
        ds[1]
    bad_cases = [
        ({"bbox": [1, 2, 3]}, "annotation 1 of image 7.*4 numbers"),
        ({"bbox": [1, float("nan"), 3, 4]}, "annotation 1 of image 7.*NaN"),
        ({"bbox": [1, 2, "x", 4]}, "annotation 1 of image 7"),
        ({"category_id": 99}, "annotation 1 of image 7.*unknown category_id 99"),
    ]
    for change, message in bad_cases:
        ann = {"id": 1, "image_id": 7, "category_id": 3, "bbox": [1, 2, 3, 4], "area": 12, "iscrowd": 0, **change}
        sub = tmp_path / f"bad{len(message)}"
        image_dir, ann_file = _make_coco(sub, annotations=[ann])
        with pytest.raises(ValueError, match=message):
            CocoDetection(image_dir, ann_file, train=True)


def test_dataset_augmentation_is_reproducible_per_index_and_epoch(tmp_path):
    image_dir, ann_file = _make_coco(tmp_path)
    ds = CocoDetection(image_dir, ann_file, train=True, min_size=48, max_size=1000, multi_scale_range=(32, 64), seed=3)
    metas = [(ds[(0, e)][1]["img_shape"], ds[(0, e)][1]["flip"]) for e in range(10)]
    assert metas == [(ds[(0, e)][1]["img_shape"], ds[(0, e)][1]["flip"]) for e in range(10)]
    assert len(set(metas)) > 2  # epochs differ
    ds.set_epoch(4)
    assert (ds[0][1]["img_shape"], ds[0][1]["flip"]) == metas[4]
    # Works through a multi-worker-like path: DataLoader with the epoch-carrying grouped sampler.
    sampler = InfiniteOrEpochDistributedSampler(len(ds), shuffle=False)
    batches = GroupedBatchSampler(sampler, ds.aspect_ratio_flags, batch_size=1)
    batches.set_epoch(4)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=batches, collate_fn=collate)
    first = next(iter(loader))
    assert (first.targets[0]["img_shape"], first.targets[0]["flip"]) == metas[4]
    # Persistent workers never see set_epoch on the dataset; the epoch travels with the indices.
    loader = torch.utils.data.DataLoader(ds, batch_sampler=batches, collate_fn=collate, num_workers=2, persistent_workers=True)
    for epoch in (2, 5):
        batches.set_epoch(epoch)
        got = {t["image_id"]: (t["img_shape"], t["flip"]) for _, targets in loader for t in targets}
        assert got == {ds.records[i].image_id: (ds[(i, epoch)][1]["img_shape"], ds[(i, epoch)][1]["flip"]) for i in range(len(ds))}


# ---------------------------------------------------------------- VOC (hand-made + real)
def _make_voc(root: Path, year: str, objects: dict[str, list[tuple[str, tuple[int, int, int, int], int]]], split: str) -> None:
    year_dir = root / year
    (year_dir / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (year_dir / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(objects) + "\n")
    for stem, objs in objects.items():
        _write_image(year_dir / "JPEGImages" / f"{stem}.jpg", 50, 40)
        xml = ["<annotation><size><width>50</width><height>40</height><depth>3</depth></size>"]
        for name, (x1, y1, x2, y2), difficult in objs:
            xml.append(f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{x1}</xmin>"
                       f"<ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")
        xml.append("</annotation>")
        (year_dir / "Annotations").mkdir(parents=True, exist_ok=True)
        (year_dir / "Annotations" / f"{stem}.xml").write_text("".join(xml))


def test_voc_loader_difficult_and_coordinates(tmp_path):
    _make_voc(tmp_path, "VOC2007", {"000001": [("dog", (1, 1, 10, 20), 0), ("cat", (5, 5, 30, 30), 1)],
                                    "000002": [("person", (3, 4, 8, 9), 1)]}, "trainval")
    _make_voc(tmp_path, "VOC2012", {"2008_000010": [("car", (11, 12, 50, 40), 0)]}, "trainval")
    train = build_dataset("voc", tmp_path, "train", min_size=40, max_size=1000, flip_prob=0.0)
    # 07 trainval + 12 trainval; image 000002 has only a difficult object -> dropped in training.
    assert sorted(train.image_ids) == sorted([10**10 + 1, 2008000010])
    assert train.num_classes == 20 and train.class_names == list(VOC_CLASSES)
    _, target = train[0]
    # 1-based inclusive XML (1, 1, 10, 20) -> continuous [0, 0, 10, 20]; difficult cat -> ignore_boxes.
    assert target["boxes"].tolist() == [[0.0, 0.0, 10.0, 20.0]]
    assert target["labels"].tolist() == [VOC_CLASSES.index("dog")]
    assert target["ignore_boxes"].tolist() == [[4.0, 4.0, 30.0, 30.0]]
    assert "difficult" not in target
    # Evaluation: difficult objects stay in the ground truth, flagged.
    val = VOCDetection(voc_split_parts(tmp_path, "trainval"), train=False, min_size=40, max_size=1000)
    assert len(val) == 3
    _, target = val[0]
    assert target["difficult"].tolist() == [False, True] and len(target["boxes"]) == 2
    gt = val.ground_truth()
    assert gt[10**10 + 2]["difficult"].tolist() == [True]
    with pytest.raises(FileNotFoundError, match="VOC2007"):
        build_dataset("voc", tmp_path / "VOC2012", "test")


def test_voc_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="VOC2007 or VOC2012"):
        (tmp_path / "empty").mkdir()
        build_dataset("voc", tmp_path / "empty", "train")
    _make_voc(tmp_path, "VOC2012", {"a_1": [("unicorn", (1, 1, 5, 5), 0)]}, "train")
    with pytest.raises(ValueError, match="a_1.xml.*unicorn"):
        VOCDetection([(tmp_path / "VOC2012", "train")], train=True)
    _make_voc(tmp_path, "VOC2012", {"a_2": [("dog", (1, 1, 5, 5), 0)]}, "val")
    (tmp_path / "VOC2012" / "Annotations" / "a_2.xml").write_text("<annotation><size><width>5</width>")
    with pytest.raises(ValueError, match="a_2.xml.*malformed"):
        VOCDetection([(tmp_path / "VOC2012", "val")], train=True)
    with pytest.raises(FileNotFoundError, match="nosplit.txt"):
        VOCDetection([(tmp_path / "VOC2012", "nosplit")], train=True)


@needs_real_mini
def test_real_mini_voc2012_only_root():
    train = build_dataset("voc", REAL_MINI / "voc", "train", flip_prob=0.0)  # VOC2012 trainval only
    assert len(train) == 3
    val = build_dataset("voc", REAL_MINI / "voc", "val")
    assert val.image_ids == [2011000025]
    rec = train.records[train.image_ids.index(2011000003)]
    # XML: person (191, 107, 313, 329), person (365, 83, 500, 333)
    np.testing.assert_allclose(rec.boxes, [[190, 106, 313, 329], [364, 82, 500, 333]])
    assert rec.labels.tolist() == [VOC_CLASSES.index("person")] * 2
    image, target = val[0]
    assert target["ori_shape"] == (375, 500) and target["img_shape"] == (800, 1067)
    assert tuple(image.shape) == (3, 800, 1067)
    assert set(VOC_CLASSES[i] for i in target["labels"].tolist()) == {"bus", "car"}


@needs_real_mini
def test_real_mini_coco_matches_json():
    root = REAL_MINI / "coco"
    ds = CocoDetection(root / "images", root / "annotations" / "instances_trainval.json", train=True, flip_prob=0.0)
    raw = json.loads((root / "annotations" / "instances_trainval.json").read_text())
    assert ds.image_ids == sorted(im["id"] for im in raw["images"])
    assert ds.num_classes == 20
    for rec in ds.records:
        anns = [a for a in raw["annotations"] if a["image_id"] == rec.image_id]
        expected = sorted([a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns)
        assert sorted(rec.boxes.tolist()) == expected
        assert sorted(ds.label_to_cat_id[l] for l in rec.labels) == sorted(a["category_id"] for a in anns)
    i = ds.image_ids.index(4)  # terrain2.png, 1024 x 682, 5 cars
    image, target = ds[i]
    assert target["ori_shape"] == (682, 1024)
    assert target["img_shape"] == get_resize_size(682, 1024) == (800, 1201)
    sx, sy = target["scale_factor"]
    assert torch.allclose(target["boxes"][:, 0::2] / sx, torch.from_numpy(ds.records[i].boxes[:, 0::2]), atol=1e-3)
    assert torch.allclose(target["boxes"][:, 1::2] / sy, torch.from_numpy(ds.records[i].boxes[:, 1::2]), atol=1e-3)
    assert ds.image_counts_per_class()[ds.label_to_cat_id.index(7)] == 2  # car in 2011_000025 and terrain2


@needs_real_mini
def test_real_mini_lvis():
    ds = LVISDetection(REAL_MINI / "coco" / "images", REAL_MINI / "lvis" / "lvis_v1_minitrain.json", train=True)
    assert ds.num_classes == 1203 and len(ds) == 3
    assert set(ds.frequencies) == {"r", "c", "f"}
    assert ds.class_names[ds.label_to_cat_id.index(793)] == "person"
    counts = ds.image_counts_per_class()
    assert counts[ds.label_to_cat_id.index(793)] == 2 and counts.sum() == 6
    image, target = ds[0]
    assert target["image_id"] == 1 and len(target["boxes"]) == 3


def test_lvis_resolves_coco_url(tmp_path):
    _write_image(tmp_path / "val2017" / "000000000042.jpg", 30, 20)
    ann = {
        "images": [{"id": 42, "width": 30, "height": 20, "coco_url": "http://images.cocodataset.org/val2017/000000000042.jpg",
                    "neg_category_ids": [2], "not_exhaustive_category_ids": []}],
        "annotations": [{"id": 1, "image_id": 42, "category_id": 1, "bbox": [1, 2, 5, 6], "area": 30}],
        "categories": [{"id": 1, "name": "a", "frequency": "r"}, {"id": 2, "name": "b", "frequency": "f"}],
    }
    (tmp_path / "lvis_v1_val.json").write_text(json.dumps(ann))
    ds = build_dataset("lvis", tmp_path, "val")
    assert ds.records[0].file_path == tmp_path / "val2017" / "000000000042.jpg"
    assert ds.frequencies == ["r", "f"]
    _, target = ds[0]
    assert target["image_id"] == 42 and target["labels"].tolist() == [0]
    with pytest.raises(FileNotFoundError, match="lvis_v1_train.json"):
        build_dataset("lvis", tmp_path, "train")


# ---------------------------------------------------------------- samplers
def test_group_sampler_homogeneous_batches_cover_every_index_once():
    flags = [0, 1, 1, 0, 0, 1, 0, 1, 1, 0, 0]
    sampler = InfiniteOrEpochDistributedSampler(len(flags), seed=1)
    batches = GroupedBatchSampler(sampler, flags, batch_size=2)
    for epoch in range(3):
        batches.set_epoch(epoch)
        out = list(batches)
        assert len(out) == len(batches)
        indices = [i for b in out for i, _ in b]
        assert sorted(indices) == list(range(len(flags)))
        assert all(e == epoch for b in out for _, e in b)
        for b in out:
            assert len({flags[i] for i, _ in b}) == 1
    # Orders differ between epochs but are the same for the same epoch.
    batches.set_epoch(0)
    first = list(batches)
    batches.set_epoch(1)
    assert first != list(batches)
    batches.set_epoch(0)
    assert first == list(batches)


def test_distributed_sampler_shards_and_merge_tail_equalises_batch_counts():
    flags = [0, 1] * 7 + [0]  # 15 images
    world = 2
    shards = [InfiniteOrEpochDistributedSampler(15, num_replicas=world, rank=r, seed=5) for r in range(world)]
    seen = [i for s in shards for i in s]
    assert len(seen) == 16 and set(seen) == set(range(15))  # padded by wrap-around
    counts = []
    for s in shards:
        gb = GroupedBatchSampler(s, flags, batch_size=3, merge_tail=True, attach_epoch=False)
        out = list(gb)
        counts.append(len(out))
        assert sorted(i for b in out for i in b) == sorted(s)
    assert counts == [3, 3]  # ceil(8 / 3) on each rank
    infinite = iter(InfiniteOrEpochDistributedSampler(4, seed=0, infinite=True, with_epoch=True))
    items = [next(infinite) for _ in range(12)]
    assert [e for _, e in items] == [0] * 4 + [1] * 4 + [2] * 4
    assert sorted(i for i, _ in items[4:8]) == [0, 1, 2, 3]


def test_repeat_factors_on_hand_made_table():
    # 1000 images: class 0 in all, class 1 in 1 image (f = 0.001), class 2 in 4 (f = 0.004), class 3 in none.
    # With threshold 0.01: r(1) = sqrt(0.01 / 0.001) = sqrt(10), r(2) = sqrt(2.5), r(0) = r(3) = 1.
    image_labels = [[0] for _ in range(1000)]
    image_labels[0] = [0, 1]
    for i in range(1, 5):
        image_labels[i] = [0, 2]
    counts = image_counts_per_class(image_labels, 4)
    assert counts.tolist() == [1000, 1, 4, 0]
    image_r, class_r = compute_repeat_factors(image_labels, 4, threshold=0.01)
    assert class_r[0] == 1.0 and class_r[3] == 1.0
    assert math.isclose(class_r[1].item(), math.sqrt(10.0), rel_tol=1e-9)
    assert math.isclose(class_r[2].item(), math.sqrt(2.5), rel_tol=1e-9)
    assert math.isclose(image_r[0].item(), math.sqrt(10.0)) and math.isclose(image_r[3].item(), math.sqrt(2.5))
    assert image_r[10] == 1.0
    # Default threshold 0.001: f(1) = 0.001 -> r = 1.
    _, class_r = compute_repeat_factors(image_labels, 4)
    assert torch.allclose(class_r, torch.ones(4, dtype=torch.float64))


def test_stochastic_rounding_mean_and_determinism():
    factors = torch.tensor([1.0, 1.3, 2.7, 0.5], dtype=torch.float64).repeat(2000)
    reps = stochastic_repeats(factors, torch.Generator().manual_seed(0)).view(-1, 4).double()
    assert torch.allclose(reps.mean(0), torch.tensor([1.0, 1.3, 2.7, 0.5], dtype=torch.float64), atol=0.05)
    assert set(reps[:, 2].long().tolist()) == {2, 3}
    sampler = RepeatFactorSampler(torch.tensor([1.0, 2.5, 1.2]), seed=7)
    sampler.set_epoch(3)
    a = list(sampler)
    sampler.set_epoch(3)
    assert list(sampler) == a and len(sampler) == len(a)
    assert a.count(1) in (2, 3) and a.count(0) == 1
    totals = []
    for epoch in range(400):
        sampler.set_epoch(epoch)
        totals.append(len(sampler))
    assert abs(np.mean(totals) - 4.7) < 0.1
    with pytest.raises(ValueError):
        RepeatFactorSampler([1.0, float("nan")])


def test_ceil_rounding_is_mmdetections_class_balanced_dataset():
    """MMDetection's ClassBalancedDataset: category_freq = images with c / images, r(c) = max(1,
    sqrt(thr / f(c))), r(I) = max over I's categories (1 without any), and image I listed ceil(r(I))
    times, the same every epoch; written here with Python's math on the labels of 11 images."""
    image_labels = [[0, 1], [1], [2], [2, 3], [3], [3], [3], [3], [3], [3], []]
    threshold = 0.9
    num_images = len(image_labels)
    frequency = {c: sum(c in labels for labels in image_labels) / num_images for c in range(4)}
    class_repeat = {c: max(1.0, math.sqrt(threshold / f)) for c, f in frequency.items()}
    image_repeat = [max((class_repeat[c] for c in labels), default=1.0) for labels in image_labels]
    expected = [math.ceil(r) for r in image_repeat]
    # f(0) = 1/11 -> r = 3.15; f(1) = f(2) = 2/11 -> 2.22; f(3) = 8/11 -> 1.11; no label -> 1
    assert expected == [4, 3, 3, 3, 2, 2, 2, 2, 2, 2, 1]
    factors, _ = compute_repeat_factors(image_labels, 4, threshold)
    sampler = RepeatFactorSampler(factors, seed=3, rounding="ceil")
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        indices = list(sampler)
        assert [indices.count(i) for i in range(num_images)] == expected
        orders.append(indices)
    assert orders[0] != orders[1]  # shuffled anew each epoch, the counts stay
    stochastic = RepeatFactorSampler(factors, seed=3)
    assert stochastic.rounding == "stochastic"
    counts = [len(stochastic.epoch_indices(epoch)) for epoch in range(200)]
    assert min(counts) < sum(expected) and abs(np.mean(counts) - float(factors.sum())) < 0.3
    with pytest.raises(ValueError, match="rounding must be one of stochastic, ceil"):
        RepeatFactorSampler(factors, rounding="round")


# ---------------------------------------------------------------- visualisation
def test_draw_detections_writes_png(tmp_path):
    image = torch.zeros(3, 40, 60)
    out = draw_detections(image, torch.tensor([[5.0, 5.0, 30.0, 30.0]]), torch.tensor([1]), torch.tensor([0.9]),
                          ["a", "b"], tmp_path / "sub" / "det.png")
    with Image.open(out) as im:
        array = np.asarray(im.convert("RGB"))
    assert array.shape == (40, 60, 3)
    assert array[20, 5].sum() > 0 and array[20, 17].sum() == 0  # box edge drawn, inside untouched


def test_preprocess_images_scales_unit_range_floats_with_a_warning():
    """torchvision users pass float images in [0, 1]; treating them as 0..255 would make them black."""
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 48, 64), generator=generator, dtype=torch.uint8)
    expected, sizes, originals = preprocess_images([image], min_size=64, max_size=96)
    with pytest.warns(UserWarning, match=r"\[0, 1\]"):
        batch, sizes_unit, _ = preprocess_images([image.float() / 255.0], min_size=64, max_size=96)
    torch.testing.assert_close(batch, expected, rtol=0, atol=1e-4)
    assert sizes_unit == sizes
    # 0..255 floats and uint8 images (even a nearly black one) are taken as they are, silently
    dark = torch.zeros(3, 48, 64, dtype=torch.uint8)
    dark[0, 0, 0] = 1
    import warnings as _warnings

    with _warnings.catch_warnings():
        _warnings.simplefilter("error")
        preprocess_images([image.float()], min_size=64, max_size=96)
        preprocess_images([dark], min_size=64, max_size=96)
    with pytest.raises(ValueError, match="NaN or infinite"):
        preprocess_images([torch.full((3, 48, 64), float("nan"))], min_size=64, max_size=96)
