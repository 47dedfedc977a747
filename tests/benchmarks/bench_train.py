"""Training and inference throughput (images/s) of libra's detectors vs torchvision's, in one run.

Not a test: run it by hand, e.g.

    python tests/benchmarks/bench_train.py --device cuda --iters 10 --json train.json   # fp32 + AMP, batch 2 and 8
    python tests/benchmarks/bench_train.py --device cpu --iters 1 --warmup 0 --size 128 128 \\
        --train-batches 1 --infer-batches 1 --models libra_faster_rcnn_r50_fpn tv_fasterrcnn     # a smoke run

Models, all built in the same process and timed on the same device and inputs (``--models auto``,
the default, takes those that exist):
- libra presets ``libra_faster_rcnn_r50_fpn``, ``faster_rcnn_r50_fpn``, ``libra_retinanet_r50_fpn``,
  ``retinanet_r50_fpn``, ``libra_mask_rcnn_r50_fpn``, ``mask_rcnn_r50_fpn`` and ``rpn_r50_fpn``
  (a name missing from ``libra.presets.available_presets()`` is skipped; Fast R-CNN presets need
  proposal files and are not timed here);
- torchvision peers with random weights (``weights=None, weights_backbone=None``):
  ``tv_fasterrcnn`` (``fasterrcnn_resnet50_fpn``, always), ``tv_retinanet``
  (``retinanet_resnet50_fpn``, when a RetinaNet preset runs), ``tv_maskrcnn``
  (``maskrcnn_resnet50_fpn``, when a Mask R-CNN preset runs).
Each libra row is compared with its peer of the same kind (two-stage and RPN: Faster R-CNN;
RetinaNet; Mask R-CNN) and with torchvision's Faster R-CNN; the ratio is libra / torchvision
images/s (> 1: libra faster).

Inputs are random images of ``--size`` (default 800 x 1333, the COCO test scale) with five random
ground-truth boxes per image for training (and box masks for Mask R-CNN). torchvision's transform
is built with ``min_size``/``max_size`` equal to that size, so it does not resize; libra gets the
same images normalised and padded to a multiple of 32 (what libra's data pipeline produces).
Training: forward + backward + SGD step at each ``--train-batches`` size. Inference:
``model.eval()`` under ``torch.no_grad`` at each ``--infer-batches`` size. Timing synchronises the
device around the timed iterations, after ``--warmup`` untimed ones. AMP (fp16 autocast +
GradScaler) runs on CUDA only. A measurement that fails (out of memory, an unsupported model) is a
row with its error, and the run goes on; ``--time-limit`` stops starting new ones; ``--json`` is
rewritten after every row.

Random weights give a different number of detections than trained ones; the relative numbers
between models are what this measures. Published V100 anchors at batch 1, fp32: Libra R50 19.0
fps vs Faster R-CNN 21.4 fps (MMDetection model zoo, `configs/libra_rcnn/README.md` and
`configs/faster_rcnn/README.md`, "Inf time (fps)"); the paper (Sec. 4.1.3) reports 19.5 vs 20.4 fps.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from libra.data.transforms import PIXEL_MEAN, PIXEL_STD  # noqa: E402
from libra.presets import available_presets, build_model, preset_config  # noqa: E402

LIBRA_CANDIDATES = (
    "libra_faster_rcnn_r50_fpn", "faster_rcnn_r50_fpn", "libra_retinanet_r50_fpn", "retinanet_r50_fpn",
    "libra_mask_rcnn_r50_fpn", "mask_rcnn_r50_fpn", "rpn_r50_fpn",
)
TORCHVISION = {
    "tv_fasterrcnn": "fasterrcnn_resnet50_fpn",
    "tv_retinanet": "retinanet_resnet50_fpn",
    "tv_maskrcnn": "maskrcnn_resnet50_fpn",
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kind_of(name: str) -> str:
    """``two_stage`` / ``retinanet`` / ``mask`` / ``rpn`` for a libra preset or a torchvision peer."""
    if name.startswith("tv_"):
        return {"tv_fasterrcnn": "two_stage", "tv_retinanet": "retinanet", "tv_maskrcnn": "mask"}[name]
    detector = preset_config(name)["detector"]
    if "mask" in name or "mask" in detector:
        return "mask"
    return {"retinanet": "retinanet", "rpn": "rpn"}.get(detector, "two_stage")


PEER = {"two_stage": "tv_fasterrcnn", "rpn": "tv_fasterrcnn", "retinanet": "tv_retinanet", "mask": "tv_maskrcnn"}


def resolve_models(requested: list[str]) -> tuple[list[str], list[str]]:
    """(models to run, notes on those skipped). ``auto``: every candidate that exists, plus peers."""
    presets = set(available_presets())
    notes = []
    if requested == ["auto"]:
        chosen = [n for n in LIBRA_CANDIDATES if n in presets]
        notes += [f"{n}: no such preset (skipped)" for n in LIBRA_CANDIDATES if n not in presets]
        peers = {PEER[kind_of(n)] for n in chosen} | {"tv_fasterrcnn"}
        return chosen + [p for p in TORCHVISION if p in peers], notes
    chosen = []
    for name in requested:
        if name in TORCHVISION or name in presets:
            chosen.append(name)
        else:
            notes.append(f"{name}: no such preset or torchvision model (skipped)")
    return chosen, notes


def random_batch(batch: int, height: int, width: int, num_classes: int, device: torch.device,
                 generator: torch.Generator, masks: bool = False):
    """Raw RGB images in 0..255 [B,3,H,W] and per-image targets (5 boxes each; box masks if asked)."""
    images = torch.rand((batch, 3, height, width), generator=generator) * 255.0
    targets = []
    for _ in range(batch):
        xy = torch.rand((5, 2), generator=generator) * torch.tensor([width * 0.7, height * 0.7])
        wh = 32 + torch.rand((5, 2), generator=generator) * torch.tensor([width * 0.3, height * 0.3])
        boxes = torch.cat([xy, xy + wh], dim=1)
        boxes = torch.minimum(boxes, torch.tensor([width, height, width, height], dtype=boxes.dtype))
        labels = torch.randint(0, num_classes, (5,), generator=generator)
        target = {"boxes": boxes.to(device), "labels": labels.to(device)}
        if masks:
            grid_y = torch.arange(height)[None, :, None]
            grid_x = torch.arange(width)[None, None, :]
            b = boxes.round().long()
            in_x = (grid_x >= b[:, 0, None, None]) & (grid_x < b[:, 2, None, None])  # [5, 1, W]
            in_y = (grid_y >= b[:, 1, None, None]) & (grid_y < b[:, 3, None, None])  # [5, H, 1]
            inside = in_x & in_y  # [5, H, W]: the box filled
            target["masks"] = inside.to(torch.uint8).to(device)
        targets.append(target)
    return images.to(device), targets


class LibraRunner:
    """Adapts a libra detector to (raw images, targets) calls."""

    def __init__(self, name: str, device: torch.device, size: tuple[int, int]) -> None:
        self.name = name
        self.kind = kind_of(name)
        self.model = build_model(name, num_classes=80).to(device)
        self.device = device
        self.mean = torch.tensor(PIXEL_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(PIXEL_STD, device=device).view(1, 3, 1, 1)

    def _prepare(self, images: torch.Tensor):
        batch, _, height, width = images.shape
        padded_h, padded_w = math.ceil(height / 32) * 32, math.ceil(width / 32) * 32
        normalised = (images - self.mean) / self.std
        padded = normalised.new_zeros((batch, 3, padded_h, padded_w))
        padded[:, :, :height, :width] = normalised
        return padded, [(height, width)] * batch

    def train_step(self, images, targets):
        padded, sizes = self._prepare(images)
        losses = self.model(padded, sizes, targets)
        return sum(v for k, v in losses.items() if k.startswith("loss"))

    def infer(self, images):
        padded, sizes = self._prepare(images)
        return self.model(padded, sizes, original_sizes=sizes)


class TorchvisionRunner:
    """A torchvision detection model with random weights (labels 1..80, 0 is its background)."""

    def __init__(self, name: str, device: torch.device, size: tuple[int, int]) -> None:
        import torchvision.models.detection as detection

        self.name = name
        self.kind = kind_of(name)
        builder = getattr(detection, TORCHVISION[name])
        # RetinaNet has no background class in torchvision either; 81 keeps the label shift uniform.
        self.model = builder(weights=None, weights_backbone=None, num_classes=81,
                             min_size=min(size), max_size=max(size)).to(device)

    def train_step(self, images, targets):
        shifted = [{**t, "labels": t["labels"] + 1} for t in targets]
        losses = self.model(list(images / 255.0), shifted)
        return sum(losses.values())

    def infer(self, images):
        return self.model(list(images / 255.0))


def make_runner(name: str, device: torch.device, size: tuple[int, int]):
    return TorchvisionRunner(name, device, size) if name in TORCHVISION else LibraRunner(name, device, size)


def time_training(runner, device, batch, height, width, iters, warmup, amp) -> float:
    model = runner.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    generator = torch.Generator().manual_seed(0)
    masks = runner.kind == "mask"
    batches = [random_batch(batch, height, width, 80, device, generator, masks) for _ in range(min(iters + warmup, 4))]
    elapsed = 0.0
    for step in range(warmup + iters):
        images, targets = batches[step % len(batches)]
        synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
            loss = runner.train_step(images, targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        synchronize(device)
        if step >= warmup:
            elapsed += time.perf_counter() - start
    return batch * iters / elapsed


@torch.no_grad()
def time_inference(runner, device, batch, height, width, iters, warmup, amp) -> float:
    model = runner.model
    model.eval()
    generator = torch.Generator().manual_seed(1)
    images, _ = random_batch(batch, height, width, 80, device, generator)
    elapsed = 0.0
    for step in range(warmup + iters):
        synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
            runner.infer(images)
        synchronize(device)
        if step >= warmup:
            elapsed += time.perf_counter() - start
    return batch * iters / elapsed


def add_ratios(rows: list[dict]) -> None:
    """``vs_peer`` and ``vs_tv_fasterrcnn``: images/s over the torchvision row of the same setting."""
    rates = {(r["task"], r["precision"], r["batch"], r["model"]): r.get("images_per_s") for r in rows}
    for row in rows:
        key = (row["task"], row["precision"], row["batch"])
        rate = row.get("images_per_s")
        for field, peer in (("vs_peer", PEER[row["kind"]]), ("vs_tv_fasterrcnn", "tv_fasterrcnn")):
            reference = rates.get((*key, peer))
            row[field] = round(rate / reference, 3) if rate and reference and row["model"] != peer else None
        row["peer"] = PEER[row["kind"]] if not row["model"].startswith("tv_") else None


def write_json(path: str | None, header: dict, rows: list[dict], **extra) -> None:
    if path:
        add_ratios(rows)
        Path(path).write_text(json.dumps({**header, **extra, "rows": rows}, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"))
    parser.add_argument("--train-batches", type=int, nargs="+", default=(2, 8), help="images per training step")
    parser.add_argument("--infer-batches", type=int, nargs="+", default=(2, 8))
    parser.add_argument("--models", nargs="+", default=["auto"], help="libra presets and tv_* peers, or auto")
    parser.add_argument("--no-amp", action="store_true", help="fp32 only (AMP always off on CPU)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="write the rows here (after every row)")
    parser.add_argument("--time-limit", type=float, default=0.0, help="start no new measurement after this many seconds")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    deadline = time.perf_counter() + (args.time_limit if args.time_limit > 0 else float("inf"))
    height, width = args.size
    precisions = [False] + ([True] if device.type == "cuda" and not args.no_amp else [])
    names, notes = resolve_models(list(args.models))
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    header = {"device": str(device), "device_name": device_name, "torch": torch.__version__, "size": [height, width],
              "iters": args.iters, "warmup": args.warmup, "models": names, "notes": notes, "unit": "images/s"}
    print(f"device: {device_name}; images {height}x{width}; {args.iters} timed iterations after {args.warmup} warm-up; "
          f"models: {', '.join(names)}")
    for note in notes:
        print(f"  note: {note}")
    runners: dict[str, object] = {}
    rows: list[dict] = []
    stopped = False
    for amp in precisions:
        precision = "amp" if amp else "fp32"
        measurements = [("train", b) for b in args.train_batches] + [("infer", b) for b in args.infer_batches]
        for task, batch in measurements:
            for name in names:
                if time.perf_counter() > deadline:
                    stopped = True
                    break
                row = {"task": task, "precision": precision, "batch": batch, "model": name, "kind": kind_of(name)}
                try:
                    if name not in runners:
                        runners[name] = make_runner(name, device, (height, width))
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    fn = time_training if task == "train" else time_inference
                    row["images_per_s"] = fn(runners[name], device, batch, height, width, args.iters, args.warmup, amp)
                    if device.type == "cuda":
                        row["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                    print(f"  {task:5s} {precision:4s} batch {batch}: {name:28s} {row['images_per_s']:9.3f} images/s", flush=True)
                except Exception as error:  # noqa: BLE001 - reported as a row, the run goes on
                    row["error"] = f"{type(error).__name__}: {' '.join(str(error).split())}"[:300]
                    print(f"  {task:5s} {precision:4s} batch {batch}: {name:28s} failed: {row['error']}", flush=True)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                rows.append(row)
                write_json(args.json, header, rows, complete=False)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    add_ratios(rows)
    write_json(args.json, header, rows, complete=not stopped)
    if stopped:
        print(f"stopped after {args.time_limit:.0f} s (--time-limit); {len(rows)} measurements")

    print()
    header_line = f"{'task':6s}{'prec':6s}{'batch':>6s}  {'model':30s}{'images/s':>10s}{'vs peer':>9s}{'vs tv frcnn':>13s}"
    print(header_line)
    print("-" * len(header_line))
    for row in rows:
        rate = f"{row['images_per_s']:10.3f}" if "images_per_s" in row else f"{'failed':>10s}"
        peer = f"{row['vs_peer']:8.2f}x" if row.get("vs_peer") else f"{'':9s}"
        frcnn = f"{row['vs_tv_fasterrcnn']:12.2f}x" if row.get("vs_tv_fasterrcnn") else ""
        print(f"{row['task']:6s}{row['precision']:6s}{row['batch']:>6d}  {row['model']:30s}{rate}{peer}{frcnn}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
