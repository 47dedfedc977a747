"""The training paths that must not synchronise the host with the GPU, checked on CUDA.

Each check runs the code under ``torch.cuda.set_sync_debug_mode("error")`` (``no_host_sync`` in
``tests/gpu/sync_debug.py``): any ``.item()``, ``bool(t)``, ``nonzero``, boolean-mask indexing,
blocking copy or ``torch.cuda.synchronize`` inside raises. Covered: the MaxIoUAssigner, the RPN's
training loss (anchors, valid flags, assignment, sampling, targets, loss, backward) and a standalone
RPN's training step, the RoI head's ``sample()`` and ``loss()`` after the RoI extractor, and a whole
RetinaNet training step, all with target validation off (the detector's one documented sync per batch, ``libra.detectors.base``).

The known, documented host syncs are not inside these checks; the tests that record them (mode
``"warn"``) assert that every sync comes from where the code says it does:

- NMS (``libra/ops/nms.py``): the number of kept boxes is a shape (RPN proposals, test-time NMS);
- the RoI extractor (``libra/roi_heads/roi_extractor.py``): the RoIs per FPN level are shapes;
- target validation (``libra/detectors/base.py``): one flag transfer per batch.

Every test also runs on the CPU ("logic mode"): the same calls, with the outputs checked against
an independent computation (a plain-loop assigner, losses recomputed with boolean indexing on the
CPU); there the sync checks do nothing. On CUDA the outputs are compared with the same CPU
computation, with TF32 off.
"""

from __future__ import annotations

import copy
import os
import sys
import traceback
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent / "gpu"))

from conftest import TinyBackbone  # noqa: E402
from libra.boxes import box_iof, box_iou  # noqa: E402
from libra.dense_heads import RegionProposalNetwork  # noqa: E402
from libra.losses import sigmoid_focal_loss  # noqa: E402
from libra.max_iou_assigner import MaxIoUAssigner  # noqa: E402
from libra.presets import available_presets, build_model  # noqa: E402
from libra.structures import Proposals  # noqa: E402
from sync_debug import SYNC_MESSAGE, SyncRecorder, event_from_stack, is_sync_error, no_host_sync  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]

NUM_CLASSES = 3
# Two images padded to 128 x 160; the second is 96 x 128 (its anchors in the padding are invalid).
BATCH_SHAPE = (128, 160)
IMAGE_SIZES = [(128, 160), (96, 128)]
FPN_STRIDES = (4, 8, 16, 32, 64)


def _set_tf32(matmul: bool, cudnn: bool) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # newer torch prefers its fp32_precision settings
        try:
            torch.backends.cuda.matmul.allow_tf32 = matmul
            torch.backends.cudnn.allow_tf32 = cudnn
        except RuntimeError:  # the new API was used in this process: use it too
            torch.backends.cuda.matmul.fp32_precision = "tf32" if matmul else "ieee"
            torch.backends.cudnn.conv.fp32_precision = "tf32" if cudnn else "ieee"


@pytest.fixture(autouse=True)
def exact_float32():
    """No TF32 in cuDNN / cuBLAS, so CUDA float32 results can be compared with the CPU's."""
    if not HAS_CUDA:
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    _set_tf32(False, False)
    yield
    _set_tf32(*saved)


# ----------------------------------------------------------------------------- helpers
def random_boxes(n: int, generator: torch.Generator, width: float = 160.0, height: float = 128.0,
                 min_side: float = 4.0, max_side: float = 80.0) -> torch.Tensor:
    """``[n, 4]`` float32 boxes with random float corners inside ``width`` x ``height``."""
    wh = min_side + torch.rand(n, 2, generator=generator) * (max_side - min_side)
    xy = torch.rand(n, 2, generator=generator) * (torch.tensor([width, height]) - wh)
    return torch.cat([xy, xy + wh], dim=1)


def jitter(boxes: torch.Tensor, copies: int, scale: float, generator: torch.Generator) -> torch.Tensor:
    """``copies`` noisy versions of every box (noise ``scale`` x its size): mostly IoU > 0.5."""
    repeated = boxes.repeat_interleave(copies, dim=0)
    size = (repeated[:, 2:] - repeated[:, :2]).repeat(1, 2)
    return repeated + torch.randn(repeated.shape, generator=generator) * scale * size


def to_device(target: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in target.items()}


def batch_targets(generator: torch.Generator) -> list[dict]:
    """Image 0: three boxes (labels 0, 2, 1) and an ignore box; image 1: no box at all."""
    boxes = torch.tensor([[10.5, 20.25, 60.75, 90.5], [30.25, 30.5, 100.5, 70.75], [90.5, 8.25, 150.75, 60.5]])
    boxes = boxes + torch.rand(boxes.shape, generator=generator)  # no two coordinates alike
    return [
        {"boxes": boxes, "labels": torch.tensor([0, 2, 1]), "ignore_boxes": torch.tensor([[110.0, 70.0, 158.0, 126.0]])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]


def fpn_features(channels: int, generator: torch.Generator, strides=FPN_STRIDES) -> list[torch.Tensor]:
    height, width = BATCH_SHAPE
    return [torch.randn(2, channels, -(-height // s), -(-width // s), generator=generator) for s in strides]


def total_loss(losses: dict) -> torch.Tensor:
    return sum(v for k, v in losses.items() if k.startswith("loss"))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, device: torch.device) -> None:
    tolerance = dict(rtol=1e-5, atol=1e-6) if device.type == "cpu" else dict(rtol=2e-4, atol=1e-5)
    torch.testing.assert_close(actual.detach().cpu().double(), expected.detach().double(), **tolerance)


# ----------------------------------------------------------------------------- the harness itself
def test_event_from_stack_names_the_calling_line():
    def calls_a_sync():
        return event_from_stack(traceback.extract_stack())

    event = calls_a_sync()
    assert event.site.startswith("tests/test_cuda_sync.py:") and event.function == "calls_a_sync"
    assert "extract_stack" in event.code and event.via and "test_event_from_stack_names_the_calling_line" in event.via[0]


def test_recorder_collects_python_and_cpp_sync_warnings(monkeypatch):
    """The recorder's bookkeeping, without a GPU: a Python warning with the sync message, a C++ log line
    written to file descriptor 2 inside a wrapped ``torch.ops.libra`` op, and one outside any op."""
    import libra.ops

    if not libra.ops.EXTENSION_AVAILABLE:
        pytest.skip("libra._C not built (the recorder wraps its ops)")
    for name in ("synchronize", "get_sync_debug_mode", "set_sync_debug_mode"):
        monkeypatch.setattr(torch.cuda, name, lambda *args, **kwargs: 0)
    recorder = SyncRecorder("cpu", tag=lambda: "tagged")
    recorder.available = True  # pretend: the debug-mode calls above are no-ops
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0]])
    with recorder:
        warnings.warn(f"{SYNC_MESSAGE} CUDA operation (Triggered internally at CUDAFunctions.cpp:1.)")
        probe = torch.ops.libra.nms
        real = probe._packet

        def writes_a_cpp_warning(*args):
            os.write(2, f"[W CUDAFunctions.cpp:151] Warning: {SYNC_MESSAGE} CUDA operation\n".encode())
            return real(*args)

        probe._packet = writes_a_cpp_warning
        kept = libra.ops.nms(boxes, torch.tensor([1.0, 0.5]), 0.5)
        os.write(2, f"[W] Warning: {SYNC_MESSAGE} CUDA operation\n".encode())
    assert kept.tolist() == [0]
    assert torch.ops.libra.nms is real  # restored
    python_event, op_event, log_event = recorder.events
    assert python_event.site.startswith("tests/test_cuda_sync.py:") and python_event.tag == "tagged"
    assert op_event.site.startswith("libra/ops/nms.py:") and op_event.op == "torch.ops.libra.nms"
    assert log_event.site == SyncRecorder.CPP_SITE
    assert recorder.files() == {"tests/test_cuda_sync.py", "libra/ops/nms.py", SyncRecorder.CPP_SITE}


@needs_cuda
def test_sync_harness_catches_syncs_on_cuda():
    x = torch.arange(6.0, device="cuda")
    with no_host_sync("cuda"):
        y = x * 2  # no sync
        with pytest.raises(RuntimeError) as caught:
            y.sum().item()
    assert is_sync_error(caught.value)
    recorder = SyncRecorder("cuda")
    with recorder:
        (x > 2).nonzero()
    assert recorder.events and recorder.files() == {"tests/test_cuda_sync.py"}, recorder.sites()


@needs_cuda
def test_recorder_sees_the_sync_inside_the_compiled_nms():
    """Needed by the warn-mode tests below: the sync inside ``torch.ops.libra.nms`` (its ``nonzero``)
    must be recorded whether torch reports it as a Python warning or on the C++ log."""
    import libra.ops

    if not libra.ops.EXTENSION_AVAILABLE:
        pytest.skip("libra._C not built")
    generator = torch.Generator().manual_seed(0)
    boxes, scores = random_boxes(200, generator).cuda(), torch.rand(200, generator=generator).cuda()
    libra.ops.nms(boxes, scores, 0.5)  # warm-up
    recorder = SyncRecorder("cuda")
    with recorder:
        libra.ops.nms(boxes, scores, 0.5)
    assert recorder.events and recorder.files() == {"libra/ops/nms.py"}, recorder.sites()


# ----------------------------------------------------------------------------- MaxIoUAssigner
ASSIGNERS = {  # the RPN's, the R-CNN stage's and RetinaNet's settings (see the heads)
    "rpn": dict(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3, match_low_quality=True, ignore_iof_thr=0.5),
    "rcnn": dict(pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5, match_low_quality=False, ignore_iof_thr=0.5),
    "retinanet": dict(pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0.0, match_low_quality=True, ignore_iof_thr=-1.0),
}


def assign_reference(overlaps, iof, valid, gt_labels, cfg):
    """MaxIoUAssigner's rules with Python loops, on given ``[G, N]`` IoUs and ``[N, Gi]`` IoFs."""
    # Thresholds rounded to float32, as a float32 tensor compares with a Python number.
    cfg = {k: (torch.tensor(v, dtype=torch.float32).item() if isinstance(v, float) else v) for k, v in cfg.items()}
    num_gts, num_boxes = overlaps.shape
    ov = overlaps.tolist()
    ok = [True] * num_boxes if valid is None else valid.tolist()
    if num_gts == 0:
        gt_inds, max_ov = [0] * num_boxes, [0.0] * num_boxes
    else:
        ov = [[v if ok[j] else -1.0 for j, v in enumerate(row)] for row in ov]
        gt_inds, max_ov = [], []
        for j in range(num_boxes):
            column = [ov[i][j] for i in range(num_gts)]
            best = max(column)
            max_ov.append(best)
            gt_inds.append(0 if best < cfg["neg_iou_thr"] else (column.index(best) + 1 if best >= cfg["pos_iou_thr"] else -1))
        if cfg["match_low_quality"]:
            for i in range(num_gts):  # later gts overwrite earlier ones
                best = max(ov[i])
                if best >= cfg["min_pos_iou"]:
                    for j in range(num_boxes):
                        if ov[i][j] == best:
                            gt_inds[j] = i + 1
    if iof is not None and cfg["ignore_iof_thr"] > 0 and iof.numel() and num_boxes:
        inside = (iof.max(dim=1).values > cfg["ignore_iof_thr"]).tolist()
        gt_inds = [-1 if inside[j] and g <= 0 else g for j, g in enumerate(gt_inds)]
    if valid is not None:
        gt_inds = [g if ok[j] else -1 for j, g in enumerate(gt_inds)]
        if num_gts:
            max_ov = [max(v, 0.0) for v in max_ov]
    labels = [int(gt_labels[g - 1]) if g > 0 else -1 for g in gt_inds]
    return torch.tensor(gt_inds), torch.tensor(max_ov, dtype=overlaps.dtype), torch.tensor(labels)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", sorted(ASSIGNERS))
@pytest.mark.parametrize("case", ["plain", "valid_and_ignore", "no_gt"])
def test_max_iou_assigner_is_sync_free(device, kind, case):
    device = torch.device(device)
    generator = torch.Generator().manual_seed(7)
    gts = random_boxes(6, generator, min_side=10.0)
    boxes = torch.cat([jitter(gts, 40, 0.15, generator), random_boxes(1500, generator)])
    labels = torch.randint(0, NUM_CLASSES, (6,), generator=generator)
    ignore = valid = None
    if case == "valid_and_ignore":
        ignore = torch.tensor([[0.0, 0.0, 50.0, 40.0], [120.0, 90.0, 160.0, 128.0]])
        valid = torch.rand(boxes.shape[0], generator=generator) > 0.2
    if case == "no_gt":
        gts, labels = gts[:0], labels[:0]
    assigner = MaxIoUAssigner(**ASSIGNERS[kind])
    on = lambda t: None if t is None else t.to(device)  # noqa: E731
    inputs = (on(boxes), on(gts), on(labels), on(ignore))
    assigner.assign(*inputs, validate=False, valid=on(valid))  # warm-up
    with no_host_sync(device):
        result = assigner.assign(*inputs, validate=False, valid=on(valid))

    # The reference reads the IoUs the device computes (bit-identical to the assigner's own).
    overlaps = box_iou(inputs[1], inputs[0]).cpu() if gts.shape[0] else torch.zeros(0, boxes.shape[0])
    iof = box_iof(inputs[0], inputs[3]).cpu() if ignore is not None else None
    if gts.shape[0]:
        masked = overlaps if valid is None else torch.where(valid[None, :], overlaps, torch.full_like(overlaps, -1.0))
        top = masked.max(dim=0).values
        assert ((masked == top).sum(dim=0) == 1)[top >= ASSIGNERS[kind]["pos_iou_thr"]].all(), "no ties between gts"
    gt_inds, max_overlaps, expected_labels = assign_reference(overlaps, iof, valid, labels, ASSIGNERS[kind])
    assert result.gt_inds.device.type == device.type
    assert torch.equal(result.gt_inds.cpu(), gt_inds)
    assert torch.equal(result.max_overlaps.cpu(), max_overlaps)
    assert torch.equal(result.labels.cpu(), expected_labels)
    if case == "plain":
        assert int((gt_inds > 0).sum()) > 0 and int((gt_inds == 0).sum()) > 0  # both kinds present


@pytest.mark.parametrize("device", DEVICES)
def test_assigner_validation_is_the_documented_host_sync(device):
    """``validate=True`` reads a flag back (documented); the detectors pass ``validate=False``."""
    device = torch.device(device)
    assigner = MaxIoUAssigner(**ASSIGNERS["rcnn"])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]], device=device)
    bad_labels = torch.tensor([-1], device=device)
    with pytest.raises(ValueError, match="non-negative"):
        assigner.assign(boxes, boxes, bad_labels, validate=True)
    if device.type == "cuda":
        with no_host_sync(device), pytest.raises(RuntimeError) as caught:
            assigner.assign(boxes, boxes, bad_labels.abs(), validate=True)
        assert is_sync_error(caught.value)


# ----------------------------------------------------------------------------- RPN training loss
def rpn_loss_reference(rpn: RegionProposalNetwork, features, targets) -> tuple[torch.Tensor, torch.Tensor]:
    """The RPN loss of every assigned anchor (exhaustive sampling) with boolean indexing, on the CPU."""
    objectness, deltas = rpn.head(features)
    batch = features[0].shape[0]
    logits = torch.cat([o.permute(0, 2, 3, 1).reshape(batch, -1) for o in objectness], dim=1)
    box_deltas = torch.cat([d.permute(0, 2, 3, 1).reshape(batch, -1, 4) for d in deltas], dim=1)
    feature_sizes = [tuple(f.shape[-2:]) for f in features]
    anchors = torch.cat(rpn.anchor_generator(feature_sizes, device="cpu"))
    valid = rpn.anchor_generator.valid_flags(feature_sizes, IMAGE_SIZES, device="cpu")
    cls_sum, box_sum, count = 0.0, 0.0, 0
    for index, target in enumerate(targets):
        assignment = rpn.assigner.assign(
            anchors, target["boxes"], target["labels"], target.get("ignore_boxes"), validate=False, valid=valid[index]
        )
        positive, negative = assignment.gt_inds > 0, assignment.gt_inds == 0
        counted = positive | negative
        cls_sum = cls_sum + F.binary_cross_entropy_with_logits(
            logits[index][counted], positive[counted].float(), reduction="sum"
        )
        if positive.any():
            matched = target["boxes"][assignment.gt_inds[positive] - 1]
            box_sum = box_sum + (box_deltas[index][positive] - rpn.box_coder.encode(anchors[positive], matched)).abs().sum()
        count += max(int(positive.sum()), 1) + max(int(negative.sum()), 1)
    return cls_sum / count, box_sum / count


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sampling", ["exhaustive", "libra"])
def test_rpn_training_loss_is_sync_free(device, sampling, monkeypatch):
    """The RPN's training forward without its proposals (whose NMS syncs, below), then backward."""
    device = torch.device(device)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    if sampling == "exhaustive":  # every assigned anchor is sampled: the loss is deterministic
        settings = dict(batch_size=10**6, positive_fraction=1.0, neg_pos_ub=-1)
    else:  # Libra R-CNN's RPN: 256 anchors, half positive at most, negatives <= 5 x positives
        settings = dict(batch_size=256, positive_fraction=0.5, neg_pos_ub=5)
    rpn = RegionProposalNetwork(in_channels=16, ignore_iof_thr=0.5, **settings).train()
    features_cpu, targets_cpu = fpn_features(16, generator), batch_targets(generator)
    reference = copy.deepcopy(rpn)
    rpn = rpn.to(device)
    features = [f.to(device) for f in features_cpu]
    targets = [to_device(t, device) for t in targets_cpu]

    total_loss(rpn.loss(features, IMAGE_SIZES, targets)).backward()  # warm-up
    rpn.zero_grad(set_to_none=True)
    with no_host_sync(device):
        losses = rpn.loss(features, IMAGE_SIZES, targets)
        total_loss(losses).backward()

    assert set(losses) == {"loss_rpn_cls", "loss_rpn_bbox"}
    grads = [p.grad for p in rpn.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    if sampling == "exhaustive":
        expected_cls, expected_box = rpn_loss_reference(reference, features_cpu, targets_cpu)
        assert_close(losses["loss_rpn_cls"], expected_cls, device)
        assert_close(losses["loss_rpn_bbox"], expected_box, device)
        assert float(expected_box.detach()) > 0
    else:
        assert all(torch.isfinite(v).item() and v.item() > 0 for v in losses.values())


@pytest.mark.parametrize("device", DEVICES)
def test_rpn_training_forward_syncs_only_in_nms(device):
    """With the proposals, the RPN's training forward syncs in NMS only (the kept count is a shape)."""
    device = torch.device(device)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(2)
    rpn = RegionProposalNetwork(in_channels=16, pre_nms_top_n_train=300, post_nms_top_n_train=200).train().to(device)
    features = [f.to(device) for f in fpn_features(16, generator)]
    targets = [to_device(t, device) for t in batch_targets(generator)]
    rpn.loss_and_predict(features, IMAGE_SIZES, targets)  # warm-up
    recorder = SyncRecorder(device)
    with recorder:
        losses, proposals = rpn.loss_and_predict(features, IMAGE_SIZES, targets)
    assert recorder.files() <= {"libra/ops/nms.py", "libra/ops/nms_reference.py"}, recorder.sites()
    if recorder.available:
        assert recorder.events, "the NMS output size is a host sync: the recorder must see it"
    # Logic: fixed-size proposals, valid ones inside their image, sorted by score.
    assert proposals.boxes.shape == (2, 200, 4) and proposals.valid.dtype == torch.bool
    for index, (height, width) in enumerate(IMAGE_SIZES):
        boxes, scores = proposals.per_image(index)
        assert boxes.shape[0] > 0 and (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
        assert (scores[:-1] >= scores[1:]).all()
    assert all(torch.isfinite(v).all() for v in losses.values())


@pytest.mark.parametrize("device", DEVICES)
def test_standalone_rpn_training_step_is_sync_free(device):
    """``ProposalNetwork`` (``rpn_r50_fpn``) in training computes no proposals: backbone, neck, RPN loss
    and backward without a sync (target validation off)."""
    if "rpn_r50_fpn" not in available_presets():
        pytest.skip("no rpn_r50_fpn preset")
    device = torch.device(device)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(9)
    model = build_model("rpn_r50_fpn", NUM_CLASSES, backbone=TinyBackbone(), fpn_channels=16, ignore_iof_thr=0.5)
    model = model.train().to(device)
    model.validate_targets = False
    images = torch.randn(2, 3, *BATCH_SHAPE, generator=generator).to(device)
    targets = [to_device(t, device) for t in batch_targets(generator)]
    total_loss(model(images, IMAGE_SIZES, targets)).backward()  # warm-up
    model.zero_grad(set_to_none=True)
    with no_host_sync(device):
        losses = model(images, IMAGE_SIZES, targets)
        total_loss(losses).backward()
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_bbox"}
    assert all(torch.isfinite(v).item() and v.item() > 0 for v in losses.values())
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


# ----------------------------------------------------------------------------- RoI head
def tiny_detector(preset: str, **overrides):
    settings = dict(backbone=TinyBackbone(), fpn_channels=16, fc_channels=32, rpn_pre_nms_top_n_train=300,
                    rpn_post_nms_top_n_train=200, ignore_iof_thr=0.5)
    settings.update(overrides)
    return build_model(preset, NUM_CLASSES, **settings)


SENTINEL = torch.tensor([1000.0, 1000.0, 1010.0, 1010.0])  # far from every gt; marks proposal slots that are not real


def make_proposals(num: int, targets: list[dict], generator: torch.Generator) -> Proposals:
    boxes, valid = [], []
    for target in targets:
        near = jitter(target["boxes"], 8, 0.1, generator)
        image = torch.cat([near, random_boxes(num - near.shape[0], generator)])
        keep = torch.rand(num, generator=generator) > 0.2
        keep[: near.shape[0]] = True
        boxes.append(torch.where(keep[:, None], image, SENTINEL))
        valid.append(keep)
    boxes = torch.stack(boxes)
    return Proposals(boxes, torch.rand(boxes.shape[:2], generator=generator), torch.stack(valid))


def move_proposals(proposals: Proposals, device: torch.device) -> Proposals:
    return Proposals(proposals.boxes.to(device), proposals.scores.to(device), proposals.valid.to(device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("preset", ["libra_faster_rcnn_r50_fpn", "faster_rcnn_r50_fpn"])
@pytest.mark.parametrize("num_proposals", [300, 1000])
def test_roi_head_sample_is_sync_free(device, preset, num_proposals):
    """``RoIHead.sample``: assignment + IoU-balanced / random sampling + fixed slots + targets."""
    device = torch.device(device)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(3)
    roi_head = tiny_detector(preset).roi_head.to(device)
    targets_cpu = batch_targets(generator)
    proposals_cpu = make_proposals(num_proposals, targets_cpu, generator)
    proposals, targets = move_proposals(proposals_cpu, device), [to_device(t, device) for t in targets_cpu]
    roi_head.sample(proposals, targets)  # warm-up
    with no_host_sync(device):
        samples = roi_head.sample(proposals, targets)

    rois, labels, matched = samples.rois.cpu(), samples.labels.cpu(), samples.matched_gt.cpu()
    sampled, positive, box_targets = samples.sampled.cpu().bool(), samples.positive.cpu().bool(), samples.box_targets.cpu()
    slots = roi_head.batch_size
    max_positives = int(slots * roi_head.positive_fraction)
    for index, target in enumerate(targets_cpu):
        gts = target["boxes"]
        rows = rois[:, 0] == index
        assert int(rows.sum()) == min(slots, gts.shape[0] + num_proposals)
        mine, mine_sampled, mine_positive = rois[rows, 1:], sampled[rows], positive[rows]
        assert not (mine[mine_sampled] == SENTINEL).all(dim=1).any(), "a slot without a proposal was sampled"
        # Independent assignment on the CPU: gts and valid proposals, IoU >= 0.5 positive, else negative
        # unless mostly inside the ignore box.
        candidates = torch.cat([gts, proposals_cpu.boxes[index][proposals_cpu.valid[index]]])
        best = box_iou(gts, candidates).max(dim=0).values if gts.shape[0] else torch.zeros(candidates.shape[0])
        best[: gts.shape[0]] = 1.0
        is_positive = best >= 0.5
        ignored = torch.zeros_like(is_positive)
        if "ignore_boxes" in target:
            ignored = box_iof(candidates, target["ignore_boxes"]).max(dim=1).values > 0.5
        num_pos, num_neg = int(is_positive.sum()), int((~is_positive & ~ignored).sum())
        assert num_pos <= max_positives
        assert int(mine_positive.sum()) == num_pos
        assert int((mine_sampled & ~mine_positive).sum()) == min(num_neg, slots - num_pos)
        for gt in gts:  # every gt is among its own positives
            assert ((mine[mine_positive] - gt).abs().amax(dim=1) == 0).any()
        if gts.shape[0]:
            pos_iou = box_iou(mine[mine_positive], gts)
            assert (pos_iou.gather(1, matched[rows][mine_positive][:, None]).squeeze(1) >= 0.5).all()
            assert torch.equal(labels[rows][mine_positive], target["labels"][matched[rows][mine_positive]])
            encoded = roi_head.box_coder.encode(mine[mine_positive], gts[matched[rows][mine_positive]])
            torch.testing.assert_close(box_targets[rows][mine_positive], encoded, rtol=1e-4, atol=1e-4)
    assert (labels[~positive] == NUM_CLASSES).all() and (matched[~positive] == -1).all()
    assert (box_targets[~positive] == 0).all() and (positive <= sampled).all()


class Precomputed(nn.Module):
    """Stands in for the RoI extractor: returns features pooled beforehand (its level counts sync)."""

    def __init__(self, pooled: torch.Tensor) -> None:
        super().__init__()
        self.pooled = pooled

    def forward(self, features, rois):  # noqa: ARG002
        return self.pooled


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("preset", ["libra_faster_rcnn_r50_fpn", "faster_rcnn_r50_fpn"])
def test_roi_head_loss_after_the_extractor_is_sync_free(device, preset):
    """``RoIHead.loss`` from the pooled features on: box head, losses, accuracy, and the backward pass
    (box head and RoIAlign's backward into the FPN maps)."""
    device = torch.device(device)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(4)
    roi_head = tiny_detector(preset).roi_head.to(device)
    targets = [to_device(t, device) for t in batch_targets(generator)]
    proposals = move_proposals(make_proposals(300, batch_targets(torch.Generator().manual_seed(4)), generator), device)
    features = [f.to(device).requires_grad_() for f in fpn_features(16, generator)]
    samples = roi_head.sample(proposals, targets)
    pooled = roi_head.roi_extractor(features, samples.rois)  # the documented sync: RoIs per level
    extractor, roi_head.roi_extractor = roi_head.roi_extractor, Precomputed(pooled)
    total_loss(roi_head.loss(features, samples)).backward(retain_graph=True)  # warm-up
    roi_head.zero_grad(set_to_none=True)
    for feature in features:
        feature.grad = None
    with no_host_sync(device):
        losses = roi_head.loss(features, samples)
        total_loss(losses).backward()
    grads = [f.grad for f in features if f.grad is not None]  # levels that pooled some RoI
    assert grads and all(torch.isfinite(g).all() for g in grads) and float(sum(g.abs().sum() for g in grads)) > 0

    # The same losses with boolean indexing, on the CPU.
    roi_head.roi_extractor = extractor
    head = copy.deepcopy(roi_head).cpu()
    cls_logits, box_deltas = head.box_head(pooled.detach().cpu())
    labels, sampled, positive = samples.labels.cpu(), samples.sampled.cpu().bool(), samples.positive.cpu().bool()
    num_sampled = samples.sampled.cpu().sum().clamp(min=1.0)
    expected_cls = head.cls_loss(cls_logits[sampled], labels[sampled], None, num_sampled)
    pos_deltas = box_deltas.view(-1, NUM_CLASSES, 4)[positive, labels[positive]]
    expected_box = head.box_loss(pos_deltas, samples.box_targets.cpu()[positive], None, num_sampled)
    expected_acc = (cls_logits.argmax(dim=1)[sampled] == labels[sampled]).float().sum() / num_sampled * 100
    assert int(positive.sum()) > 0
    assert_close(losses["loss_cls"], expected_cls, device)
    assert_close(losses["loss_bbox"], expected_box, device)
    assert_close(losses["acc"], expected_acc, device)


@pytest.mark.parametrize("device", DEVICES)
def test_roi_head_training_forward_syncs_only_in_the_extractor(device):
    device = torch.device(device)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(5)
    roi_head = tiny_detector("libra_faster_rcnn_r50_fpn").roi_head.to(device)
    targets_cpu = batch_targets(generator)
    proposals = move_proposals(make_proposals(300, targets_cpu, generator), device)
    targets = [to_device(t, device) for t in targets_cpu]
    features = [f.to(device) for f in fpn_features(16, generator)]
    roi_head.loss(features, roi_head.sample(proposals, targets))  # warm-up
    recorder = SyncRecorder(device)
    with recorder:
        losses = roi_head.loss(features, roi_head.sample(proposals, targets))
    assert recorder.files() <= {"libra/roi_heads/roi_extractor.py"}, recorder.sites()
    if recorder.available:
        assert recorder.events, "the RoIs per level are read back: the recorder must see it"
    assert set(losses) == {"loss_cls", "loss_bbox", "acc"} and all(torch.isfinite(v) for v in losses.values())


# ----------------------------------------------------------------------------- RetinaNet
def retinanet_loss_reference(model, images, targets) -> tuple[torch.Tensor, torch.Tensor]:
    """RetinaNet's loss with boolean indexing on the CPU: focal loss over every counted anchor and
    class, box loss over the positives, both divided by sum_i max(#positives_i, 1)."""
    dense = model.dense_head
    features = model.neck(model.backbone(images))
    cls_logits, deltas = dense.head(features)
    batch, num_classes = images.shape[0], dense.num_classes
    logits = torch.cat([c.permute(0, 2, 3, 1).reshape(batch, -1, num_classes) for c in cls_logits], dim=1)
    box_deltas = torch.cat([d.permute(0, 2, 3, 1).reshape(batch, -1, 4) for d in deltas], dim=1)
    feature_sizes = [tuple(f.shape[-2:]) for f in features]
    anchors = torch.cat(dense.anchor_generator(feature_sizes, device="cpu"))
    valid = dense.anchor_generator.valid_flags(feature_sizes, IMAGE_SIZES, device="cpu")
    focal = dense.cls_loss
    cls_sum, preds, goals, count = 0.0, [], [], 0
    for index, target in enumerate(targets):
        assignment = dense.assigner.assign(
            anchors, target["boxes"], target["labels"], target.get("ignore_boxes"), validate=False, valid=valid[index]
        )
        positive, counted = assignment.gt_inds > 0, assignment.gt_inds >= 0
        one_hot = torch.zeros(anchors.shape[0], num_classes)
        one_hot[positive, assignment.labels[positive]] = 1.0
        cls_sum = cls_sum + sigmoid_focal_loss(logits[index][counted], one_hot[counted], focal.alpha, focal.gamma).sum()
        preds.append(box_deltas[index][positive])
        goals.append(dense.box_coder.encode(anchors[positive], target["boxes"][assignment.gt_inds[positive] - 1]))
        count += max(int(positive.sum()), 1)
    loss_cls = focal.loss_weight * cls_sum / count
    return loss_cls, dense.box_loss(torch.cat(preds), torch.cat(goals), None, torch.tensor(float(count)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("preset", ["libra_retinanet_r50_fpn", "retinanet_r50_fpn"])
def test_retinanet_training_step_is_sync_free(device, preset):
    """Backbone, neck, dense head, focal + box loss and backward, with target validation off."""
    device = torch.device(device)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(6)
    model = build_model(preset, NUM_CLASSES, backbone=TinyBackbone(), fpn_channels=16, head_channels=16,
                        ignore_iof_thr=0.5).train()
    model.validate_targets = False  # the one documented sync per batch (ground-truth checks)
    images_cpu = torch.randn(2, 3, *BATCH_SHAPE, generator=generator)
    images_cpu[1, :, IMAGE_SIZES[1][0]:, :] = 0
    images_cpu[1, :, :, IMAGE_SIZES[1][1]:] = 0
    targets_cpu = batch_targets(generator)
    reference = copy.deepcopy(model)
    model = model.to(device)
    images, targets = images_cpu.to(device), [to_device(t, device) for t in targets_cpu]
    total_loss(model(images, IMAGE_SIZES, targets)).backward()  # warm-up
    model.zero_grad(set_to_none=True)
    with no_host_sync(device):
        losses = model(images, IMAGE_SIZES, targets)
        total_loss(losses).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)

    expected_cls, expected_box = retinanet_loss_reference(reference, images_cpu, targets_cpu)
    assert float(expected_box.detach()) > 0
    assert_close(losses["loss_cls"], expected_cls, device)
    assert_close(losses["loss_bbox"], expected_box, device)


# ----------------------------------------------------------------------------- a whole two-stage step
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("validate_targets", [False, True])
def test_faster_rcnn_training_step_syncs_only_where_documented(device, validate_targets):
    """Libra R-CNN's training forward syncs in NMS and the RoI extractor (and, with target validation,
    once in the detector's check); its backward pass does not sync at all."""
    device = torch.device(device)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(8)
    model = tiny_detector("libra_faster_rcnn_r50_fpn").train().to(device)
    model.validate_targets = validate_targets
    images = torch.randn(2, 3, *BATCH_SHAPE, generator=generator).to(device)
    targets = [to_device(t, device) for t in batch_targets(generator)]
    total_loss(model(images, IMAGE_SIZES, targets)).backward()  # warm-up
    model.zero_grad(set_to_none=True)
    recorder = SyncRecorder(device)
    with recorder:
        losses = model(images, IMAGE_SIZES, targets)
    with no_host_sync(device):
        total_loss(losses).backward()
    allowed = {"libra/ops/nms.py", "libra/ops/nms_reference.py", "libra/roi_heads/roi_extractor.py"}
    if validate_targets:
        allowed.add("libra/detectors/base.py")
    assert recorder.files() <= allowed, recorder.sites()
    if recorder.available:
        validation = [e for e in recorder.events if e.site.startswith("libra/detectors/base.py")]
        assert len(validation) == (1 if validate_targets else 0), recorder.sites()
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "acc"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
