"""Embedded synthetic detection dataset: coloured shapes on textured backgrounds.

It lets the whole pipeline (COCO loader, training, COCO evaluation) run end to end on a CPU in
minutes without downloading anything. Four classes:

    0 rectangle, 1 ellipse, 2 triangle, 3 cross

Each image has a background (linear gradient, stripes/checkerboard texture and pixel noise)
and 1-6 shapes of size 16..160 px (clipped to the image), random aspect ratio and fill colour,
some with a 2 px outline. Shapes may overlap a little (a new shape is rejected if it would hide
more than 30 % of an earlier one). Boxes are the tight bounds of each shape's VISIBLE pixels
(computed from a per-pixel owner map), in continuous coordinates: a shape covering pixel
columns a..b has x1 = a, x2 = b + 1. The owner map also gives each object's exact instance mask
(its visible pixels), written as a COCO compressed RLE ``segmentation`` with ``area`` = its pixel
count (COCO's convention), so the same data trains and evaluates Mask R-CNN (box and mask AP).

`ensure_synthetic_dataset` writes COCO instances JSON + PNG files once and then reuses them;
it generates into a temporary folder and renames it into place, so concurrent callers (e.g.
one process per GPU) and interrupted runs never leave a half-written dataset. Its output carries
a marker file (``.libra_synthetic``); it never deletes or writes into a non-empty folder without
it (a real dataset given as ``--data-root`` without ``--dataset``), and raises `DataError` instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from libra.masks import encode_rle

from .base import DataError

SYNTHETIC_CLASSES: tuple[str, ...] = ("rectangle", "ellipse", "triangle", "cross")
# 2: annotations carry each object's instance mask (RLE ``segmentation``, ``area`` = mask pixels).
# The version is part of the marker, so a folder of an older version is regenerated.
_FORMAT_VERSION = 2
_SPLIT_SALT = {"train": 1, "val": 2}
# The marker file that says a folder is this builder's output (it holds the generation
# parameters); a folder without it is never deleted or overwritten.
SYNTHETIC_MARKER = ".libra_synthetic"
_GENERATOR = "libra.data.synthetic"
_OWN_ENTRIES = frozenset(("annotations", "train", "val", "meta.json", SYNTHETIC_MARKER))


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """[h, w, 3] uint8: gradient + one texture + noise."""
    yy = np.arange(height, dtype=np.float32)[:, None]
    xx = np.arange(width, dtype=np.float32)[None, :]
    c0, c1 = rng.uniform(30, 225, size=(2, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    t = np.float32(np.cos(angle) / max(width - 1, 1)) * xx + np.float32(np.sin(angle) / max(height - 1, 1)) * yy
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    image = c0 + (c1 - c0) * t[..., None]
    texture = int(rng.integers(0, 3))
    if texture == 1:  # stripes
        period = rng.uniform(6, 24)
        phase = rng.uniform(0, 2 * np.pi)
        stripes = np.sin(np.float32(2 * np.pi / period) * (xx * np.float32(np.cos(angle)) - yy * np.float32(np.sin(angle))) + np.float32(phase))
        image += np.float32(rng.uniform(8, 25)) * stripes[..., None]
    elif texture == 2:  # checkerboard
        cell = int(rng.integers(8, 32))
        checker = (((xx // cell + yy // cell) % 2) * 2 - 1).astype(np.float32)
        image += np.float32(rng.uniform(8, 25)) * checker[..., None]
    # Grey pixel noise (one value per pixel for all channels: cheap, and enough texture).
    image += np.float32(rng.uniform(2, 10)) * rng.standard_normal((height, width, 1), dtype=np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def _shape_mask(rng: np.random.Generator, label: int, height: int, width: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Draw one shape of class ``label`` into a bool mask [h, w]; also return its drawing box."""
    size = float(np.exp(rng.uniform(np.log(16), np.log(160))))
    aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    w = max(12, min(width, int(round(size * np.sqrt(aspect)))))
    h = max(12, min(height, int(round(size / np.sqrt(aspect)))))
    x0 = int(rng.integers(-w // 4, width - 3 * w // 4 + 1))
    y0 = int(rng.integers(-h // 4, height - 3 * h // 4 + 1))
    x1, y1 = x0 + w - 1, y0 + h - 1
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    if label == 0:
        draw.rectangle([x0, y0, x1, y1], fill=255)
    elif label == 1:
        draw.ellipse([x0, y0, x1, y1], fill=255)
    elif label == 2:
        apex = x0 + float(rng.uniform(0.2, 0.8)) * (w - 1)
        points = [(apex, y0), (x1, y1), (x0, y1)] if rng.random() < 0.5 else [(x0, y0), (x1, y0), (apex, y1)]
        draw.polygon(points, fill=255)
    else:
        bar_w = max(4, int(w * rng.uniform(0.25, 0.4)))
        bar_h = max(4, int(h * rng.uniform(0.25, 0.4)))
        cx, cy = x0 + (w - bar_w) // 2, y0 + (h - bar_h) // 2
        draw.rectangle([cx, y0, cx + bar_w - 1, y1], fill=255)
        draw.rectangle([x0, cy, x1, cy + bar_h - 1], fill=255)
    return np.asarray(canvas) > 0, (x0, y0, x1, y1)


def _outline(mask: np.ndarray, thickness: int = 2) -> np.ndarray:
    """Pixels of ``mask`` within ``thickness`` px of its border (inner outline, so the box is unchanged)."""
    inner = mask.copy()
    for _ in range(thickness):
        shrunk = inner.copy()
        shrunk[1:, :] &= inner[:-1, :]
        shrunk[:-1, :] &= inner[1:, :]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        inner = shrunk
    return mask & ~inner


def render_synthetic_image(
    seed: int, split: str, index: int, image_size: tuple[int, int] = (256, 256), max_objects: int = 6
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict]]:
    """Render image ``index`` of ``split`` deterministically.

    Returns:
        image [h, w, 3] uint8, background [h, w, 3] uint8 (the image before any shape),
        owner [h, w] int32 (object index owning each pixel, -1 for background),
        objects: list of ``{"label": int, "box": [x1, y1, x2, y2], "owner": k}`` (tight, continuous
            coords; ``owner == k`` is the object's visible mask).
    """
    height, width = image_size
    rng = np.random.default_rng([int(seed), _SPLIT_SALT.get(split, 3), int(index)])
    background = _background(rng, height, width)
    image = background.copy()
    owner = np.full((height, width), -1, np.int32)
    labels: list[int] = []
    num_objects = int(rng.integers(1, max_objects + 1))
    attempts = 0
    while len(labels) < num_objects and attempts < 10 * max_objects:
        attempts += 1
        label = int(rng.integers(0, len(SYNTHETIC_CLASSES)))
        mask, _ = _shape_mask(rng, label, height, width)
        if mask.sum() < 64:
            continue
        # Reject shapes that would hide much of an earlier object (it must stay recognisable).
        covered = np.bincount(owner[mask & (owner >= 0)], minlength=len(labels))
        visible = np.bincount(owner[owner >= 0], minlength=len(labels))
        if len(labels) and np.any(covered > 0.3 * np.maximum(visible, 1)):
            continue
        fill = rng.integers(0, 256, size=3).astype(np.uint8)
        image[mask] = fill
        if rng.random() < 0.4:
            edge = _outline(mask, 2)
            image[edge] = rng.integers(0, 256, size=3).astype(np.uint8)
        owner[mask] = len(labels)
        labels.append(label)
    objects = []
    for k, label in enumerate(labels):
        ys, xs = np.nonzero(owner == k)
        if len(xs) == 0:
            continue
        objects.append({
            "label": label, "box": [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)], "owner": k,
        })
    return image, background, owner, objects


def _meta(num_train: int, num_val: int, image_size: tuple[int, int], seed: int) -> dict:
    return {"version": _FORMAT_VERSION, "num_train": int(num_train), "num_val": int(num_val),
            "image_size": [int(image_size[0]), int(image_size[1])], "seed": int(seed)}


def synthetic_paths(root: str | Path) -> dict[str, Path]:
    """Paths of a synthetic dataset folder (whether or not it exists yet)."""
    root = Path(root)
    return {
        "root": root,
        "train_images": root / "train",
        "val_images": root / "val",
        "train_ann": root / "annotations" / "instances_train.json",
        "val_ann": root / "annotations" / "instances_val.json",
        "meta": root / "meta.json",
        "marker": root / SYNTHETIC_MARKER,
    }


def _marker_content(meta: dict) -> dict:
    return {"generator": _GENERATOR, **meta}


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _files_complete(paths: dict[str, Path], meta: dict) -> bool:
    for split in ("train", "val"):
        if not paths[f"{split}_ann"].is_file():
            return False
        if len(list(paths[f"{split}_images"].glob("*.png"))) != meta[f"num_{split}"]:
            return False
    return True


def _is_complete(paths: dict[str, Path], meta: dict) -> bool:
    """The folder holds this builder's output for exactly ``meta`` (its marker says so and no file is missing)."""
    return _read_json(paths["marker"]) == _marker_content(meta) and _files_complete(paths, meta)


def _is_legacy_folder(root: Path) -> bool:
    """Written before the marker existed: a ``meta.json`` of this builder and nothing but its layout."""
    meta = _read_json(root / "meta.json")
    if not isinstance(meta, dict) or set(meta) != set(_meta(1, 1, (32, 32), 0)):
        return False
    return all(_is_own_entry(p.name) for p in root.iterdir())


def _is_own_entry(name: str) -> bool:
    return name in _OWN_ENTRIES or name.startswith(SYNTHETIC_MARKER + ".part-")


def _describe(root: Path, entries: list[Path]) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in entries)
    shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
    return f"{shown} ({len(names)} entr{'y' if len(names) == 1 else 'ies'})"


def _dataset_flag_hint(root: Path) -> str:
    """What to pass instead when ``root`` looks like one of the real datasets' layouts."""
    if (root / "VOC2007").is_dir() or (root / "VOC2012").is_dir():
        return "it looks like a VOCdevkit folder: pass --dataset voc to use it"
    if any(root.glob("lvis_v1_*.json")):
        return "it looks like an LVIS folder: pass --dataset lvis to use it"
    if (root / "annotations").is_dir() and any((root / "annotations").glob("instances_*.json")):
        return "it looks like a COCO folder: pass --dataset coco to use it"
    return "to use a dataset stored there pass --dataset coco, voc or lvis"


def _check_replaceable(root: Path) -> None:
    """Raise DataError unless ``root`` may be (re)filled: absent, empty, or this builder's own output
    holding nothing but its own files. Nothing else is ever deleted or overwritten."""
    if not root.exists() and not root.is_symlink():
        return
    if not root.is_dir():
        raise DataError(f"--data-root {root} is not a folder; choose a new or empty folder for the synthetic dataset")
    entries = list(root.iterdir())
    if not entries:
        return
    if not (root / SYNTHETIC_MARKER).is_file() and not _is_legacy_folder(root):
        raise DataError(
            f"--data-root {root} is not empty and was not made by the synthetic dataset builder (no {SYNTHETIC_MARKER} "
            f"marker; it holds {_describe(root, entries)}); refusing to overwrite it: {_dataset_flag_hint(root)}, "
            "or choose an empty or new --data-root for the synthetic shapes"
        )
    foreign = [p for p in entries if not _is_own_entry(p.name)]
    if foreign:
        raise DataError(
            f"the synthetic dataset in --data-root {root} must be regenerated (other settings or missing files) but the "
            f"folder also holds files the builder did not write: {_describe(root, foreign)}; move them out, or choose "
            "another --data-root"
        )


def _render_and_save(args: tuple) -> list[dict]:
    seed, split, index, image_size, path = args
    image, _, owner, objects = render_synthetic_image(seed, split, index, image_size)
    Image.fromarray(image).save(path, compress_level=1)
    if objects:
        owners = np.asarray([obj["owner"] for obj in objects], np.int32)
        masks = owner[None] == owners[:, None, None]  # [K, h, w]: each object's visible pixels
        for obj, rle, area in zip(objects, encode_rle(masks), masks.sum(axis=(1, 2)).tolist()):
            obj["segmentation"], obj["area"] = rle, int(area)
    return objects


def _write_split(folder: Path, ann_path: Path, split: str, count: int, image_size: tuple[int, int], seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    file_names = [f"{split}_{index:06d}.png" for index in range(count)]
    jobs = [(seed, split, index, image_size, folder / name) for index, name in enumerate(file_names)]
    # Every image has its own RNG, so a thread pool (numpy and PNG encoding release the GIL)
    # gives the same files as a serial loop.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        all_objects = list(pool.map(_render_and_save, jobs))
    images, annotations = [], []
    for index, (file_name, objects) in enumerate(zip(file_names, all_objects)):
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "height": int(image_size[0]), "width": int(image_size[1])})
        for obj in objects:
            x1, y1, x2, y2 = obj["box"]
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": obj["label"] + 1,
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": obj["area"], "segmentation": obj["segmentation"], "iscrowd": 0,
            })
    categories = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(SYNTHETIC_CLASSES)]
    ann_path.parent.mkdir(parents=True, exist_ok=True)
    ann_path.write_text(json.dumps({"info": {"description": "libra synthetic shapes"}, "images": images,
                                    "annotations": annotations, "categories": categories}))


def ensure_synthetic_dataset(
    root: str | Path,
    num_train: int = 256,
    num_val: int = 64,
    image_size: tuple[int, int] = (256, 256),
    seed: int = 0,
) -> dict[str, Path]:
    """Create the synthetic dataset under ``root`` unless it is already there and complete.

    Layout: root/annotations/instances_{train,val}.json, root/{train,val}/*.png, root/meta.json and
    the marker root/.libra_synthetic (the parameters; written last). Returns the dict of
    `synthetic_paths`.

    Safety: ``root`` must be absent, empty, or a folder this builder made (its marker, or the
    ``meta.json`` of versions before the marker, and no other files); its own folder made with
    other parameters, or with files missing, is replaced. Anything else, e.g. a COCO folder
    passed without ``--dataset coco``, raises `DataError` and is left untouched.
    """
    if num_train < 1 or num_val < 1:
        raise ValueError(f"num_train and num_val must be >= 1, got {num_train}, {num_val}")
    if min(image_size) < 32:
        raise ValueError(f"image_size (h, w) must be at least 32 px, got {image_size}")
    root = Path(root)
    if root.is_symlink() and root.is_dir():
        root = root.resolve()  # work on the folder it points to (the link itself stays)
    paths = synthetic_paths(root)
    meta = _meta(num_train, num_val, image_size, seed)
    if _is_complete(paths, meta):
        return paths
    if not paths["marker"].exists() and _read_json(paths["meta"]) == meta and _files_complete(paths, meta):
        return paths  # a complete folder of the format before the marker: reused as it is
    _check_replaceable(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        tmp_paths = synthetic_paths(tmp)
        for split, count in (("train", num_train), ("val", num_val)):
            _write_split(tmp_paths[f"{split}_images"], tmp_paths[f"{split}_ann"], split, count, image_size, seed)
        tmp_paths["meta"].write_text(json.dumps(meta))
        _write_marker(tmp_paths["marker"], meta)  # written last: marks the folder complete
        if root.is_dir() and any(root.iterdir()):
            if _is_complete(paths, meta):  # another process finished first
                return paths
            _check_replaceable(root)  # (again: it may have changed meanwhile)
            stale = root.parent / f".{root.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(root, stale)  # our own output only (checked above)
            try:
                os.rename(tmp, root)
            except OSError:
                if not _is_complete(paths, meta):  # (another process may have put its copy in place)
                    raise
            finally:
                shutil.rmtree(stale, ignore_errors=True)
        else:
            try:
                os.rename(tmp, root)  # also replaces an empty folder
            except OSError:
                if _is_complete(paths, meta):  # another process renamed its copy into place first
                    return paths
                if not (root.is_dir() and not any(root.iterdir())):
                    raise
                _move_contents(tmp, root)  # an empty folder that cannot be replaced (e.g. a mount point)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return paths


def _write_marker(path: Path, meta: dict) -> None:
    part = path.with_name(path.name + f".part-{os.getpid()}")
    part.write_text(json.dumps(_marker_content(meta), sort_keys=True) + "\n")
    os.replace(part, path)


def _move_contents(source: Path, target: Path) -> None:
    """Move the entries of ``source`` into the (empty) folder ``target``, the marker last."""
    entries = sorted(source.iterdir(), key=lambda p: p.name == SYNTHETIC_MARKER)
    for entry in entries:
        shutil.move(str(entry), str(target / entry.name))


def synthetic_fingerprint(root: str | Path) -> str:
    """SHA-256 over the annotation files and every PNG's pixels (to check determinism)."""
    paths = synthetic_paths(root)
    digest = hashlib.sha256()
    for split in ("train", "val"):
        digest.update(paths[f"{split}_ann"].read_bytes())
        for png in sorted(paths[f"{split}_images"].glob("*.png")):
            with Image.open(png) as im:
                digest.update(np.asarray(im.convert("RGB")).tobytes())
    return digest.hexdigest()
