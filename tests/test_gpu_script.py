"""The GPU check (``tests/gpu/run.sh`` -> ``tests/gpu/gpu_check.py``): its dry mode on the CPU and its parsers.

One subprocess runs the driver's dry mode on a few steps (env, build check, the op benchmark, two
short training epochs with evaluation) and the JSON and the printed table are checked; the parsers
of the other steps' outputs (pytest's junit and ``-v`` lines, train.py's log and output, the
benchmarks' and the sync counter's JSON) are checked in-process on made-up inputs. The whole dry
run (``tests/gpu/run.sh --dry``, all steps) takes about a minute and a half on 2 cores and is not
part of the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "gpu"))

import gpu_check  # noqa: E402


def test_dry_run_writes_the_json_and_prints_the_table(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("OUT", None)
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "gpu" / "gpu_check.py"), "--dry", "--steps", "env,build,bench_ops,train",
         "--out", str(out), "--work", str(work), "--budget", "240"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["schema"] == gpu_check.SCHEMA and report["mode"] == "dry"
    assert list(report["steps"]) == ["env", "build", "bench_ops", "train"]
    assert all(step["status"] == "ok" for step in report["steps"].values()), report["steps"]
    assert report["steps"]["env"]["data"]["torch"]
    ops = report["steps"]["bench_ops"]["data"]
    assert ops["complete"] and {row["op"] for row in ops["rows"]} == {"roi_align", "nms", "batched_nms", "deform_conv2d"}
    assert all(row["libra_ms"] > 0 and row["torchvision_ms"] > 0 for row in ops["rows"])
    train = report["steps"]["train"]["data"]
    assert [e["epoch"] for e in train["epochs"]] == [1, 2]
    assert all(e["AP50"] is not None and e["eval_started_s"] is not None for e in train["epochs"])  # output parsed
    assert train["iterations"] == 4 and train["s_per_iter_median"] > 0
    assert (out / "train_log.jsonl").is_file() and (out / "gpu_check.log").stat().st_size > 0
    # The table is printed last, with a row per figure; the markdown file holds the same table.
    table = result.stdout[result.stdout.index("| step | figure | value | note |"):]
    assert "| train | time to AP50 >= 0.7 |" in table and "| bench_ops | nms N=200 |" in table
    assert table.strip() in (out / "gpu_check.md").read_text()
    assert len(report["figures"]) == table.strip().count("\n") - 1


def test_junit_and_verbose_pytest_output_are_counted(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<?xml version="1.0"?><testsuites><testsuite tests="5" failures="1" errors="0" skipped="2">'
        '<testcase classname="tests.test_a" name="test_ok"/>'
        '<testcase classname="tests.test_a" name="test_bad"><failure message="assert 1 == 2">trace</failure></testcase>'
        '<testcase classname="tests.test_a" name="test_skip"><skipped message="no CUDA"/></testcase>'
        '<testcase classname="tests.test_a" name="test_xf"><skipped type="pytest.xfail" message="known"/></testcase>'
        '<testcase classname="tests.test_b" name="test_ok"/></testsuite></testsuites>'
    )
    counts = gpu_check.junit_summary(junit)
    assert {k: counts[k] for k in ("passed", "failed", "errors", "skipped", "xfailed", "total")} == {
        "passed": 2, "failed": 1, "errors": 0, "skipped": 1, "xfailed": 1, "total": 5}
    assert counts["failures"] == [{"test": "tests.test_a::test_bad", "kind": "failure", "message": "assert 1 == 2"}]
    assert gpu_check.junit_summary(tmp_path / "missing.xml") is None

    lines = [(0.0, line) for line in (
        "created: 4/4 workers", "4 workers [6 items]",
        "[gw0] [ 16%] PASSED tests/test_ops.py::test_nms_cuda_matches_cpu[1000-False]",
        "[gw1] [ 33%] FAILED tests/test_cuda_sync.py::test_rpn_training_loss_is_sync_free[libra-cuda]",
        "tests/test_x.py::test_y SKIPPED (no CUDA device)          [ 50%]",
        "tests/test_x.py::test_z XFAIL (known)                     [ 66%]",
        "FAILED tests/test_cuda_sync.py::test_rpn_training_loss_is_sync_free[libra-cuda] - RuntimeError: called a sync",
    )]
    progress = gpu_check.pytest_progress(lines)
    assert {k: progress[k] for k in ("passed", "failed", "skipped", "xfailed", "collected", "not_run")} == {
        "passed": 1, "failed": 1, "skipped": 1, "xfailed": 1, "collected": 6, "not_run": 2}
    assert progress["failures"][0]["test"].endswith("test_rpn_training_loss_is_sync_free[libra-cuda]")


def test_time_to_ap50_from_the_log_and_the_output_lines():
    records = [
        {"mode": "train", "epoch": 1, "iter": 20, "time": 0.05},
        {"mode": "val", "epoch": 1, "iter": 96, "AP": 0.2, "AP50": 0.45},
        {"mode": "train", "epoch": 2, "iter": 40, "time": 0.04},
        {"mode": "val", "epoch": 2, "iter": 192, "AP": 0.4, "AP50": 0.71},
        {"mode": "val", "epoch": 3, "iter": 288, "AP": 0.5, "AP50": 0.78},
    ]
    lines = [(3.0, "training libra_faster_rcnn_r50_fpn: 3 epochs x 96 iterations, world size 1, device cuda"),
             (10.0, "evaluating on 64 images after epoch 1"), (12.5, "box metrics on 64 images (2.5s)"),
             (20.0, "evaluating on 64 images after epoch 2"), (22.0, "box metrics on 64 images (2.0s)"),
             (30.0, "evaluating on 64 images after epoch 3")]
    summary = gpu_check.train_summary(records, lines)
    assert summary["reached_at_epoch"] == 2 and summary["time_to_target_s"] == 20.0
    assert summary["train_time_to_target_s"] == pytest.approx(20.0 - 3.0 - 2.5)
    assert summary["final_AP50"] == 0.78 and summary["iterations"] == 40 and summary["s_per_iter_median"] == 0.05
    assert gpu_check.train_summary(records[:2], lines)["reached_at_epoch"] is None


def test_every_step_has_rows_in_the_table():
    results = {"steps": {
        "env": {"status": "ok", "seconds": 3, "data": {"gpu": "NVIDIA H200", "capability": "9.0", "torch": "2.11.0",
                                                        "torch_cuda": "13.0", "gpu_memory_gb": 139.8, "nvcc": "13.0"}},
        "pycocotools": {"status": "ok", "seconds": 1, "version": "2.0.11", "detail": "installed from tests/gpu/wheels"},
        "build": {"status": "ok", "seconds": 80, "method": "pip", "arch_list": "9.0",
                  "check": {"extension": True, "cuda_kernels": True, "nms_cuda_equals_cpu": True,
                            "roi_align_cuda_max_abs_diff": 1e-7}},
        "cuda_tests": {"status": "failed", "seconds": 40, "counts": {
            "passed": 60, "failed": 1, "errors": 0, "skipped": 0, "failures": [
                {"test": "tests/test_ops.py::test_x", "kind": "failure", "message": "boom"}]}},
        "sync_count": {"status": "ok", "seconds": 30, "data": {
            "model": "libra_faster_rcnn_r50_fpn", "syncs_per_iter": 7.0, "syncs_per_iter_outside_logging": 5.0,
            "groups_per_iter": {"work": 5.0, "timing": 2.0, "logging": 0.0},
            "sites": [{"site": "libra/roi_heads/roi_extractor.py:96", "function": "forward", "code": "counts = ...",
                       "op": "", "group": "work", "per_iter": 2.0}],
            "profiler_per_iter": {"cudaStreamSynchronize": 6.0}}},
        "bench_ops": {"status": "ok", "seconds": 9, "data": {"rows": [
            {"case": "nms                N=1000", "libra_ms": 0.2, "torchvision_ms": 0.4, "ratio": 0.5, "agreement": "same kept"}]}},
        "train": {"status": "ok", "seconds": 120, "data": {
            "epochs": [{"epoch": 1, "AP50": 0.75}], "final_AP": 0.5, "final_AP50": 0.75, "target_AP50": 0.7,
            "reached_at_epoch": 1, "time_to_target_s": 60.0, "train_time_to_target_s": 45.0, "iterations": 96,
            "s_per_iter_median": 0.05}},
        "bench_train": {"status": "ok", "seconds": 100, "data": {"rows": [
            {"task": "train", "precision": "amp", "batch": 2, "model": "libra_retinanet_r50_fpn", "images_per_s": 12.0,
             "vs_peer": 1.05, "peer": "tv_retinanet"},
            {"task": "train", "precision": "amp", "batch": 8, "model": "libra_retinanet_r50_fpn", "images_per_s": 30.0,
             "vs_peer": 1.1, "peer": "tv_retinanet", "vs_tv_fasterrcnn": 0.9, "peak_memory_gb": 20.0},
            {"task": "infer", "precision": "fp32", "batch": 2, "model": "mask_rcnn_r50_fpn", "error": "KeyError: 'masks'"}]}},
        "tests": {"status": "skipped", "seconds": 0, "detail": "budget: 12 s left"},
    }}
    rows = gpu_check.figures_of(results)
    steps = {row["step"] for row in rows}
    assert steps == set(gpu_check.STEPS)
    table = gpu_check.render_table(rows)
    for fragment in ("| env | GPU | NVIDIA H200 |", "| build | CUDA kernels | yes | TORCH_CUDA_ARCH_LIST=9.0 |",
                     "| cuda_tests | FAILED | tests/test_ops.py::test_x | boom |",
                     "| sync_count | host syncs / iteration | 7 |", "| sync_count | work: libra/roi_heads/roi_extractor.py:96 | 2.0/iter |",
                     "| train | time to AP50 >= 0.7 | 60 s | epoch 1;", "| bench_ops | nms N=1000 | 0.200 ms |",
                     "| bench_train | train amp libra_retinanet_r50_fpn | b2 12.0, b8 30.0 img/s | x1.05/1.10 vs tv_retinanet; "
                     "x0.90 vs tv_fasterrcnn; 20 GiB |",
                     "| bench_train | infer fp32 mask_rcnn_r50_fpn | b2 failed img/s | KeyError: 'masks' |",
                     "| tests | status | skipped (0 s) | budget: 12 s left |"):
        assert fragment in table, fragment
    assert table.count("\n") + 1 == len(rows) + 2


def test_arguments():
    args = gpu_check.parse_args(["--dry", "--skip", "tests,build", "--out", "x"])
    assert args.dry and args.budget == 600 and "tests" not in args.step_list and args.step_list[0] == "env"
    assert gpu_check.parse_args(["--out", "x"]).budget == 555
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--steps", "env,nonsense"])
