"""Tests of libra.masks (decode, transforms, targets, pasting, RLE) and of mask ('segm') evaluation
against pycocotools run directly on the same inputs."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from libra.coco_api import load_coco_api
from libra.evaluation import COCOEvaluator, LVISEvaluator, build_evaluator
from libra.masks import (
    InvalidMaskError,
    MaskWarning,
    decode_masks,
    decode_segmentation,
    encode_rle,
    hflip_masks,
    mask_targets,
    pad_masks,
    paste_masks_in_image,
    resize_masks,
    rle_counts_from_string,
)

pytestmark = pytest.mark.usefixtures("single_thread")

REAL_MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "real_mini"
needs_real_mini = pytest.mark.skipif(not REAL_MINI.is_dir(), reason=f"real_mini data not found at {REAL_MINI}")
COCO_JSON = REAL_MINI / "coco" / "annotations" / "instances_trainval.json"
LVIS_JSONS = (REAL_MINI / "lvis" / "lvis_v1_minitrain.json", REAL_MINI / "lvis" / "lvis_v1_minival.json")


def _quiet(fn, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def _uncompressed_counts(bitmap: np.ndarray) -> list[int]:
    """Column-major run lengths starting with a run of zeros (the COCO uncompressed RLE)."""
    flat = np.asarray(bitmap, np.uint8).flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    return ([0] + runs) if flat[0] == 1 else runs


def _random_blobs(rng: np.random.Generator, count: int, height: int, width: int) -> np.ndarray:
    """``count`` random polygon masks [count, H, W] uint8, each non-empty."""
    masks = []
    while len(masks) < count:
        cx, cy = rng.uniform(0.2 * width, 0.8 * width), rng.uniform(0.2 * height, 0.8 * height)
        angles = np.sort(rng.uniform(0, 2 * np.pi, 7))
        radius = rng.uniform(0.1, 0.4, 7) * min(height, width)
        poly = np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], 1).reshape(-1).tolist()
        m = decode_segmentation([poly], height, width)
        if m.any():
            masks.append(m)
    return np.stack(masks)


# ----------------------------------------------------------------------------- decoding
@needs_real_mini
@pytest.mark.parametrize("path", [COCO_JSON, *LVIS_JSONS], ids=["coco", "lvis_train", "lvis_val"])
def test_decode_real_mini_polygons_and_rle_equal_ann_to_mask(path):
    coco = load_coco_api(path)
    checked = 0
    for image_id, info in coco.imgs.items():
        anns = coco.imgToAnns[image_id]
        if not anns:
            continue
        h, w = info["height"], info["width"]
        expected = np.stack([coco.annToMask(a) for a in anns])
        masks, keep = decode_masks([a["segmentation"] for a in anns], h, w, image_id, [a["id"] for a in anns])
        assert keep.all() and masks.dtype == torch.uint8 and masks.shape == (len(anns), h, w)
        np.testing.assert_array_equal(masks.numpy(), expected)
        # The same masks as compressed (str and bytes) and uncompressed RLEs.
        compressed = [coco.annToRLE(a) for a in anns]
        as_str = [{"size": r["size"], "counts": r["counts"].decode("ascii")} for r in compressed]
        uncompressed = [{"size": [h, w], "counts": _uncompressed_counts(m)} for m in expected]
        for segms in (compressed, as_str, uncompressed):
            np.testing.assert_array_equal(decode_masks(segms, h, w, image_id)[0].numpy(), expected)
        checked += len(anns)
    assert checked >= 3


def test_rle_string_parser_matches_pycocotools():
    rng = np.random.default_rng(0)
    for _ in range(20):
        bitmap = (rng.random((23, 17)) < rng.uniform(0.05, 0.95)).astype(np.uint8)
        rle = mask_utils.encode(np.asfortranarray(bitmap))
        assert rle_counts_from_string(rle["counts"]) == _uncompressed_counts(bitmap)
        np.testing.assert_array_equal(decode_segmentation(rle, 23, 17), bitmap)
    # A run longer than 15 per 5-bit group, and the delta coding of later runs.
    bitmap = np.zeros((40, 50), np.uint8)
    bitmap[3:30, 10:44] = 1
    rle = mask_utils.encode(np.asfortranarray(bitmap))
    assert rle_counts_from_string(rle["counts"].decode()) == _uncompressed_counts(bitmap)


@pytest.mark.parametrize(
    "segmentation, message",
    [
        (None, "no segmentation"),
        ([], "empty polygon list"),
        ([[1, 2, 3, 4]], "4 coordinates"),
        ([[1, 2, 3, 4, 5, 6, 7]], "7 coordinates"),
        ([[0, 0, 5, float("nan"), 5, 5]], "non-finite"),
        ([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], "flat list"),
        ([[100, 100, 200, 100, 200, 200]], "entirely outside"),
        ([[-30, 0, -10, 0, -10, 5]], "entirely outside"),
        ({"size": [10, 12], "counts": [120]}, "does not match the image"),
        ({"size": [10, 20], "counts": [7, 3]}, "sum to 10"),
        ({"size": [10, 20], "counts": [100, -5, 105]}, "negative"),
        ({"size": [10, 20], "counts": [199.0, 1]}, "integers"),
        ({"size": [10, 20], "counts": "7"}, "sum to 7"),
        ({"size": [10, 20], "counts": "0a\x7f"}, "invalid character"),
        ({"size": [10, 20], "counts": "0a`"}, "truncated"),
        ({"size": [10, 20]}, "needs 'size' and 'counts'"),
        ({"size": "10x20", "counts": [200]}, "'size' must be"),
        ("polygon", "unsupported segmentation type"),
    ],
)
def test_bad_masks_raise_a_clear_error_naming_the_annotation(segmentation, message):
    with pytest.raises(InvalidMaskError, match=message) as info:
        decode_segmentation(segmentation, 10, 20, image_id=42, ann_id=7)
    assert str(info.value).startswith("image 42, annotation 7: ")
    with pytest.raises(InvalidMaskError, match="image 42, annotation 7"):
        decode_masks([[[0, 0, 5, 0, 5, 5]], segmentation], 10, 20, image_id=42, ann_ids=[6, 7])


def test_bad_masks_are_dropped_with_a_warning_in_warn_mode():
    good = [[0, 0, 8, 0, 8, 6, 0, 6]]
    segms = [good, [], good + [[1, 2]], {"size": [9, 9], "counts": [81]}, [[50, 50, 60, 50, 60, 60]]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        masks, keep = decode_masks(segms, 10, 20, image_id=5, ann_ids=[1, 2, 3, 4, 5], on_invalid="warn")
    messages = [str(w.message) for w in caught if issubclass(w.category, MaskWarning)]
    assert keep.tolist() == [True, False, True, False, False]
    assert masks.shape == (2, 10, 20)
    np.testing.assert_array_equal(masks[0].numpy(), masks[1].numpy())  # the bad part of #3 was dropped
    assert any("annotation 2" in m and "empty polygon list" in m and "dropped" in m for m in messages)
    assert any("annotation 3" in m and "polygon 1 has 2 coordinates" in m for m in messages)
    assert any("annotation 4" in m and "does not match" in m for m in messages)
    assert any("annotation 5" in m and "outside" in m for m in messages)
    # Nothing valid: an empty [0, H, W] stack.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        empty, keep = decode_masks([[]], 10, 20, on_invalid="warn")
    assert empty.shape == (0, 10, 20) and not keep.any()
    with pytest.raises(ValueError, match="on_invalid"):
        decode_masks([], 10, 20, on_invalid="ignore")


# ----------------------------------------------------------------------------- transforms
def test_resize_flip_pad_follow_nearest_and_box_conventions():
    rng = np.random.default_rng(1)
    masks = torch.from_numpy(_random_blobs(rng, 3, 30, 41))
    new_h, new_w = 47, 64
    resized = resize_masks(masks, (new_h, new_w))
    # Legacy nearest (cv2 INTER_NEAREST / mmcv rescale): source index floor(i * h / new_h).
    rows = np.minimum(np.floor(np.arange(new_h) * 30 / new_h).astype(int), 29)
    cols = np.minimum(np.floor(np.arange(new_w) * 41 / new_w).astype(int), 40)
    np.testing.assert_array_equal(resized.numpy(), masks.numpy()[:, rows][:, :, cols])
    assert resized.dtype == torch.uint8
    assert resize_masks(masks.bool(), (new_h, new_w)).dtype == torch.bool
    assert torch.equal(resize_masks(masks.bool(), (new_h, new_w)), resized.bool())
    assert resize_masks(masks[:0], (5, 6)).shape == (0, 5, 6)

    flipped = hflip_masks(resized)
    np.testing.assert_array_equal(flipped.numpy(), resized.numpy()[:, :, ::-1])
    padded = pad_masks(flipped, (64, 96))
    assert padded.shape == (3, 64, 96) and padded[:, new_h:].sum() == 0 and padded[:, :, new_w:].sum() == 0
    assert torch.equal(padded[:, :new_h, :new_w], flipped)
    with pytest.raises(ValueError, match="smaller"):
        pad_masks(flipped, (10, 96))
    with pytest.raises(ValueError, match=r"\[G, H, W\]"):
        resize_masks(masks[0], (5, 5))


def test_flipped_mask_stays_inside_the_flipped_box():
    from libra.data.transforms import hflip_boxes

    mask = torch.zeros(1, 10, 20, dtype=torch.uint8)
    mask[0, 2:6, 3:8] = 1  # box [3, 2, 8, 6]
    flipped = hflip_masks(mask)
    box = hflip_boxes(torch.tensor([[3.0, 2.0, 8.0, 6.0]]), 20)[0].tolist()
    ys, xs = torch.nonzero(flipped[0], as_tuple=True)
    assert [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1] == box


# ----------------------------------------------------------------------------- mask targets
def _roi_align_reference_64(mask: np.ndarray, box, size: int) -> np.ndarray:
    """float64 RoIAlign of one mask (aligned=True, adaptive sampling), written out per sample."""
    height, width = mask.shape
    x1, y1, x2, y2 = [float(v) - 0.5 for v in box]  # aligned=True: pixel centres at +0.5
    roi_w, roi_h = x2 - x1, y2 - y1
    bin_w, bin_h = roi_w / size, roi_h / size
    grid_w, grid_h = max(1, math.ceil(roi_w / size)), max(1, math.ceil(roi_h / size))
    out = np.zeros((size, size))

    def bilinear(y, x):
        if y < -1.0 or y > height or x < -1.0 or x > width:
            return 0.0
        y, x = max(y, 0.0), max(x, 0.0)
        y0, x0 = int(y), int(x)
        if y0 >= height - 1:
            y0 = y1_ = height - 1
            y = float(y0)
        else:
            y1_ = y0 + 1
        if x0 >= width - 1:
            x0 = x1_ = width - 1
            x = float(x0)
        else:
            x1_ = x0 + 1
        ly, lx = y - y0, x - x0
        return ((1 - ly) * (1 - lx) * mask[y0, x0] + (1 - ly) * lx * mask[y0, x1_]
                + ly * (1 - lx) * mask[y1_, x0] + ly * lx * mask[y1_, x1_])

    for i in range(size):
        for j in range(size):
            total = 0.0
            for a in range(grid_h):
                for b in range(grid_w):
                    total += bilinear(y1 + (i + (a + 0.5) / grid_h) * bin_h, x1 + (j + (b + 0.5) / grid_w) * bin_w)
            out[i, j] = total / (grid_h * grid_w)
    return out


def test_mask_targets_hand_made_rectangle():
    mask = torch.zeros(1, 32, 64, dtype=torch.uint8)
    mask[0, 8:24, 4:20] = 1  # the rectangle [4, 8, 20, 24)
    rois = torch.tensor([[0.0, 4, 8, 20, 24], [0.0, 4, 8, 36, 24], [0.0, 40, 0, 60, 30], [0.0, 4, 8, 20, 24]])
    targets = mask_targets([mask], torch.tensor([0, 0, 0, -1]), rois, mask_size=28)
    assert targets.shape == (4, 28, 28) and targets.dtype == torch.float32
    assert targets[0].eq(1).all()  # the box is the rectangle
    expected = torch.zeros(28, 28)
    expected[:, :14] = 1  # the rectangle fills the left half of a box twice as wide
    assert torch.equal(targets[1], expected)
    assert targets[2].eq(0).all()  # a box beside the object
    assert targets[3].eq(0).all()  # no matched gt


def test_mask_targets_match_a_float64_crop_and_resize():
    rng = np.random.default_rng(2)
    sizes = [(37, 45), (30, 52)]  # two images of different sizes (list input is zero-padded)
    masks = [torch.from_numpy(_random_blobs(rng, g, h, w)) for g, (h, w) in zip((3, 2), sizes)]
    rois, matched = [], []
    for image, (h, w) in enumerate(sizes):
        for _ in range(6):
            x1, y1 = rng.uniform(-5, w - 8), rng.uniform(-5, h - 8)
            x2, y2 = x1 + rng.uniform(3, w * 0.9), y1 + rng.uniform(3, h * 0.9)  # may leave the image
            rois.append([image, x1, y1, x2, y2])
            matched.append(int(rng.integers(0, masks[image].shape[0])))
    rois_t = torch.tensor(rois, dtype=torch.float32)
    matched_t = torch.tensor(matched)
    size = 14
    targets = mask_targets(masks, matched_t, rois_t, mask_size=size)
    for r, (row, gt) in enumerate(zip(rois_t.tolist(), matched)):
        image = int(row[0])
        reference = _roi_align_reference_64(masks[image][gt].double().numpy(), row[1:], size)
        decided = np.abs(reference - 0.5) > 1e-4  # float32 vs float64 may only differ at 0.5
        np.testing.assert_array_equal(targets[r].numpy()[decided], (reference >= 0.5)[decided])
        assert decided.mean() > 0.95
    # A padded [B, G, H, W] tensor gives the same targets.
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    padded = torch.zeros(2, 3, height, width, dtype=torch.uint8)
    for image, m in enumerate(masks):
        padded[image, : m.shape[0], : m.shape[1], : m.shape[2]] = m
    assert torch.equal(mask_targets(padded, matched_t, rois_t, mask_size=size), targets)
    assert torch.equal(mask_targets([m.bool() for m in masks], matched_t, rois_t, mask_size=size), targets)


def test_mask_targets_edge_cases():
    empty = torch.zeros(0, 20, 20, dtype=torch.uint8)
    rois = torch.tensor([[0.0, 1, 1, 10, 10]])
    assert torch.equal(mask_targets([empty], torch.tensor([-1]), rois), torch.zeros(1, 28, 28))
    assert mask_targets([empty], torch.zeros(0, dtype=torch.int64), torch.zeros(0, 5)).shape == (0, 28, 28)
    with pytest.raises(ValueError, match=r"\[R, 5\]"):
        mask_targets([empty], torch.tensor([0]), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="matched_gt"):
        mask_targets([empty], torch.tensor([0, 0]), rois)


# ----------------------------------------------------------------------------- pasting
def _paste_reference_64(probs: np.ndarray, box, height: int, width: int) -> np.ndarray:
    """Per-pixel float64 bilinear sampling at pixel centres, zero outside the mask grid."""
    cells_h, cells_w = probs.shape
    x1, y1, x2, y2 = box
    out = np.zeros((height, width))
    for y in range(height):
        for x in range(width):
            sy = (y + 0.5 - y1) / (y2 - y1) * cells_h - 0.5
            sx = (x + 0.5 - x1) / (x2 - x1) * cells_w - 0.5
            y0, x0 = math.floor(sy), math.floor(sx)
            value = 0.0
            for yy, wy in ((y0, 1 - (sy - y0)), (y0 + 1, sy - y0)):
                for xx, wx in ((x0, 1 - (sx - x0)), (x0 + 1, sx - x0)):
                    if 0 <= yy < cells_h and 0 <= xx < cells_w:
                        value += wy * wx * probs[yy, xx]
            out[y, x] = value
    return out


def test_paste_matches_a_float64_per_pixel_reference_and_grid_sample():
    rng = np.random.default_rng(3)
    height, width, cells = 31, 43, 7
    probs = torch.from_numpy(rng.uniform(0, 1, (5, cells, cells))).float()
    boxes = torch.tensor([[3.2, 4.7, 20.1, 25.3], [0.0, 0.0, 43.0, 31.0], [30.5, 20.25, 50.0, 40.0],
                          [-6.0, -3.0, 10.0, 8.0], [10.0, 10.0, 12.5, 11.0]])
    soft = paste_masks_in_image(probs, boxes, (height, width), threshold=None)
    hard = paste_masks_in_image(probs, boxes, (height, width))
    assert soft.shape == hard.shape == (5, height, width) and soft.dtype == torch.float32 and hard.dtype == torch.bool
    for d in range(5):
        reference = _paste_reference_64(probs[d].double().numpy(), boxes[d].tolist(), height, width)
        np.testing.assert_allclose(soft[d].numpy(), reference, atol=1e-5)
        decided = np.abs(reference - 0.5) > 1e-5
        np.testing.assert_array_equal(hard[d].numpy()[decided], (reference >= 0.5)[decided])
    # grid_sample (align_corners=False, zero padding) on the full image grid, in float64.
    ys = torch.arange(height, dtype=torch.float64) + 0.5
    xs = torch.arange(width, dtype=torch.float64) + 0.5
    b = boxes.double()
    gy = (ys[None] - b[:, 1:2]) / (b[:, 3:4] - b[:, 1:2]) * 2 - 1
    gx = (xs[None] - b[:, 0:1]) / (b[:, 2:3] - b[:, 0:1]) * 2 - 1
    grid = torch.stack([gx[:, None, :].expand(-1, height, -1), gy[:, :, None].expand(-1, -1, width)], dim=-1)
    sampled = F.grid_sample(probs.double()[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]
    torch.testing.assert_close(soft.double(), sampled, atol=1e-5, rtol=0)
    # Chunking over detections does not change the result.
    assert torch.equal(paste_masks_in_image(probs, boxes, (height, width), chunk_elements=height * width * 2), hard)


def test_paste_edge_cases():
    probs = torch.ones(3, 28, 28)
    boxes = torch.tensor([[5.0, 5.0, 5.0, 9.0], [float("nan"), 0.0, 4.0, 4.0], [2.0, 3.0, 6.0, 9.0]])
    out = paste_masks_in_image(probs.half(), boxes, (12, 10))
    assert out.shape == (3, 12, 10)
    assert out[1].sum() == 0  # a non-finite box pastes nothing
    expected = torch.zeros(12, 10, dtype=torch.bool)
    expected[3:9, 2:6] = True  # a box on the pixel grid with an all-ones mask: exactly its pixels
    assert torch.equal(out[2], expected)
    assert paste_masks_in_image(torch.zeros(0, 28, 28), torch.zeros(0, 4), (12, 10)).shape == (0, 12, 10)
    with pytest.raises(ValueError, match=r"\[D, 4\]"):
        paste_masks_in_image(probs, boxes[:2], (12, 10))


def test_encode_rle_round_trip():
    rng = np.random.default_rng(4)
    masks = torch.from_numpy(rng.random((4, 13, 9)) < 0.4)
    rles = encode_rle(masks)
    assert len(rles) == 4 and all(isinstance(r["counts"], str) and r["size"] == [13, 9] for r in rles)
    json.dumps(rles)
    decoded = mask_utils.decode([{"size": r["size"], "counts": r["counts"].encode()} for r in rles])
    np.testing.assert_array_equal(decoded.transpose(2, 0, 1), masks.numpy().astype(np.uint8))
    assert encode_rle(np.zeros((0, 5, 5), bool)) == []


# ----------------------------------------------------------------------------- segm evaluation
def _synthetic_gt() -> tuple[dict, dict[int, np.ndarray]]:
    """Two images with random polygon objects (plus an RLE crowd region) of categories 4 and 9."""
    rng = np.random.default_rng(5)
    images = [{"id": 1, "width": 80, "height": 60, "file_name": "1.png"}, {"id": 2, "width": 70, "height": 90, "file_name": "2.png"}]
    anns, bitmaps = [], {}
    for info in images:
        h, w = info["height"], info["width"]
        masks = _random_blobs(rng, 4, h, w)
        bitmaps[info["id"]] = masks
        for k, m in enumerate(masks):
            rle = mask_utils.encode(np.asfortranarray(m))
            x, y, bw, bh = mask_utils.toBbox(rle).tolist()
            anns.append({"id": len(anns) + 1, "image_id": info["id"], "category_id": (4, 9)[k % 2], "iscrowd": 0,
                         "segmentation": {"size": [h, w], "counts": _uncompressed_counts(m)} if k == 3 else
                         {"size": [h, w], "counts": rle["counts"].decode()},
                         "bbox": [x, y, bw, bh], "area": float(m.sum())})
    crowd = np.zeros((60, 80), np.uint8)
    crowd[40:58, 60:78] = 1
    anns.append({"id": len(anns) + 1, "image_id": 1, "category_id": 4, "iscrowd": 1,
                 "segmentation": {"size": [60, 80], "counts": _uncompressed_counts(crowd)},
                 "bbox": [60, 40, 18, 18], "area": float(crowd.sum())})
    gt = {"images": images, "annotations": anns, "categories": [{"id": 4, "name": "a"}, {"id": 9, "name": "b"}]}
    return gt, bitmaps


def _noisy_detections(bitmaps: dict[int, np.ndarray], labels: dict[int, list[int]], seed: int) -> dict[int, dict]:
    """Gt masks shifted by a pixel or two and partly erased, random scores, plus a false positive."""
    rng = np.random.default_rng(seed)
    dets = {}
    for image_id, masks in bitmaps.items():
        shifted = [np.roll(np.roll(m, int(rng.integers(-2, 3)), 0), int(rng.integers(-2, 3)), 1) for m in masks]
        for m in shifted:
            m[: int(rng.integers(0, m.shape[0] // 3))] = 0
        fp = np.zeros_like(masks[0])
        fp[:10, :12] = 1
        stack = np.stack(shifted + [fp]).astype(bool)
        boxes = []
        for m in stack:
            ys, xs = np.nonzero(m)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] if len(xs) else [0, 0, 1, 1])
        dets[image_id] = {"boxes": torch.tensor(boxes, dtype=torch.float32),
                          "scores": torch.from_numpy(rng.uniform(0.1, 1.0, len(stack))).float(),
                          "labels": torch.tensor(labels[image_id] + [1]), "masks": torch.from_numpy(stack)}
    return dets


def _direct_segm_stats(gt: COCO, dets: dict[int, dict], label_to_cat: list[int], max_dets: list[int] | None = None) -> COCOeval:
    results = []
    for image_id, det in dets.items():
        for m, s, l in zip(det["masks"].numpy(), det["scores"].tolist(), det["labels"].tolist()):
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            results.append({"image_id": image_id, "category_id": label_to_cat[l], "segmentation": rle, "score": s})
    dt = _quiet(gt.loadRes, results)
    coco_eval = COCOeval(gt, dt, "segm")
    coco_eval.params.imgIds = sorted(dets)
    if max_dets is not None:
        coco_eval.params.maxDets = max_dets
    _quiet(coco_eval.evaluate)
    _quiet(coco_eval.accumulate)
    if max_dets is None:
        _quiet(coco_eval.summarize)
    return coco_eval


SEGM_NAMES = ["segm_AP", "segm_AP50", "segm_AP75", "segm_APs", "segm_APm", "segm_APl"]


def test_coco_segm_ap_matches_pycocotools_on_synthetic_masks():
    gt_dict, bitmaps = _synthetic_gt()
    labels = {i: [k % 2 for k in range(len(m))] for i, m in bitmaps.items()}
    dets = _noisy_detections(bitmaps, labels, seed=6)
    evaluator = build_evaluator("coco", copy.deepcopy(gt_dict), [4, 9], ("bbox", "segm"), verbose=False)
    assert isinstance(evaluator, COCOEvaluator)
    evaluator.update(list(dets), list(dets.values()))
    ours = evaluator.evaluate()
    assert list(ours) == ["AP", "AP50", "AP75", "APs", "APm", "APl", *SEGM_NAMES]
    expected = _direct_segm_stats(load_coco_api(copy.deepcopy(gt_dict)), dets, [4, 9]).stats[:6]
    for name, value in zip(SEGM_NAMES, expected):
        assert ours[name] == pytest.approx(value, abs=1e-3), name  # scores are rounded to 5 decimals
    assert 0.1 < ours["segm_AP"] < 0.95
    # The box metrics are those of a box-only evaluator.
    boxes_only = COCOEvaluator(copy.deepcopy(gt_dict), [4, 9], verbose=False)
    boxes_only.update(list(dets), list(dets.values()))
    assert {k: v for k, v in ours.items() if not k.startswith("segm_")} == boxes_only.evaluate()
    # Results: RLE entries without a bbox key, JSON-ready.
    segm = evaluator.results("segm")
    assert len(segm) == sum(len(d["scores"]) for d in dets.values()) and "bbox" not in segm[0]
    json.dumps(segm)
    assert evaluator.results() == evaluator.results("bbox") and "bbox" in evaluator.results()[0]
    # Perfect masks: AP 1.
    perfect = {i: {**d, "masks": torch.from_numpy(bitmaps[i].astype(bool)), "scores": torch.ones(len(bitmaps[i])),
                   "labels": torch.tensor(labels[i]), "boxes": d["boxes"][:-1]} for i, d in dets.items()}
    only_segm = COCOEvaluator(copy.deepcopy(gt_dict), [4, 9], iou_types=("segm",), verbose=False)
    only_segm.update(list(perfect), list(perfect.values()))
    metrics = only_segm.evaluate()
    assert list(metrics) == SEGM_NAMES and metrics["segm_AP"] == pytest.approx(1.0)


def test_segm_state_merge_reset_and_errors(capsys):
    gt_dict, bitmaps = _synthetic_gt()
    labels = {i: [k % 2 for k in range(len(m))] for i, m in bitmaps.items()}
    dets = _noisy_detections(bitmaps, labels, seed=7)
    whole = COCOEvaluator(copy.deepcopy(gt_dict), [4, 9], ("bbox", "segm"), verbose=False)
    whole.update(list(dets), list(dets.values()))
    part_a = COCOEvaluator(copy.deepcopy(gt_dict), [4, 9], ("bbox", "segm"), verbose=False)
    part_b = COCOEvaluator(copy.deepcopy(gt_dict), [4, 9], ("bbox", "segm"), verbose=False)
    part_a.update([1], [dets[1]])
    part_b.update([2], [dets[2]])
    import pickle

    part_a.merge(pickle.loads(pickle.dumps(part_b.state_dict())))
    assert part_a.evaluate() == whole.evaluate()
    part_a.reset()
    assert part_a.segm_detections == [] and part_a.detections == []

    verbose = COCOEvaluator(copy.deepcopy(gt_dict), [4, 9], ("bbox", "segm"), verbose=True)
    no_dets = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
               "masks": torch.zeros(0, 60, 80, dtype=torch.bool)}
    verbose.update([1], [no_dets])
    assert all(v == 0.0 for v in verbose.evaluate().values())
    assert "no mask detections" in capsys.readouterr().out
    verbose.update([1], [dets[1]])
    verbose.evaluate()
    out = capsys.readouterr().out
    assert "COCO bbox:" in out and "COCO segm:" in out

    with pytest.raises(ValueError, match="no 'masks'"):
        whole.update([1], [{k: v for k, v in dets[1].items() if k != "masks"}])
    with pytest.raises(ValueError, match="original image"):
        whole.update([1], [{**dets[1], "masks": dets[1]["masks"][:, :50]}])
    with pytest.raises(ValueError, match="D = 5"):
        whole.update([1], [{**dets[1], "masks": dets[1]["masks"][:2]}])
    no_segm = copy.deepcopy(gt_dict)
    del no_segm["annotations"][2]["segmentation"]
    with pytest.raises(ValueError, match="annotation 3 of image 1 has none"):
        build_evaluator("coco", no_segm, [4, 9], ("bbox", "segm"), verbose=False)
    with pytest.raises(ValueError, match="boxes only"):
        build_evaluator("voc", gt_dict, [4, 9], ("bbox", "segm"), verbose=False)
    with pytest.raises(ValueError, match="iou_types"):
        COCOEvaluator(gt_dict, [4, 9], ("bbox", "bbox"), verbose=False)


def _real_mini_detections(coco: COCO, cat_to_label: dict[int, int], seed: int) -> dict[int, dict]:
    bitmaps, labels = {}, {}
    for image_id in sorted(coco.imgs):
        anns = coco.imgToAnns[image_id]
        if anns:
            bitmaps[image_id] = np.stack([coco.annToMask(a) for a in anns])
            labels[image_id] = [cat_to_label[a["category_id"]] for a in anns]
    dets = _noisy_detections(bitmaps, labels, seed)
    for image_id, det in dets.items():  # the false positive takes the first object's class
        det["labels"][-1] = det["labels"][0]
    return dets


@needs_real_mini
def test_coco_segm_ap_matches_pycocotools_on_real_mini():
    coco = load_coco_api(COCO_JSON)
    label_to_cat = sorted(coco.cats)
    dets = _real_mini_detections(coco, {c: i for i, c in enumerate(label_to_cat)}, seed=8)
    evaluator = build_evaluator("coco", COCO_JSON, label_to_cat, ("bbox", "segm"), verbose=False)
    evaluator.update(list(dets), list(dets.values()))
    ours = evaluator.evaluate()
    expected = _direct_segm_stats(load_coco_api(COCO_JSON), dets, label_to_cat).stats[:6]
    for name, value in zip(SEGM_NAMES, expected):
        assert ours[name] == pytest.approx(value, abs=1e-3), name
    assert 0.05 < ours["segm_AP"] < 0.95


@needs_real_mini
def test_lvis_segm_ap_on_real_mini_equals_cocoeval_with_300_dets():
    # Every detection's category is positive on its image, so the federated rules change nothing:
    # AP is COCOeval's (maxDets 300) mean precision over the categories with gts.
    path = LVIS_JSONS[0]
    lvis = load_coco_api(path)
    label_to_cat = sorted({a["category_id"] for a in lvis.dataset["annotations"]})
    dets = _real_mini_detections(lvis, {c: i for i, c in enumerate(label_to_cat)}, seed=9)
    evaluator = build_evaluator("lvis", path, label_to_cat, ("bbox", "segm"), verbose=False)
    assert isinstance(evaluator, LVISEvaluator)
    evaluator.update(list(dets), list(dets.values()))
    ours = evaluator.evaluate()
    assert [k for k in ours if k.startswith("segm_")] == SEGM_NAMES + ["segm_APr", "segm_APc", "segm_APf"]
    coco_eval = _direct_segm_stats(load_coco_api(path), dets, label_to_cat, max_dets=[300])
    precision = coco_eval.eval["precision"][:, :, :, 0, -1]
    expected = float(precision[precision > -1].mean())
    assert ours["segm_AP"] == pytest.approx(expected, abs=1e-3)
    assert ours["segm_APf"] == pytest.approx(expected, abs=1e-3)  # all real_mini classes are frequent
    assert ours["segm_APr"] == -1.0 and ours["segm_APc"] == -1.0
    assert 0.05 < ours["segm_AP"] < 0.95


def _lvis_gt_with_masks() -> dict:
    """The federated toy case of test_evaluation.py with rectangle polygons as masks."""
    def ann(i, image_id, cat, box):
        x1, y1, x2, y2 = box
        return {"id": i, "image_id": image_id, "category_id": cat, "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": (x2 - x1) * (y2 - y1), "segmentation": [[x1, y1, x2, y1, x2, y2, x1, y2]]}

    return {
        "images": [
            {"id": 1, "width": 200, "height": 200, "neg_category_ids": [2], "not_exhaustive_category_ids": []},
            {"id": 2, "width": 200, "height": 200, "neg_category_ids": [], "not_exhaustive_category_ids": [2]},
            {"id": 3, "width": 200, "height": 200, "neg_category_ids": [1], "not_exhaustive_category_ids": []},
        ],
        "annotations": [ann(1, 1, 1, [10, 10, 110, 110]), ann(2, 2, 2, [20, 20, 120, 120]), ann(3, 3, 3, [50, 50, 150, 150])],
        "categories": [{"id": 1, "name": "one", "frequency": "f"}, {"id": 2, "name": "two", "frequency": "c"},
                       {"id": 3, "name": "three", "frequency": "r"}],
    }


def _box_det(boxes, scores, labels, size=(200, 200)):
    masks = torch.zeros(len(boxes), *size, dtype=torch.bool)
    for k, (x1, y1, x2, y2) in enumerate(boxes):
        masks[k, y1:y2, x1:x2] = True
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "scores": torch.tensor(scores), "labels": torch.tensor(labels),
            "masks": masks}


def test_lvis_federated_rules_apply_to_masks():
    dets = {
        1: _box_det([[10, 10, 110, 110], [0, 0, 50, 50], [100, 100, 190, 190]], [0.9, 0.95, 0.5], [0, 2, 1]),
        2: _box_det([[150, 150, 190, 190], [20, 20, 120, 120]], [0.9, 0.8], [1, 1]),
        3: _box_det([[0, 0, 60, 60], [50, 50, 150, 150]], [0.95, 0.6], [0, 2]),
    }
    evaluator = LVISEvaluator(_lvis_gt_with_masks(), [1, 2, 3], iou_types=("bbox", "segm"), verbose=False)
    evaluator.update(list(dets), list(dets.values()))
    metrics = evaluator.evaluate()
    # Same per-category outcome as the boxes (see test_evaluation.py): cat 1 AP 0.5, cat 2 and 3 AP 1.
    for prefix in ("", "segm_"):
        assert metrics[prefix + "APf"] == pytest.approx(0.5)
        assert metrics[prefix + "APc"] == pytest.approx(1.0)
        assert metrics[prefix + "APr"] == pytest.approx(1.0)
        assert metrics[prefix + "AP"] == pytest.approx(2.5 / 3)
    # merge / state round trip.
    other = LVISEvaluator(_lvis_gt_with_masks(), [1, 2, 3], iou_types=("bbox", "segm"), verbose=False)
    other.merge(evaluator.state_dict())
    assert other.evaluate() == metrics


def test_lvis_top_300_keeps_the_same_rows_for_boxes_and_masks():
    evaluator = LVISEvaluator(_lvis_gt_with_masks(), [1, 2, 3], iou_types=("bbox", "segm"), verbose=False)
    count = 305
    boxes = [[10 + k % 7, 10, 110, 110] for k in range(count)]
    det = _box_det(boxes, torch.linspace(0.01, 1.0, count).tolist(), [0] * count)
    evaluator.update([1], [det])
    assert len(evaluator.detections) == len(evaluator.segm_detections) == 300
    for box_result, mask_result in zip(evaluator.detections, evaluator.segm_detections):
        assert box_result["score"] == mask_result["score"]
        x, y, w, h = mask_utils.toBbox({"size": mask_result["segmentation"]["size"],
                                        "counts": mask_result["segmentation"]["counts"].encode()}).tolist()
        assert [x, y, w, h] == box_result["bbox"]
