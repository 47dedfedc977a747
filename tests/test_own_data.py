"""Your own images and data (issue 17): predict.py / load_detector().predict, custom COCO-format
datasets, fine-tuning with --init-from, per-class AP, SLURM, analyze.py browse, eval.py on a work dir.

One tiny model is trained once per module (in-process, ~10 s) and reused; the real photos of
``shared/data/real_mini`` (COCO JSON + images in their own layout) are used where present.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from libra.engine.distributed import apply_slurm_environment, first_slurm_host
from libra.engine.loading import init_from_checkpoint, load_detector
from libra.evaluation import build_evaluator
from libra.presets import build_model

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import analyze  # noqa: E402
import eval as eval_script  # noqa: E402
import predict  # noqa: E402
import train  # noqa: E402

REAL_MINI = REPO.parent / "shared" / "data" / "real_mini" / "coco"
needs_real_mini = pytest.mark.skipif(not REAL_MINI.is_dir(), reason="shared/data/real_mini is not present")

TINY = [
    "--synthetic-image-size", "64", "--synthetic-num-train", "16", "--synthetic-num-val", "4",
    "--min-size", "64", "--max-size", "64", "--width-per-group", "8", "--set", "fpn_channels=32",
    "--set", "fc_channels=64", "--set", "roi_batch_size=32", "--set", "rpn_batch_size=64",
    "--workers", "0", "--threads", "1", "--log-interval", "1", "--warmup-iters", "2",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A plain Faster R-CNN (batch-independent predictions) trained 8 iterations on tiny synthetic data."""
    root = tmp_path_factory.mktemp("own")
    work = root / "run"
    code = train.main([*TINY, "--model", "faster_rcnn_r50_fpn", "--data-root", str(root / "data"), "--epochs", "2",
                       "--set", "score_thr=0.01", "--work-dir", str(work)])
    assert code == 0
    return work


# ------------------------------------------------------------------ the run's files (issue 22)
def test_losses_png_shows_the_final_evaluation_and_a_finished_resume_logs_it_once(run):
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log if r["mode"] == "val"] == [8] and all("eta_s" in r for r in log if r["mode"] == "train")
    assert (run / "losses.png").stat().st_mtime_ns >= (run / "metrics.json").stat().st_mtime_ns  # drawn after the eval
    assert train.main([*TINY, "--model", "faster_rcnn_r50_fpn", "--data-root", str(run.parent / "data"), "--epochs", "2",
                       "--set", "score_thr=0.01", "--work-dir", str(run), "--resume"]) == 0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log if r["mode"] == "val"] == [8]


# ------------------------------------------------------------------ 1. prediction
def test_predict_equals_eval_detections(run, tmp_path, capsys):
    data = run.parent / "data"
    assert eval_script.main(["--checkpoint", str(run), "--work-dir", str(tmp_path / "eval"), "--threads", "1"]) == 0
    evaluated = json.loads((tmp_path / "eval" / "detections.json").read_text())
    val = json.loads((data / "annotations" / "instances_val.json").read_text()) if (data / "annotations").is_dir() else None
    if val is None:  # the synthetic layout
        ann = next(data.rglob("*val*.json"))
        val = json.loads(ann.read_text())
    image_dir = next(p for p in data.rglob("*") if p.is_dir() and any(p.glob(val["images"][0]["file_name"])))
    out = tmp_path / "pred"
    assert predict.main([str(image_dir), "--checkpoint", str(run), "--out", str(out), "--score-thr", "0.01",
                         "--threads", "1"]) == 0
    predicted = json.loads((out / "results.json").read_text())
    by_name = {info["id"]: info["file_name"] for info in val["images"]}

    def key(entry, name):
        return (Path(name).name, entry["category_id"], tuple(round(v, 2) for v in entry["bbox"]), round(entry["score"], 4))

    expected = sorted(key(e, by_name[e["image_id"]]) for e in evaluated)
    got = sorted(key(e, e["file_name"]) for e in predicted)
    assert len(expected) > 10 and got == expected
    assert len(list(out.glob("*.png"))) == len(val["images"])
    assert all(e["category_name"] in ("rectangle", "ellipse", "triangle", "cross") for e in predicted)


def test_predictions_are_deterministic_and_batch_sizes_agree(run):
    """Batch size 1 (the default) gives identical results for an image whatever else is predicted; a
    larger batch agrees to float rounding (batched kernels sum in another order, ~1e-5 px here)."""
    detector = load_detector(run)
    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, size, generator=generator).float() for size in ((3, 64, 64), (3, 48, 80), (3, 70, 50))]
    one = detector.predict(images, batch_size=1, score_thr=0.0)
    alone = detector.predict(images[1:2], batch_size=1, score_thr=0.0)[0]
    assert torch.equal(one[1]["boxes"], alone["boxes"]) and torch.equal(one[1]["scores"], alone["scores"])
    three = detector.predict(images, batch_size=3, score_thr=0.0)
    for a, b in zip(one, three):
        assert a["boxes"].shape[0] > 0 and torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(a["boxes"], b["boxes"], atol=1e-3, rtol=0)
        torch.testing.assert_close(a["scores"], b["scores"], atol=1e-5, rtol=0)


def test_bad_inputs_get_one_line_each_and_the_run_goes_on(run, tmp_path, capsys):
    good = tmp_path / "in" / "good.png"
    good.parent.mkdir()
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    (tmp_path / "in" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (tmp_path / "in" / "notes.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    code = predict.main([str(tmp_path / "in"), str(tmp_path / "in" / "notes.txt"), str(tmp_path / "empty"),
                         str(tmp_path / "missing.jpg"), str(tmp_path / "clip.mp4"), "--checkpoint", str(run),
                         "--out", str(tmp_path / "out"), "--threads", "1"])
    err = capsys.readouterr().err
    assert code == 0 and "Traceback" not in err
    skipped = [line for line in err.splitlines() if line.startswith("skipped:")]
    assert any("broken.jpg" in line for line in skipped) and any("notes.txt" in line for line in skipped)
    assert any("empty" in line and "no image" in line for line in skipped)
    assert any("missing.jpg" in line for line in skipped)
    assert (tmp_path / "out" / "good.png").is_file()
    # a checkpoint of another kind, and no readable input at all: exit 1 with one error line
    other = tmp_path / "other.pth"
    torch.save({"weights": torch.zeros(3)}, other)
    assert predict.main([str(good), "--checkpoint", str(other), "--out", str(tmp_path / "o2")]) == 1
    assert predict.main([str(tmp_path / "empty"), "--checkpoint", str(run), "--out", str(tmp_path / "o3")]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "neither a libra checkpoint" in errors[0] and "no input could be read" in errors[1]


def test_classes_file_names_the_labels(run, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("box\nround\ntri\nplus\n")
    image = tmp_path / "a.png"
    from PIL import Image

    Image.fromarray(np.full((64, 64, 3), 200, dtype=np.uint8)).save(image)
    assert predict.main([str(image), "--checkpoint", str(run), "--classes", str(names), "--score-thr", "0",
                         "--out", str(tmp_path / "out"), "--no-draw"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results and {r["category_name"] for r in results} <= {"box", "round", "tri", "plus"}
    names.write_text("only\ntwo\n")
    assert predict.main([str(image), "--checkpoint", str(run), "--classes", str(names), "--out", str(tmp_path / "o")]) == 1


# ------------------------------------------------------------------ 2. custom COCO-format data
@needs_real_mini
def test_custom_dataset_trains_and_evaluates_in_its_own_layout(tmp_path):
    ann = REAL_MINI / "annotations"
    flags = ["--train-ann", str(ann / "instances_train.json"), "--train-images", str(REAL_MINI / "images"),
             "--val-ann", str(ann / "instances_val.json"), "--val-images", str(REAL_MINI / "images")]
    work = tmp_path / "custom"
    assert train.main([*flags, *TINY[6:], "--model", "mask_rcnn_r50_fpn", "--set", "mask_conv_channels=8",
                       "--min-size", "96", "--max-size", "128", "--max-iters", "2", "--work-dir", str(work)]) == 0
    config = json.loads((work / "config.json").read_text())
    assert config["dataset"] == "custom" and config["train_ann"].endswith("instances_train.json")
    metrics = json.loads((work / "metrics.json").read_text())
    assert "AP" in metrics and "segm_AP" in metrics  # the segmentations of the file were used
    # eval.py finds the data of the run from its checkpoint
    assert eval_script.main(["--checkpoint", str(work), "--work-dir", str(tmp_path / "eval"), "--threads", "1"]) == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()).keys() == metrics.keys()


@needs_real_mini
def test_custom_dataset_flags_are_checked(tmp_path, capsys):
    ann = REAL_MINI / "annotations" / "instances_train.json"
    assert train.main(["--train-ann", str(ann), "--train-images", str(tmp_path / "nowhere"), "--work-dir", str(tmp_path / "w")]) == 1
    assert train.main(["--dataset", "voc", "--train-ann", str(ann), "--work-dir", str(tmp_path / "w")]) == 1
    assert train.main(["--train-ann", str(ann), "--train-images", str(REAL_MINI / "images"), "--work-dir",
                       str(tmp_path / "w")]) == 1  # evaluation needs the val split (or --no-eval)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert "--train-images" in errors[0] and "no such folder" in errors[0]
    assert "--dataset custom" in errors[1] or "custom dataset" in errors[1]
    assert "--val-ann" in errors[2] and "--no-eval" in errors[2]


# ------------------------------------------------------------------ 3. fine-tuning
@needs_real_mini
def test_init_from_reuses_every_tensor_that_fits(run, tmp_path, capsys):
    source = torch.load(run / (run / "last_checkpoint").read_text().strip(), map_location="cpu", weights_only=False)
    config = dict(source["model_config"])
    model = build_model("faster_rcnn_r50_fpn", 20, **config)  # real_mini has the 20 VOC classes
    before = {k: v.clone() for k, v in model.state_dict().items()}
    message = init_from_checkpoint(model, run)
    state = model.state_dict()
    reinitialised = {"roi_head.box_head.fc_cls.weight", "roi_head.box_head.fc_cls.bias",
                     "roi_head.box_head.fc_reg.weight", "roi_head.box_head.fc_reg.bias"}
    for key, value in state.items():
        if key in reinitialised:
            assert torch.equal(value, before[key]) and value.shape != source["model"][key].shape
        else:
            assert torch.equal(value, source["model"][key]), key
    assert "re-initialised roi_head.box_head.fc_cls, roi_head.box_head.fc_reg" in message
    assert "4 classes" in message and "20" in message
    # The same through train.py, which says so in one line and starts at iteration 0.
    ann = REAL_MINI / "annotations"
    work = tmp_path / "finetune"
    assert train.main(["--train-ann", str(ann / "instances_train.json"), "--train-images", str(REAL_MINI / "images"),
                       "--no-eval", "--init-from", str(run), "--model", "faster_rcnn_r50_fpn", "--min-size", "96",
                       "--max-size", "128", "--max-iters", "1", "--workers", "0", "--threads", "1",
                       "--work-dir", str(work)]) == 0
    out = capsys.readouterr().out
    assert "--init-from" in out and "re-initialised roi_head.box_head.fc_cls" in out
    assert json.loads((work / "config.json").read_text())["init_from"] == str(run)
    assert train.main(["--init-from", str(run), "--resume", "--work-dir", str(work)]) == 1


# ------------------------------------------------------------------ 4. per-class AP
@needs_real_mini
@pytest.mark.parametrize("protocol", ["coco", "lvis"])
def test_per_class_ap_averages_to_the_overall_ap(protocol):
    from libra.coco_api import load_coco_api

    folder = REAL_MINI if protocol == "coco" else REAL_MINI.parent / "lvis"
    ann = next(folder.rglob("*val*.json")) if protocol == "lvis" else REAL_MINI / "annotations" / "instances_trainval.json"
    gt = load_coco_api(ann)
    cat_ids = sorted(gt.cats)
    evaluator = build_evaluator(protocol, gt, cat_ids, ("bbox",), verbose=False)
    rng = np.random.default_rng(0)
    for image_id in gt.getImgIds():
        anns = gt.loadAnns(gt.getAnnIds(imgIds=[image_id]))
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns],
                             dtype=torch.float32).reshape(-1, 4)
        boxes = boxes + torch.from_numpy(rng.normal(0, 6, boxes.shape)).float()
        labels = torch.tensor([cat_ids.index(a["category_id"]) for a in anns], dtype=torch.int64)
        labels[::3] = (labels[::3] + 1) % len(cat_ids)  # some wrong classes
        evaluator.update([image_id], [{"boxes": boxes, "scores": torch.from_numpy(rng.random(len(anns))).float(),
                                      "labels": labels}])
    metrics = evaluator.evaluate()
    rows = evaluator.per_class_results()["bbox"]
    assert len(rows) == len(cat_ids)
    valid = [r for r in rows if r["AP"] >= 0]
    assert valid and np.mean([r["AP"] for r in valid]) == pytest.approx(metrics["AP"], abs=1e-12)
    assert np.mean([r["AP50"] for r in valid if r["AP50"] >= 0]) == pytest.approx(metrics["AP50"], abs=1e-12)
    assert all(r["num_gts"] > 0 for r in valid) and all(r["num_gts"] == 0 for r in rows if r["AP"] < 0)


def test_eval_per_class_prints_and_writes_the_table(run, tmp_path, capsys):
    assert eval_script.main(["--checkpoint", str(run / "last_checkpoint"), "--per-class", "--work-dir",
                             str(tmp_path / "e"), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "per-class box AP" in out and "rectangle" in out and "mean" in out
    rows = json.loads((tmp_path / "e" / "per_class.json").read_text())["bbox"]
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert np.mean([r["AP"] for r in rows if r["AP"] >= 0]) == pytest.approx(metrics["AP"], abs=1e-9)


# ------------------------------------------------------------------ 5. SLURM
def test_slurm_node_lists_and_environment():
    assert first_slurm_host("gpu[07-09,12],cpu1") == "gpu07"
    assert first_slurm_host("node3,node4") == "node3"
    assert first_slurm_host("x[1-2]-ib") == "x1-ib"
    env = {"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "3", "SLURM_STEP_NODELIST": "n[04-05]",
           "SLURM_JOB_ID": "777"}
    assert apply_slurm_environment(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"], env["MASTER_PORT"]) == ("3", "8", "3", "n04", "20777")
    batch_script = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}  # the sbatch script itself: no step of several tasks
    assert not apply_slurm_environment(batch_script) and "RANK" not in batch_script


def test_simulated_two_task_slurm_job_trains_an_epoch(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    work = tmp_path / "slurm"
    processes = []
    for task in range(2):
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", SLURM_PROCID=str(task), SLURM_LOCALID=str(task),
                   SLURM_NTASKS="2", SLURM_STEP_NUM_TASKS="2", SLURM_STEP_NODELIST="localhost", SLURM_JOB_ID="42",
                   MASTER_PORT=str(port))
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "LIBRA_DEBUG"):
            env.pop(key, None)
        processes.append(subprocess.Popen(
            [sys.executable, str(REPO / "train.py"), *TINY, "--device", "cpu", "--epochs", "1", "--no-eval",
             "--data-root", str(tmp_path / "data"), "--work-dir", str(work)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    outputs = [p.communicate(timeout=300) for p in processes]
    for process, (stdout, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr[-3000:]
    assert "world size 2" in outputs[0][0] and (work / "epoch_1.pth").is_file()
    assert json.loads((work / "config.json").read_text())["world_size"] == 2


# ------------------------------------------------------------------ 6. browse
@needs_real_mini
def test_browse_draws_the_ground_truth_after_the_transforms(tmp_path, capsys):
    ann = REAL_MINI / "annotations" / "instances_train.json"
    assert analyze.main(["browse", "--train-ann", str(ann), "--train-images", str(REAL_MINI / "images"),
                         "--model", "mask_rcnn_r50_fpn", "--images", "2", "--min-size", "200", "--max-size", "300",
                         "--out-dir", str(tmp_path)]) == 0
    pngs = sorted(tmp_path.glob("train_*.png"))
    assert len(pngs) == 2
    from PIL import Image

    with Image.open(pngs[0]) as image:
        assert min(image.size) == 200 and max(image.size) <= 300  # drawn at the transformed size
    assert analyze.main(["browse", "--train-ann", str(ann), "--train-images", str(REAL_MINI / "images"),
                         "--index", "99", "--out-dir", str(tmp_path)]) == 1
    assert "outside the split" in capsys.readouterr().err


def test_eval_takes_a_work_dir_for_its_last_checkpoint(run, tmp_path, capsys):
    assert eval_script.main(["--checkpoint", str(run / "nothing_here"), "--work-dir", str(tmp_path)]) == 1
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    assert eval_script.main(["--checkpoint", str(empty), "--work-dir", str(tmp_path)]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert "not found" in errors[0] and "without a last_checkpoint" in errors[1]
    shutil.rmtree(empty)
