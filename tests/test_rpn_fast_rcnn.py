"""The standalone RPN / Libra RPN, proposal files, and Fast R-CNN on pre-computed proposals.

Paper Table 2 (proposal model) and the ablation protocol of Sec. 4.1.4 (the R-CNN stage trained
and tested on the same saved proposals).
"""
from __future__ import annotations

import math

import pytest
import torch
from conftest import TinyBackbone
from libra.boxes import box_iou
from libra.data.base import DataError
from libra.data.proposals import ProposalSet, load_proposals, save_proposals, top_proposals
from libra.detectors import FastRCNN, ProposalNetwork, pad_proposals
from libra.structures import Batch
from libra.losses import BalancedL1Loss, L1Loss
from libra.necks import BalancedFeaturePyramid
from libra.presets import PRESETS, TABLE3_ABLATION, build_model, preset_config

pytestmark = pytest.mark.usefixtures("single_thread")

NUM_CLASSES = 3


# The sampler module class each preset name builds (libra.presets.POS_SAMPLERS / NEG_SAMPLERS).
SAMPLER_CLASSES = {"random": "RandomSampler", "instance_balanced": "InstanceBalancedPosSampler",
                   "class_balanced": "ClassBalancedPosSampler", "iou_balanced": "IoUBalancedNegSampler"}


def tiny(preset: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    extra = {"fc_channels": 64, "roi_batch_size": 64} if PRESETS[preset]["detector"] != "rpn" else {}
    return build_model(preset, NUM_CLASSES, backbone=TinyBackbone((16, 16, 32, 32)), fpn_channels=32, **{**extra, **overrides})


def one_image():
    """A 96 x 128 image with two boxes, and its target."""
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, 96, 128, generator=generator)
    boxes = torch.tensor([[10.0, 12.0, 50.0, 60.0], [60.0, 20.0, 120.0, 90.0]])
    for x1, y1, x2, y2 in boxes.long().tolist():  # make the objects visible
        image[0, :, y1:y2, x1:x2] += 2.0
    return image, [{"boxes": boxes, "labels": torch.tensor([0, 2])}]


# ------------------------------------------------------------------------------ presets
def test_rpn_presets_have_the_standalone_test_settings():
    for name in ("rpn_r50_fpn", "libra_rpn_r50_fpn"):
        config = preset_config(name)
        assert config["detector"] == "rpn"
        assert not any(key.startswith(("roi_", "box_")) or key in ("sampler", "cls_loss") for key in config), name
        model = tiny(name)
        assert isinstance(model, ProposalNetwork) and model.iou_types == ("proposal",)
        # rpn_r50_fpn_1x_coco test_cfg.rpn: nms_pre=2000 per level, max_per_img=1000, nms 0.7
        assert model.rpn.pre_nms_top_n["test"] == 2000
        assert model.rpn.post_nms_top_n["test"] == 1000
        assert model.rpn.nms_thr == 0.7
        assert not hasattr(model, "roi_head")


def test_libra_rpn_is_bfp_balanced_l1_and_capped_negatives():
    plain, libra = tiny("rpn_r50_fpn"), tiny("libra_rpn_r50_fpn")
    assert len(plain.neck) == 1 and isinstance(plain.rpn.box_loss, L1Loss) and plain.rpn.neg_pos_ub == -1
    assert len(libra.neck) == 2 and isinstance(libra.neck[1], BalancedFeaturePyramid)
    assert libra.neck[1].refine_level == 2
    assert isinstance(libra.rpn.box_loss, BalancedL1Loss)
    assert (libra.rpn.box_loss.alpha, libra.rpn.box_loss.gamma, libra.rpn.box_loss.beta) == (0.5, 1.5, 0.11)
    assert libra.rpn.neg_pos_ub == 5
    # rpn_box_loss_alpha / _gamma reach the RPN's loss
    tuned = tiny("libra_rpn_r50_fpn", rpn_box_loss_alpha=0.3, rpn_box_loss_gamma=1.0)
    assert (tuned.rpn.box_loss.alpha, tuned.rpn.box_loss.gamma) == (0.3, 1.0)


def test_fast_rcnn_presets_have_no_rpn_and_the_libra_components():
    for name in ("fast_rcnn_r50_fpn", "libra_fast_rcnn_r50_fpn"):
        config = preset_config(name)
        assert config["detector"] == "fast_rcnn"
        assert not any(key.startswith("rpn_") for key in config), name
        assert isinstance(tiny(name), FastRCNN)
    plain, libra = tiny("fast_rcnn_r50_fpn"), tiny("libra_fast_rcnn_r50_fpn")
    assert len(plain.neck) == 1 and type(plain.roi_head.neg_sampler).__name__ == SAMPLER_CLASSES["random"] and isinstance(plain.roi_head.box_loss, L1Loss)
    assert len(libra.neck) == 2 and type(libra.roi_head.neg_sampler).__name__ == SAMPLER_CLASSES["iou_balanced"]
    assert type(libra.roi_head.pos_sampler).__name__ == SAMPLER_CLASSES["instance_balanced"] and isinstance(libra.roi_head.box_loss, BalancedL1Loss)
    with pytest.raises(ValueError, match="unknown key"):
        preset_config("fast_rcnn_r50_fpn", rpn_batch_size=128)
    with pytest.raises(ValueError, match="cannot override"):
        preset_config("rpn_r50_fpn", detector="faster_rcnn")


def test_table3_rows_train_as_fast_rcnn_on_given_proposals():
    """Table 3 is the Fast R-CNN protocol: every row is a valid override set of fast_rcnn_r50_fpn."""
    images, targets = one_image()
    proposals = [jittered(targets[0]["boxes"], 40, seed=1)]
    for _, overrides in TABLE3_ABLATION:
        model = tiny("fast_rcnn_r50_fpn", **overrides)
        losses = model(images, [(96, 128)], targets, proposals=proposals)
        assert set(losses) == {"loss_cls", "loss_bbox", "acc"}
        assert all(torch.isfinite(v) for v in losses.values())


# ------------------------------------------------------------------------------ RPN model
def test_proposal_network_outputs_sorted_proposals_in_original_coordinates():
    model = tiny("rpn_r50_fpn").eval()
    images, _ = one_image()
    with torch.no_grad():
        resized = model(images, [(96, 128)])[0]
        original = model(images, [(96, 128)], original_sizes=[(192, 256)])[0]
    assert set(resized) == {"proposals", "proposal_scores"}
    scores = resized["proposal_scores"]
    assert 0 < scores.numel() <= 1000
    assert torch.all(scores[:-1] >= scores[1:])
    boxes = resized["proposals"]
    assert boxes[:, 0].min() >= 0 and boxes[:, 2].max() <= 128 and boxes[:, 3].max() <= 96
    torch.testing.assert_close(original["proposals"], boxes * 2)
    torch.testing.assert_close(model.predict_proposals(Batch(images, [(96, 128)]))[0]["proposals"], boxes)


def test_standalone_rpn_training_computes_no_proposals(monkeypatch):
    model = tiny("rpn_r50_fpn")

    def fail(*args, **kwargs):
        raise AssertionError("proposals computed in standalone RPN training")

    monkeypatch.setattr(model.rpn, "predict_by_feat", fail)
    images, targets = one_image()
    losses = model(images, [(96, 128)], targets)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_bbox"}
    sum(losses.values()).backward()
    assert model.rpn.head.rpn_cls.weight.grad is not None


@pytest.mark.parametrize("preset", ["rpn_r50_fpn", "libra_rpn_r50_fpn"])
def test_rpn_overfits_one_image(preset):
    """After 150 steps on one image, a top-10 proposal covers each gt at IoU > 0.7."""
    model = tiny(preset)
    images, targets = one_image()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    first = None
    for _ in range(150):
        losses = model(images, [(96, 128)], targets)
        total = sum(losses.values())
        first = first if first is not None else float(total.detach())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    assert float(total.detach()) < 0.3 * first
    model.eval()
    with torch.no_grad():
        top = model(images, [(96, 128)])[0]["proposals"][:10]
    best = box_iou(targets[0]["boxes"], top).max(dim=1).values
    assert torch.all(best > 0.7), best


# ------------------------------------------------------------------------------ Fast R-CNN
def jittered(boxes: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """``count`` proposals around ``boxes`` (shifted by up to 20 % of their size) plus the boxes."""
    generator = torch.Generator().manual_seed(seed)
    picks = boxes[torch.randint(0, boxes.shape[0], (count,), generator=generator)]
    size = (picks[:, 2:] - picks[:, :2]).repeat(1, 2)
    noisy = picks + (torch.rand((count, 4), generator=generator) - 0.5) * 0.4 * size
    return torch.cat([boxes, noisy])


def test_pad_proposals_pads_clips_and_marks_invalid_slots():
    sizes = [(50, 60), (40, 40)]
    first = torch.tensor([[-5.0, 2.0, 70.0, 30.0], [10.0, 10.0, 20.0, 20.0], [65.0, 0.0, 80.0, 10.0]])
    batch = pad_proposals([first, torch.zeros((0, 4))], sizes, torch.device("cpu"))
    assert batch.boxes.shape == (2, 3, 4)
    assert batch.valid.tolist() == [[True, True, False], [False, False, False]]  # [65, 80] clips to empty
    torch.testing.assert_close(batch.boxes[0, 0], torch.tensor([0.0, 2.0, 60.0, 30.0]))
    assert pad_proposals([torch.zeros((0, 4))], sizes[:1], torch.device("cpu")).boxes.shape == (1, 1, 4)
    with pytest.raises(ValueError, match="needs proposals"):
        pad_proposals(None, sizes, torch.device("cpu"))
    with pytest.raises(ValueError, match="for 1 images in a batch of 2"):
        pad_proposals([first], sizes, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"proposals\[1\] must be a float \[P, 4\]"):
        pad_proposals([first, torch.zeros((3, 5))], sizes, torch.device("cpu"))


def test_fast_rcnn_overfits_one_image_from_given_proposals():
    model = tiny("libra_fast_rcnn_r50_fpn")
    images, targets = one_image()
    proposals = [jittered(targets[0]["boxes"], 60, seed=3)]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(120):
        losses = model(images, [(96, 128)], targets, proposals=proposals)
        optimizer.zero_grad()
        sum(v for k, v in losses.items() if k.startswith("loss")).backward()
        optimizer.step()
    assert float(losses["acc"]) > 90.0  # percent
    model.eval()
    with torch.no_grad():
        detections = model(images, [(96, 128)], proposals=proposals, original_sizes=[(96, 128)])[0]
    for box, label in zip(targets[0]["boxes"], targets[0]["labels"]):
        hits = (detections["labels"] == label) & (box_iou(box[None], detections["boxes"])[0] > 0.7)
        assert bool(hits.any()), (box, detections)
    with pytest.raises(ValueError, match="needs proposals"):
        model(images, [(96, 128)])


# ------------------------------------------------------------------------------ proposal files
def example_set(meta=None) -> ProposalSet:
    generator = torch.Generator().manual_seed(0)
    per_image = {
        7: (torch.rand((5, 4), generator=generator) * 50, torch.rand(5, generator=generator)),
        3: (torch.zeros((0, 4)), torch.zeros(0)),
        11: (torch.rand((3, 4), generator=generator) * 50, torch.tensor([0.1, 0.9, 0.5])),
    }
    return ProposalSet.from_images(per_image, max_per_image=4, meta=meta or {"dataset": "synthetic", "split": "val"})


def test_proposal_set_sorts_cuts_and_indexes():
    proposals = example_set()
    assert proposals.image_ids.tolist() == [3, 7, 11] and proposals.counts.tolist() == [0, 4, 3]
    boxes, scores = proposals.get(11)
    assert scores.tolist() == pytest.approx([0.9, 0.5, 0.1])
    assert proposals.get(3)[0].shape == (0, 4)
    assert 7 in proposals and 8 not in proposals
    assert proposals.meta["max_per_image"] == 4 and proposals.meta["num_images"] == 3
    outputs = [{"boxes": torch.arange(12.0).view(3, 4), "scores": torch.tensor([0.2, 0.7, 0.4])}]
    (boxes, scores), = top_proposals(outputs, 2)
    assert scores.tolist() == pytest.approx([0.7, 0.4]) and boxes[0].tolist() == [4.0, 5.0, 6.0, 7.0]


def test_proposal_file_round_trip_is_exact_and_atomic(tmp_path):
    proposals = example_set()
    path = tmp_path / "p.pt"
    save_proposals(proposals, path)
    first = path.read_bytes()
    loaded = load_proposals(path)
    for name in ("image_ids", "counts", "boxes", "scores"):
        assert torch.equal(getattr(loaded, name), getattr(proposals, name)), name
    assert loaded.meta == proposals.meta
    save_proposals(load_proposals(path), path)  # a re-run over the file: same bytes, no temporary left
    assert path.read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.pt"]
    # plain torch.load with weights_only reads it (the documented format)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "libra-proposals" and raw["version"] == 1


def test_bad_proposal_files_give_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="proposals file not found.*--save-proposals"):
        load_proposals(tmp_path / "missing.pt")
    good = tmp_path / "good.pt"
    save_proposals(example_set(), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(DataError, match="cannot read proposals file"):
        load_proposals(truncated)
    other = tmp_path / "other.pt"
    torch.save({"boxes": torch.zeros(2, 4)}, other)
    with pytest.raises(DataError, match="is not a libra proposals file"):
        load_proposals(other)
    damaged = tmp_path / "damaged.pt"
    data = example_set().to_dict()
    data["counts"] = data["counts"] + 1
    torch.save(data, damaged)
    with pytest.raises(DataError, match="is damaged"):
        load_proposals(damaged)
    data = example_set().to_dict()
    data["boxes"][0, 0] = math.nan
    torch.save(data, damaged)
    with pytest.raises(DataError, match="non-finite"):
        load_proposals(damaged)


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    from libra.data.synthetic import ensure_synthetic_dataset

    root = tmp_path_factory.mktemp("proposals_data") / "data"
    ensure_synthetic_dataset(root, num_train=4, num_val=2, image_size=(64, 64))
    return root


def test_dataset_resizes_and_flips_proposals_with_the_boxes(synthetic_root):
    from libra.data import build_dataset

    dataset = build_dataset("synthetic", synthetic_root, "train", train=True, min_size=96, max_size=96,
                            synthetic_kwargs=dict(num_train=4, num_val=2, image_size=(64, 64)))
    # the proposals of each image are its gt boxes (original coordinates) with decreasing scores
    per_image = {r.image_id: (torch.from_numpy(r.boxes), torch.linspace(1, 0.5, len(r.boxes))) for r in dataset.records}
    dataset.attach_proposals(ProposalSet.from_images(per_image, meta={"dataset": "synthetic", "split": "train"}),
                             "p.pt", "synthetic", "train")
    flips = set()
    for epoch in range(4):
        for index in range(len(dataset)):
            _, target = dataset[(index, epoch)]
            flips.add(target["flip"])
            torch.testing.assert_close(target["proposals"], target["boxes"])
            assert target["proposal_scores"].shape == (target["boxes"].shape[0],)
    assert flips == {True, False}
    with pytest.raises(DataError, match="written for the val split of synthetic, not the train split"):
        dataset.attach_proposals(ProposalSet.from_images(per_image, meta={"dataset": "synthetic", "split": "val"}),
                                 "p.pt", "synthetic", "train")
    first = dataset.records[0].image_id
    partial = {k: v for k, v in per_image.items() if k != first}
    with pytest.raises(DataError, match=rf"no proposals for 1 image\(s\).*image id {first}.*--split train --save-proposals"):
        dataset.attach_proposals(ProposalSet.from_images(partial), "p.pt", "synthetic", "train")
