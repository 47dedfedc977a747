"""The Fast R-CNN protocol from the command line, as the README runs it (tiny data, in-process):

    train.py --model rpn_r50_fpn                                  # the proposal model
    eval.py --checkpoint rpn.pth --split train --save-proposals   # its proposals, per split
    eval.py --checkpoint rpn.pth --save-proposals
    train.py --model fast_rcnn_r50_fpn --proposals-file train.pt --val-proposals-file val.pt
    eval.py --checkpoint fast.pth                                 # proposals named by the checkpoint
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import eval as eval_script  # noqa: E402
import train  # noqa: E402

TINY = [
    "--synthetic-image-size", "64", "--min-size", "64", "--max-size", "64", "--synthetic-num-train", "8",
    "--synthetic-num-val", "4", "--width-per-group", "8", "--stage-blocks", "1", "1", "1", "1",
    "--set", "fpn_channels=32", "--workers", "0", "--threads", "1", "--log-interval", "1", "--warmup-iters", "2",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The whole protocol once; returns the work folder."""
    root = tmp_path_factory.mktemp("protocol")
    data = ["--data-root", str(root / "data")]
    assert train.main(["--model", "rpn_r50_fpn", *TINY, *data, "--epochs", "1", "--work-dir", str(root / "rpn")]) == 0
    rpn = root / "rpn" / "epoch_1.pth"
    for split in ("train", "val"):
        assert eval_script.main(["--checkpoint", str(rpn), "--split", split, "--save-proposals", str(root / f"{split}.pt"),
                                 "--threads", "1", "--workers", "0"]) == 0
    fast = [
        "--model", "fast_rcnn_r50_fpn", *TINY, *data, "--set", "fc_channels=64", "--set", "roi_batch_size=32",
        "--proposals-file", str(root / "train.pt"), "--val-proposals-file", str(root / "val.pt"),
    ]
    assert train.main([*fast, "--epochs", "1", "--work-dir", str(root / "fast")]) == 0
    return root


def test_rpn_training_reports_proposal_recall(run):
    metrics = json.loads((run / "rpn" / "metrics.json").read_text())
    assert set(metrics) == {f"AR@{k}{kind}" for k in (100, 300, 1000) for kind in ("", "_mmdet")}
    assert all(0.0 <= value <= 1.0 for value in metrics.values())


def test_saved_proposals_cover_each_split_and_are_ordered(run):
    from libra.data.proposals import load_proposals

    for split, count in (("train", 8), ("val", 4)):
        proposals = load_proposals(run / f"{split}.pt")
        assert len(proposals) == count
        assert proposals.meta["split"] == split and proposals.meta["dataset"] == "synthetic"
        assert proposals.meta["model"] == "rpn_r50_fpn" and proposals.meta["max_per_image"] == 1000
        assert int(proposals.counts.max()) <= 1000 and int(proposals.counts.min()) > 0
        for image_id in proposals.image_ids.tolist():
            boxes, scores = proposals.get(image_id)
            assert torch.all(scores[:-1] >= scores[1:])
            assert boxes[:, 0].min() >= 0 and boxes[:, 2].max() <= 64  # original coordinates of 64 x 64 images


def test_saving_again_gives_the_same_file(run):
    """An interrupted or repeated --save-proposals is simply re-run: same command, same file."""
    from libra.data.proposals import load_proposals

    again = run / "val_again.pt"
    assert eval_script.main(["--checkpoint", str(run / "rpn" / "epoch_1.pth"), "--save-proposals", str(again),
                             "--threads", "1", "--workers", "0"]) == 0
    first, second = load_proposals(run / "val.pt"), load_proposals(again)
    for name in ("image_ids", "counts", "boxes", "scores"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name


def test_fast_rcnn_trains_and_evaluates_from_the_files(run, capsys):
    metrics = json.loads((run / "fast" / "metrics.json").read_text())
    assert {"AP", "AP50", "AP75"} <= set(metrics)
    checkpoint = torch.load(run / "fast" / "epoch_1.pth", map_location="cpu", weights_only=False)
    assert checkpoint["args"]["val_proposals_file"] == str(run / "val.pt")
    # eval.py takes the evaluation split's proposals from the checkpoint
    assert eval_script.main(["--checkpoint", str(run / "fast" / "epoch_1.pth"), "--threads", "1", "--workers", "0",
                             "--work-dir", str(run / "fast_eval")]) == 0
    again = json.loads((run / "fast_eval" / "metrics.json").read_text())
    assert again["AP"] == pytest.approx(metrics["AP"], abs=1e-9)


def _set_flags(overrides: dict) -> list[str]:
    return [item for key, value in overrides.items() for item in ("--set", f"{key}={json.dumps(value)}")]


def test_table3_rows_run_with_the_v1_recipe_of_the_papers_ablations(run, tmp_path):
    """train.py --recipe v1: MMDetection v1's libra_fast_rcnn_r50_fpn_1x (grad clip 35, warmup ratio 1/3,
    RoIAlign sample_num 2, R-CNN low-quality matches) under every Table 3 row; v2 (default) unchanged."""
    from libra.presets import TABLE3_ABLATION, build_model

    files = ["--proposals-file", str(run / "train.pt"), "--val-proposals-file", str(run / "val.pt")]
    for _, overrides in TABLE3_ABLATION:
        for version, expected in (("v1", (35.0, 1 / 3, 2, True)), ("v2", (0.0, 0.001, 0, False))):
            args = train.resolve_args(train.build_parser().parse_args(
                ["--dataset", "coco", "--data-root", "/x", "--model", "fast_rcnn_r50_fpn", "--recipe", version,
                 *files, *_set_flags(overrides)]
            ))
            config = args.model_config
            assert (args.grad_clip, args.warmup_ratio, config["roi_sampling_ratio"], config["roi_match_low_quality"]) \
                == pytest.approx(expected), (version, overrides)
            assert all(config[key] == value for key, value in overrides.items())
            head = build_model("fast_rcnn_r50_fpn", 80, **{**config, "backbone": "resnet50"}).roi_head
            assert head.roi_extractor.sampling_ratio == expected[2] and head.assigner.match_low_quality is expected[3]
    # The last row (LGR-L1 + LGR-CE, IoU-balanced sampling, BFP) trains under v1 on the proposal files.
    work = tmp_path / "v1"
    last = _set_flags(TABLE3_ABLATION[-1][1])
    assert train.main(["--model", "fast_rcnn_r50_fpn", *TINY, "--data-root", str(run / "data"), *files, *last,
                       "--set", "fc_channels=64", "--set", "roi_batch_size=32", "--recipe", "v1", "--max-iters", "2",
                       "--no-eval", "--work-dir", str(work)]) == 0
    records = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "grad_norm" in r]
    assert steps and steps[0]["lr"] == pytest.approx(3e-4 / 3)  # warmup from 1/3 of the synthetic recipe's lr
    checkpoint = torch.load(work / "epoch_1.pth", map_location="cpu", weights_only=False)
    assert checkpoint["model_config"]["roi_sampling_ratio"] == 2 and checkpoint["args"]["grad_clip"] == 35.0
    assert checkpoint["model_config"]["cls_loss"] == "lgr_ce" and checkpoint["args"]["recipe"] == "v1"


def test_proposal_flags_are_checked_before_anything_runs(run, capsys, tmp_path):
    data = ["--data-root", str(run / "data")]
    assert train.main(["--model", "fast_rcnn_r50_fpn", *TINY, *data, "--work-dir", str(tmp_path / "a")]) == 1
    assert "pass --proposals-file FILE" in capsys.readouterr().err
    code = train.main(["--model", "fast_rcnn_r50_fpn", *TINY, *data, "--proposals-file", str(run / "val.pt"),
                       "--val-proposals-file", str(run / "val.pt"), "--work-dir", str(tmp_path / "b")])
    assert code == 1
    assert "written for the val split of synthetic, not the train split" in capsys.readouterr().err
    assert train.main([*TINY, *data, "--proposals-file", str(run / "val.pt"), "--work-dir", str(tmp_path / "c")]) == 1
    assert "read by the Fast R-CNN presets only" in capsys.readouterr().err
    assert eval_script.main(["--checkpoint", str(run / "fast" / "epoch_1.pth"), "--save-proposals", "--threads", "1"]) == 1
    assert "makes no proposals of its own" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_show_draws_the_proposals_of_a_proposal_model(run):
    out = run / "rpn_show"
    assert eval_script.main(["--checkpoint", str(run / "rpn" / "epoch_1.pth"), "--show", "1", "--threads", "1",
                             "--workers", "0", "--work-dir", str(out)]) == 0
    pngs = list((out / "show").glob("*.png"))
    assert len(pngs) == 1 and pngs[0].stat().st_size > 0
    assert not (out / "detections.json").exists()
