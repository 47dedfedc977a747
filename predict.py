"""Run a trained (libra) or released (MMDetection) detector on your own images.

    python predict.py --checkpoint work_dirs/libra_faster_rcnn_r50_fpn_synthetic photos/
    python predict.py --checkpoint libra_faster_rcnn_r50_fpn_1x_coco_20200130-3afee3a9.pth img.jpg "more/*.png" \\
        --classes coco_names.txt --score-thr 0.5 --out predictions
    python predict.py --checkpoint CKPT clip.mp4 --video-every 30     # needs PyAV (pip install av)

Inputs: image files, folders (searched recursively), glob patterns, video files. For every image
(or sampled video frame) a PNG with the detections drawn (boxes, class names and scores; masks for
a mask model) is written to ``--out``, and all detections go to ``--out/results.json`` in the COCO
results format with each entry's ``file_name`` (``libra/engine/predict.py``). An input that cannot
be read gets one line and the run goes on; the end says what was skipped. The checkpoint is a
``train.py`` checkpoint or work dir, or an MMDetection detector checkpoint (preset guessed from its
keys; class names from the checkpoint or ``--classes``).

Exit codes: 0 when at least one image was predicted, 1 for a bad checkpoint or flag, or when no
input could be read.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from libra.engine.checkpoint import CheckpointError, atomic_write_text
from libra.engine.cli import one_line, parse_set_overrides
from libra.engine.loading import (
    add_trust_argument,
    checkpoint_preset,
    detector_from_checkpoint,
    read_checkpoint,
    resolve_checkpoint_path,
)
from libra.engine.predict import InputError, find_inputs, keep_above, predict_images, read_image, results_entries, video_frames

EXIT_BAD_INPUT = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Detect objects in your own images with a libra or MMDetection checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("inputs", nargs="+", help="image files, folders (recursive), glob patterns or video files")
    parser.add_argument("--checkpoint", required=True, help="libra checkpoint or train.py work dir, or an MMDetection checkpoint")
    parser.add_argument("--out", default=None, help="output folder (default: work_dirs/predict_<checkpoint name>)")
    parser.add_argument("--score-thr", type=float, default=0.3, help="keep (draw and write) detections scoring at least this")
    parser.add_argument(
        "--batch-size", type=int, default=1,
        help="images per forward pass: 1 gives every image exactly the same result whatever else is predicted; "
        "more is faster on a GPU and agrees with 1 to float rounding (batched kernels sum in another order)",
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    parser.add_argument("--classes", default=None, metavar="FILE", help="class names, one per line in label order")
    parser.add_argument("--model", default=None, help="the preset to build (default: the checkpoint's, or guessed)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="a preset key on top of the checkpoint's config, e.g. --set nms_thr=0.6",
    )
    parser.add_argument("--min-size", type=int, default=None, help="short side after resize (default: the checkpoint's)")
    parser.add_argument("--max-size", type=int, default=None, help="cap on the long side (default: the checkpoint's)")
    parser.add_argument("--no-draw", action="store_true", help="write results.json only")
    parser.add_argument("--video-every", type=int, default=30, help="predict every N-th frame of a video")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads")
    add_trust_argument(parser)
    return parser


def read_class_names(path: str, num_classes: int) -> tuple[str, ...]:
    """One name per non-empty line; exactly ``num_classes`` of them (one line error otherwise)."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--classes {path}: no such file")
    names = tuple(line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip())
    if len(names) != num_classes:
        raise ValueError(f"--classes {path} has {len(names)} names but the model predicts {num_classes} classes")
    return names


def unique_png(out: Path, stem: str, taken: set[str]) -> Path:
    name, index = stem, 1
    while name in taken:
        index += 1
        name = f"{stem}_{index}"
    taken.add(name)
    return out / f"{name}.png"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.video_every < 1:
            raise ValueError(f"--video-every must be >= 1, got {args.video_every}")
        if args.threads:
            torch.set_num_threads(args.threads)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was requested but no CUDA GPU is visible: pass --device cpu")
        checkpoint = resolve_checkpoint_path(args.checkpoint)
        kind, raw = read_checkpoint(checkpoint, trust=args.trust_checkpoint)  # read once
        overrides = parse_set_overrides(args.set, args.model or checkpoint_preset(kind, raw)) if args.set else {}
        detector = detector_from_checkpoint(kind, raw, checkpoint, preset=args.model, overrides=overrides, device=device)
        del raw
        if args.classes:
            detector.class_names = read_class_names(args.classes, detector.num_classes)
        detector.min_size = args.min_size or detector.min_size
        detector.max_size = args.max_size or detector.max_size
        out = Path(args.out) if args.out else Path("work_dirs") / f"predict_{Path(checkpoint).stem}"
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK):
            raise ValueError(f"--out {out} is not writable")
    except (ValueError, CheckpointError, OSError) as error:
        if os.environ.get("LIBRA_DEBUG"):
            raise
        print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT

    found = find_inputs(args.inputs)
    skipped = list(found.skipped)
    for line in skipped:
        print(f"skipped: {line}", file=sys.stderr, flush=True)
    names = detector.class_names or tuple(str(i) for i in range(detector.num_classes))
    print(
        f"predicting with {detector.preset} ({detector.kind} checkpoint {checkpoint}, {detector.num_classes} classes) "
        f"on {len(found.images)} images and {len(found.videos)} videos, {device}; outputs in {out}",
        flush=True,
    )
    results: list[dict] = []
    taken: set[str] = set()
    predicted = 0

    def handle(items: list[tuple[str, str, torch.Tensor]]) -> None:
        nonlocal predicted
        outputs = predict_images(detector.model, [t for _, _, t in items], detector.min_size, detector.max_size,
                                 args.batch_size, device)
        for (file_name, stem, image), output in zip(items, outputs):
            output = keep_above(output, args.score_thr)
            results.extend(results_entries(predicted, file_name, output, detector.label_to_cat_id, names))
            if not args.no_draw and "labels" in output:
                from libra.data.visualize import draw_detections

                draw_detections(image, output["boxes"], output["labels"], output["scores"], names,
                                unique_png(out, stem, taken), score_threshold=args.score_thr, masks=output.get("masks"))
            predicted += 1

    from tqdm import tqdm

    pending: list[tuple[str, str, torch.Tensor]] = []
    for path in tqdm(found.images, desc="predict", unit="image", dynamic_ncols=True, disable=len(found.images) < 2):
        try:
            pending.append((str(path), path.stem, read_image(path)))
        except InputError as error:
            skipped.append(str(error))
            tqdm.write(f"skipped: {error}", file=sys.stderr)
            continue
        if len(pending) == args.batch_size:
            handle(pending)
            pending = []
    if pending:
        handle(pending)
    for video in found.videos:
        try:
            frames = [(f"{video}#frame={i}", f"{video.stem}_frame{i:06d}", t) for i, t in video_frames(video, args.video_every)]
        except InputError as error:
            skipped.append(str(error))
            print(f"skipped: {error}", file=sys.stderr, flush=True)
            continue
        for start in range(0, len(frames), args.batch_size):
            handle(frames[start : start + args.batch_size])

    try:
        atomic_write_text(json.dumps(results) + "\n", out / "results.json")
    except OSError as error:
        print(f"error: cannot write {out / 'results.json'}: {error.strerror or error}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    drawn = "" if args.no_draw else f", {predicted} PNGs"
    print(f"wrote {out / 'results.json'} ({len(results)} detections of {predicted} images{drawn})", flush=True)
    if skipped:
        print(f"skipped {len(skipped)} inputs: " + "; ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""), flush=True)
    if predicted == 0:
        print("error: no input could be read (see the skipped lines above)", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
