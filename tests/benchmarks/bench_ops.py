"""Benchmark libra.ops against torchvision.ops on the same inputs in the same run.

    python tests/benchmarks/bench_ops.py --device cpu
    python tests/benchmarks/bench_ops.py --device cuda --repeats 50

Prints median wall time per call and the ratio libra / torchvision (< 1: libra faster).

RoIAlign inputs mimic the R-CNN stage of Libra R-CNN on a 2-image batch at 800x1216:
FPN maps P2..P5 of 256 channels (200x304, 100x152, 50x76, 25x38), 7x7 output,
sampling_ratio=0, aligned=True. The K RoIs (K = 512 or 1000 in total over the batch)
have log-uniform sizes 16..800 px and are assigned to levels with the detector's rule
k = floor(log2(sqrt(wh) / 56 + 1e-6)) clamped to [0, 3]; each op is called once per
level, and the time of all four calls is reported. Forward+backward includes the
scatter into all four feature maps. NMS uses clustered random boxes (many overlaps)
with IoU threshold 0.7; batched_nms uses 80 classes and threshold 0.5.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import libra.ops  # noqa: E402
import torchvision.ops as tv_ops  # noqa: E402

FPN_SHAPES = [(200, 304), (100, 152), (50, 76), (25, 38)]
STRIDES = [4, 8, 16, 32]
IMAGE_SIZE = (800, 1216)


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def make_rois_per_level(num_rois: int, device: torch.device) -> list[torch.Tensor]:
    """[Kl, 5] rois for each FPN level (batch of 2), assigned like the RoI extractor."""
    h, w = IMAGE_SIZE
    size = torch.exp(torch.empty(num_rois).uniform_(torch.log(torch.tensor(16.0)), torch.log(torch.tensor(800.0))))
    aspect = torch.exp(torch.empty(num_rois).uniform_(-0.7, 0.7))
    bw, bh = size * aspect.sqrt(), size / aspect.sqrt()
    cx, cy = torch.rand(num_rois) * w, torch.rand(num_rois) * h
    boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=1).clamp(min=0)
    boxes[:, 2] = boxes[:, 2].clamp(max=w)
    boxes[:, 3] = boxes[:, 3].clamp(max=h)
    batch = torch.randint(0, 2, (num_rois, 1)).float()
    rois = torch.cat([batch, boxes], dim=1)
    scale = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sqrt()
    level = torch.floor(torch.log2(scale / 56 + 1e-6)).clamp(0, 3).long()
    return [rois[level == i].to(device) for i in range(4)]


def make_boxes(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    centres = torch.rand(max(n // 20, 1), 2) * torch.tensor([IMAGE_SIZE[1], IMAGE_SIZE[0]])
    centre = centres[torch.randint(0, centres.shape[0], (n,))] + torch.randn(n, 2) * 20
    half = torch.rand(n, 2) * 60 + 10
    boxes = torch.cat([centre - half, centre + half], dim=1)
    return boxes.to(device), torch.rand(n, device=device)


def roi_align_rows(device: torch.device, repeats: int) -> list[tuple[str, float, float]]:
    rows = []
    feats = [torch.randn(2, 256, h, w, device=device) for h, w in FPN_SHAPES]
    for num_rois in (512, 1000):
        rois = make_rois_per_level(num_rois, device)

        def forward(op):
            return [op(f, r, 7, 1.0 / s, 0, True) for f, r, s in zip(feats, rois, STRIDES)]

        def forward_backward(op, leaves=[f.detach().requires_grad_() for f in feats]):
            outs = [op(f, r, 7, 1.0 / s, 0, True) for f, r, s in zip(leaves, rois, STRIDES)]
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
            for leaf in leaves:
                leaf.grad = None

        with torch.no_grad():
            lib = median_ms(lambda: forward(libra.ops.roi_align), device, repeats)
            tv = median_ms(lambda: forward(tv_ops.roi_align), device, repeats)
        rows.append((f"roi_align fwd      K={num_rois}", lib, tv))
        lib = median_ms(lambda: forward_backward(libra.ops.roi_align), device, repeats)
        tv = median_ms(lambda: forward_backward(tv_ops.roi_align), device, repeats)
        rows.append((f"roi_align fwd+bwd  K={num_rois}", lib, tv))
    return rows


def nms_rows(device: torch.device, repeats: int) -> list[tuple[str, float, float]]:
    rows = []
    for n in (1000, 5000, 20000):
        boxes, scores = make_boxes(n, device)
        assert torch.equal(libra.ops.nms(boxes, scores, 0.7).cpu(), tv_ops.nms(boxes, scores, 0.7).cpu())
        lib = median_ms(lambda: libra.ops.nms(boxes, scores, 0.7), device, repeats)
        tv = median_ms(lambda: tv_ops.nms(boxes, scores, 0.7), device, repeats)
        rows.append((f"nms                N={n}", lib, tv))
    for n in (1000, 5000, 20000):
        boxes, scores = make_boxes(n, device)
        idxs = torch.randint(0, 80, (n,), device=device)
        lib = median_ms(lambda: libra.ops.batched_nms(boxes, scores, idxs, 0.5), device, repeats)
        tv = median_ms(lambda: tv_ops.batched_nms(boxes, scores, idxs, 0.5), device, repeats)
        rows.append((f"batched_nms 80 cls N={n}", lib, tv))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    if not libra.ops.EXTENSION_AVAILABLE:
        print("warning: libra._C not built, timing the pure-PyTorch fallback")
    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} repeats={args.repeats}")
    rows = roi_align_rows(device, args.repeats) + nms_rows(device, args.repeats)
    print(f"| {'case':<26} | {'libra ms':>9} | {'torchvision ms':>14} | {'ratio':>6} |")
    print(f"|{'-' * 28}|{'-' * 11}|{'-' * 16}|{'-' * 8}|")
    for name, lib, tv in rows:
        print(f"| {name:<26} | {lib:>9.2f} | {tv:>14.2f} | {lib / tv:>6.2f} |")


if __name__ == "__main__":
    main()
