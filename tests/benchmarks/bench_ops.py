"""Benchmark libra.ops against torchvision.ops on the same inputs in the same run.

    python tests/benchmarks/bench_ops.py --device cpu
    python tests/benchmarks/bench_ops.py --device cuda --repeats 50 --json ops.json
    python tests/benchmarks/bench_ops.py --device cpu --tiny --repeats 1   # seconds: a smoke run
    python tests/benchmarks/bench_ops.py --device cpu --ops deform_conv2d  # only the DCN rows

Prints median wall time per call and the ratio libra / torchvision (< 1: libra faster), and with
``--json`` writes the same rows (rewritten after each row, so a run stopped early keeps what it
measured). Each row also says whether the two libraries agree on its inputs: RoIAlign's largest
absolute difference (forward outputs; forward+backward: the input gradients), and for NMS whether
the kept indices are identical (``batched_nms``: libra is exact per class, torchvision shifts
coordinates by class, so a mismatch there is reported, not asserted).

RoIAlign inputs mimic the R-CNN stage of Libra R-CNN on a 2-image batch at 800x1216:
FPN maps P2..P5 of 256 channels (200x304, 100x152, 50x76, 25x38), 7x7 output,
sampling_ratio=0, aligned=True. The K RoIs (K = 512 or 1000 in total over the batch)
have log-uniform sizes 16..800 px and are assigned to levels with the detector's rule
k = floor(log2(sqrt(wh) / 56 + 1e-6)) clamped to [0, 3]; each op is called once per
level, and the time of all four calls is reported. Forward+backward includes the
scatter into all four feature maps. NMS uses clustered random boxes (many overlaps)
with IoU threshold 0.7; batched_nms uses 80 classes and threshold 0.5.

Deformable convolution (``deform_conv2d``, DCN v1, and one modulated DCN v2 row) runs at the
3x3 conv2 of ResNet-50's C3-C5 bottlenecks with DCN (MMDetection's ``dconv-c3-c5`` configs) on
a 2-image batch at 800x1088: 128 / 256 / 512 channels at 100x136 / 50x68 / 25x34, stride 1,
padding 1, offsets ~ N(0, 2^2) pixels (mask ~ U(0, 1)); forward+backward computes all five
gradients (input, offset, mask, weight, bias). ``--tiny`` shrinks everything (maps / 4, 64 RoIs,
200 / 500 boxes, DCN channels / 4 at maps / 4) for a dry run on a CPU.
"""
import argparse
import json
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
ROI_COUNTS = (512, 1000)
NMS_SIZES = (1000, 5000, 20000)
# (stage, channels, height, width, modulated) of the DCN rows.
DCN_SHAPES = [("c3", 128, 100, 136, False), ("c4", 256, 50, 68, False), ("c5", 512, 25, 34, False),
              ("c4", 256, 50, 68, True)]
TINY = {"fpn_shapes": [(h // 4, w // 4) for h, w in FPN_SHAPES], "roi_counts": (64,), "nms_sizes": (200, 500),
        "dcn_shapes": [(name, c // 4, -(-h // 4), -(-w // 4), v2) for name, c, h, w, v2 in DCN_SHAPES]}


class Rows(list):
    """The measured rows; with a path, the JSON file is rewritten after every row."""

    def __init__(self, path: str | None, header: dict) -> None:
        super().__init__()
        self.path, self.header = path, header

    def add(self, row: dict) -> None:
        self.append(row)
        lib, tv = row["libra_ms"], row["torchvision_ms"]
        print(f"| {row['case']:<30} | {lib:>9.3f} | {tv:>14.3f} | {lib / tv:>6.2f} | {row['agreement']} |", flush=True)
        self.write()

    def write(self, **extra) -> None:
        if self.path:
            Path(self.path).write_text(json.dumps({**self.header, **extra, "rows": list(self)}, indent=2) + "\n")


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


def make_rois_per_level(num_rois: int, device: torch.device, image_size=IMAGE_SIZE) -> list[torch.Tensor]:
    """[Kl, 5] rois for each FPN level (batch of 2), assigned like the RoI extractor."""
    h, w = image_size
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


def roi_align_rows(device: torch.device, timer, rows: Rows, fpn_shapes, roi_counts, deadline: float) -> None:
    feats = [torch.randn(2, 256, h, w, device=device) for h, w in fpn_shapes]
    image_size = (fpn_shapes[0][0] * STRIDES[0], fpn_shapes[0][1] * STRIDES[0])
    for num_rois in roi_counts:
        if time.perf_counter() > deadline:
            return
        rois = make_rois_per_level(num_rois, device, image_size)

        def forward(op):
            return [op(f, r, 7, 1.0 / s, 0, True) for f, r, s in zip(feats, rois, STRIDES)]

        leaves = [f.detach().requires_grad_() for f in feats]

        def forward_backward(op):
            outs = [op(f, r, 7, 1.0 / s, 0, True) for f, r, s in zip(leaves, rois, STRIDES)]
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
            grads = [leaf.grad for leaf in leaves]
            for leaf in leaves:
                leaf.grad = None
            return grads

        with torch.no_grad():
            difference = max((a - b).abs().max().item() if a.numel() else 0.0
                             for a, b in zip(forward(libra.ops.roi_align), forward(tv_ops.roi_align)))
            lib = timer(lambda: forward(libra.ops.roi_align))
            tv = timer(lambda: forward(tv_ops.roi_align))
        rows.add({"case": f"roi_align fwd      K={num_rois}", "op": "roi_align", "pass": "forward", "n": num_rois,
                  "libra_ms": lib, "torchvision_ms": tv, "ratio": lib / tv, "max_abs_diff": difference,
                  "agreement": f"max abs diff {difference:.1e}"})
        grad_difference = max((a - b).abs().max().item() for a, b in
                              zip(forward_backward(libra.ops.roi_align), forward_backward(tv_ops.roi_align)))
        lib = timer(lambda: forward_backward(libra.ops.roi_align))
        tv = timer(lambda: forward_backward(tv_ops.roi_align))
        rows.add({"case": f"roi_align fwd+bwd  K={num_rois}", "op": "roi_align", "pass": "forward+backward",
                  "n": num_rois, "libra_ms": lib, "torchvision_ms": tv, "ratio": lib / tv,
                  "max_abs_diff": grad_difference, "agreement": f"grad max abs diff {grad_difference:.1e}"})


def nms_rows(device: torch.device, timer, rows: Rows, sizes, deadline: float) -> None:
    for n in sizes:
        if time.perf_counter() > deadline:
            return
        boxes, scores = make_boxes(n, device)
        same = torch.equal(libra.ops.nms(boxes, scores, 0.7).cpu(), tv_ops.nms(boxes, scores, 0.7).cpu())
        lib = timer(lambda: libra.ops.nms(boxes, scores, 0.7))
        tv = timer(lambda: tv_ops.nms(boxes, scores, 0.7))
        rows.add({"case": f"nms                N={n}", "op": "nms", "n": n, "libra_ms": lib, "torchvision_ms": tv,
                  "ratio": lib / tv, "same_kept": same, "agreement": "same kept" if same else "DIFFERENT kept"})
    for n in sizes:
        if time.perf_counter() > deadline:
            return
        boxes, scores = make_boxes(n, device)
        idxs = torch.randint(0, 80, (n,), device=device)
        same = torch.equal(libra.ops.batched_nms(boxes, scores, idxs, 0.5).cpu(),
                           tv_ops.batched_nms(boxes, scores, idxs, 0.5).cpu())
        lib = timer(lambda: libra.ops.batched_nms(boxes, scores, idxs, 0.5))
        tv = timer(lambda: tv_ops.batched_nms(boxes, scores, idxs, 0.5))
        rows.add({"case": f"batched_nms 80 cls N={n}", "op": "batched_nms", "n": n, "classes": 80, "libra_ms": lib,
                  "torchvision_ms": tv, "ratio": lib / tv, "same_kept": same,
                  "agreement": "same kept" if same else "kept differ (torchvision offsets)"})


def deform_conv_rows(device: torch.device, timer, rows: Rows, shapes, deadline: float, batch: int = 2) -> None:
    for stage, channels, height, width, modulated in shapes:
        if time.perf_counter() > deadline:
            return
        x = torch.randn(batch, channels, height, width, device=device)
        weight = torch.randn(channels, channels, 3, 3, device=device) / (3 * channels ** 0.5)
        bias = torch.zeros(channels, device=device)
        offset = torch.randn(batch, 18, height, width, device=device) * 2
        mask = torch.rand(batch, 9, height, width, device=device) if modulated else None
        inputs = [x, offset, weight, bias] + ([mask] if modulated else [])
        leaves = [t.detach().requires_grad_() for t in inputs]

        def forward(op, tensors=inputs):
            return op(tensors[0], tensors[1], tensors[2], tensors[3], padding=1, mask=tensors[4] if modulated else None)

        def forward_backward(op):
            out = forward(op, leaves)
            grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
            return grads

        name = f"dcn{'v2' if modulated else ''} {stage} {channels}x{height}x{width}"
        with torch.no_grad():
            difference = (forward(libra.ops.deform_conv2d) - forward(tv_ops.deform_conv2d)).abs().max().item()
            lib = timer(lambda: forward(libra.ops.deform_conv2d))
            tv = timer(lambda: forward(tv_ops.deform_conv2d))
        common = {"op": "deform_conv2d", "modulated": modulated, "stage": stage, "shape": [batch, channels, height, width]}
        rows.add({"case": f"{name} fwd", **common, "pass": "forward", "libra_ms": lib, "torchvision_ms": tv,
                  "ratio": lib / tv, "max_abs_diff": difference, "agreement": f"max abs diff {difference:.1e}"})
        if time.perf_counter() > deadline:
            return
        grad_difference = max((a - b).abs().max().item() for a, b in
                              zip(forward_backward(libra.ops.deform_conv2d), forward_backward(tv_ops.deform_conv2d)))
        lib = timer(lambda: forward_backward(libra.ops.deform_conv2d))
        tv = timer(lambda: forward_backward(tv_ops.deform_conv2d))
        rows.add({"case": f"{name} fwd+bwd", **common, "pass": "forward+backward", "libra_ms": lib, "torchvision_ms": tv,
                  "ratio": lib / tv, "max_abs_diff": grad_difference,
                  "agreement": f"grad max abs diff {grad_difference:.1e}"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    parser.add_argument("--tiny", action="store_true", help="small sizes for a dry run")
    parser.add_argument("--json", default=None, help="write the rows here (after every row)")
    parser.add_argument("--time-limit", type=float, default=0.0, help="start no new case after this many seconds (0: none)")
    parser.add_argument("--ops", nargs="+", choices=["roi_align", "nms", "deform_conv2d"],
                        default=["roi_align", "nms", "deform_conv2d"], help="which ops to time (default: all)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    deadline = time.perf_counter() + (args.time_limit if args.time_limit > 0 else float("inf"))
    if not libra.ops.EXTENSION_AVAILABLE:
        print("warning: libra._C not built, timing the pure-PyTorch fallback")
    sizes = TINY if args.tiny else {"fpn_shapes": FPN_SHAPES, "roi_counts": ROI_COUNTS, "nms_sizes": NMS_SIZES,
                                    "dcn_shapes": DCN_SHAPES}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    header = {"device": str(device), "device_name": name, "torch": torch.__version__, "repeats": args.repeats,
              "tiny": args.tiny, "extension": libra.ops.EXTENSION_AVAILABLE, "unit": "ms per call (median)"}
    print(f"device={name} torch={torch.__version__} repeats={args.repeats} extension={libra.ops.EXTENSION_AVAILABLE}")
    print(f"| {'case':<30} | {'libra ms':>9} | {'torchvision ms':>14} | {'ratio':>6} | agreement |")
    print(f"|{'-' * 32}|{'-' * 11}|{'-' * 16}|{'-' * 8}|-----------|")
    rows = Rows(args.json, header)

    def timer(fn):
        return median_ms(fn, device, args.repeats, args.warmup)

    if "roi_align" in args.ops:
        roi_align_rows(device, timer, rows, sizes["fpn_shapes"], sizes["roi_counts"], deadline)
    if "nms" in args.ops:
        nms_rows(device, timer, rows, sizes["nms_sizes"], deadline)
    if "deform_conv2d" in args.ops:
        deform_conv_rows(device, timer, rows, sizes["dcn_shapes"], deadline)
    stopped = time.perf_counter() > deadline
    rows.write(complete=not stopped)
    if stopped:
        print(f"stopped after {args.time_limit:.0f} s (--time-limit): {len(rows)} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
