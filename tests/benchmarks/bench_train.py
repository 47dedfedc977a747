"""Training and inference throughput (images/s) of libra's detectors vs torchvision's Faster R-CNN.

Not a test: run it by hand, e.g.

    python tests/benchmarks/bench_train.py --device cuda --iters 20          # fp32 and AMP
    python tests/benchmarks/bench_train.py --device cpu --iters 2 --warmup 1 --train-batch 1 --infer-batches 1

Models, all built in the same process and timed on the same device and inputs:
- libra ``libra_faster_rcnn_r50_fpn`` (Libra R-CNN) and ``faster_rcnn_r50_fpn`` presets;
- torchvision ``fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)`` (the oracle).
Inputs are random images of ``--size`` (default 800 x 1333, the COCO test scale) with a few
random ground-truth boxes for training. torchvision's own transform sees images already at
800 x 1333, so it does not resize; libra gets the same images normalised and padded to a
multiple of 32 (what libra's data pipeline produces). Training: forward + backward + SGD step
at ``--train-batch`` images. Inference: ``model.eval()`` under ``torch.no_grad`` at each batch
size of ``--infer-batches``. Timing synchronises the device around the timed iterations, after
``--warmup`` untimed ones. AMP (fp16 autocast + GradScaler) runs on CUDA only.

Random weights give a different number of detections than trained ones; the relative numbers
between models are what this measures. Published V100 anchors at batch 1, fp32: Libra R50 19.0
fps vs Faster R-CNN 21.4 fps (MMDetection model zoo, `configs/libra_rcnn/README.md` and
`configs/faster_rcnn/README.md`, "Inf time (fps)"); the paper (Sec. 4.1.3) reports 19.5 vs 20.4 fps.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from libra.data.transforms import PIXEL_MEAN, PIXEL_STD  # noqa: E402
from libra.presets import build_model  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_batch(batch: int, height: int, width: int, num_classes: int, device: torch.device, generator: torch.Generator):
    """Raw RGB images in 0..255 [B,3,H,W] and per-image targets (5 boxes each)."""
    images = torch.rand((batch, 3, height, width), generator=generator) * 255.0
    targets = []
    for _ in range(batch):
        xy = torch.rand((5, 2), generator=generator) * torch.tensor([width * 0.7, height * 0.7])
        wh = 32 + torch.rand((5, 2), generator=generator) * torch.tensor([width * 0.3, height * 0.3])
        boxes = torch.cat([xy, xy + wh], dim=1)
        boxes = torch.minimum(boxes, torch.tensor([width, height, width, height], dtype=boxes.dtype))
        labels = torch.randint(0, num_classes, (5,), generator=generator)
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device)})
    return images.to(device), targets


class LibraRunner:
    """Adapts a libra FasterRCNN to (raw images, targets) calls."""

    def __init__(self, name: str, device: torch.device) -> None:
        self.name = name
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
    """torchvision's fasterrcnn_resnet50_fpn (random weights; labels 1..80, 0 is its background)."""

    def __init__(self, device: torch.device) -> None:
        from torchvision.models.detection import fasterrcnn_resnet50_fpn

        self.name = "torchvision fasterrcnn_resnet50_fpn"
        self.model = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=81).to(device)

    def train_step(self, images, targets):
        shifted = [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in targets]
        losses = self.model(list(images / 255.0), shifted)
        return sum(losses.values())

    def infer(self, images):
        return self.model(list(images / 255.0))


def time_training(runner, device, batch, height, width, iters, warmup, amp) -> float:
    model = runner.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    generator = torch.Generator().manual_seed(0)
    batches = [random_batch(batch, height, width, 80, device, generator) for _ in range(min(iters + warmup, 4))]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=20, help="timed iterations per measurement")
    parser.add_argument("--warmup", type=int, default=5, help="untimed iterations first")
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"))
    parser.add_argument("--train-batch", type=int, default=2, help="images per training step (2 per GPU in the paper)")
    parser.add_argument("--infer-batches", type=int, nargs="+", default=(1, 8))
    parser.add_argument("--no-amp", action="store_true", help="fp32 only (AMP always off on CPU)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    height, width = args.size
    precisions = [False] + ([True] if device.type == "cuda" and not args.no_amp else [])
    runners = [
        LibraRunner("libra_faster_rcnn_r50_fpn", device),
        LibraRunner("faster_rcnn_r50_fpn", device),
        TorchvisionRunner(device),
    ]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {device_name}; images {height}x{width}; {args.iters} timed iterations after {args.warmup} warm-up")
    rows = []  # (task, precision, batch, model name, images/s)
    for amp in precisions:
        precision = "amp" if amp else "fp32"
        measurements = [("train", args.train_batch)] + [("infer", b) for b in args.infer_batches]
        for task, batch in measurements:
            for runner in runners:
                fn = time_training if task == "train" else time_inference
                rate = fn(runner, device, batch, height, width, args.iters, args.warmup, amp)
                rows.append((task, precision, batch, runner.name, rate))
                print(f"  {task:5s} {precision:4s} batch {batch}: {runner.name:38s} {rate:8.3f} images/s", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    print()
    header = f"{'task':6s}{'prec':6s}{'batch':>6s}  {'model':40s}{'images/s':>10s}{'vs torchvision':>16s}"
    print(header)
    print("-" * len(header))
    for task, precision, batch, name, rate in rows:
        reference = next(r[4] for r in rows if r[:3] == (task, precision, batch) and r[3].startswith("torchvision"))
        print(f"{task:6s}{precision:6s}{batch:>6d}  {name:40s}{rate:10.3f}{rate / reference:15.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
