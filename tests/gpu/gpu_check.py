"""The GPU check: build, test and measure libra on a CUDA machine in one command (``tests/gpu/run.sh``).

    tests/gpu/run.sh                         # on a CUDA machine: everything, within --budget seconds
    tests/gpu/run.sh --dry                   # on a CPU: the same steps at tiny sizes (a couple of minutes)
    tests/gpu/run.sh --steps build,cuda_tests --budget 300
    python tests/gpu/gpu_check.py --help

Steps, in this order; each runs as a subprocess with its own time limit, so that a hang or a crash
(a CUDA error, an out-of-memory kill) costs that step only; a failed step is reported and the next
one runs:

==============  ================================================================================
``env``         python, torch, CUDA, GPU (name, compute capability, memory), driver, nvcc, packages
``pycocotools`` importable, else installed offline: ``pip install --no-index --find-links DIR
                pycocotools`` from ``--wheels DIR``, ``tests/gpu/wheels/`` or ``.whl/``
``build``       ``pip install --no-build-isolation --no-deps -e .`` with ``FORCE_CUDA=1`` and
                ``TORCH_CUDA_ARCH_LIST`` = this GPU's compute capability (``tests/gpu/build_inplace.py``
                if pip fails), then a check that ``libra._C`` has CUDA kernels that agree with the
                CPU's. ``--no-build`` keeps an extension that is already there
``cuda_tests``  ``pytest tests -k cuda``: the CUDA-vs-CPU op tests, half / bf16, and every
                sync-free check (``tests/test_cuda_sync.py``, ``tests/test_samplers.py``, ...)
``sync_count``  host syncs per training iteration of the default job and where they come from
                (``tests/gpu/count_syncs.py``, with a ``torch.profiler`` cross-check)
``bench_ops``   RoIAlign / NMS / batched NMS / deform_conv2d vs ``torchvision.ops`` (``tests/benchmarks/bench_ops.py``)
``train``       ``train.py --device cuda --eval-interval 1``: the default synthetic job, AP50 after
                every epoch; the time until AP50 >= 0.7
``bench_train`` images/s, fp32 and AMP, batch 2 and 8, 800 x 1333, every R50 preset vs torchvision
                (``tests/benchmarks/bench_train.py``)
``tests``       the rest of the suite (``pytest tests -k "not cuda"`` after ``cuda_tests``: together
                the whole suite), with ``-n`` workers when pytest-xdist is there
==============  ================================================================================

``--budget`` (default 555 s, for a 600 s command limit) is the wall time for all of it: each step gets its own cap or what is
left (minus a reserve for the report), and a step with too little time left is skipped. After every
step the results are rewritten to ``--out`` (default ``$OUT``, else ``work_dirs/gpu_check``):
``gpu_check.json`` (every figure, per step), ``gpu_check.md`` (the table), ``gpu_check.log`` (the
steps' output with time stamps) and ``train_log.jsonl`` (the training run's log). The table is
printed last.

``--dry`` (or ``LIBRA_GPU_DRY=1``) runs the same steps on the CPU at tiny sizes: nothing is built
or installed, the CUDA tests are the CPU "logic mode" of ``tests/test_cuda_sync.py``, the benchmarks
run 1 iteration on small inputs, the training 2 short epochs, and the JSON and table have the same
form (CUDA-only figures are null).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SCHEMA = "libra-gpu-check/1"
STEPS = ("env", "pycocotools", "build", "cuda_tests", "sync_count", "bench_ops", "train", "bench_train", "tests")
# Seconds each step may take at most on a GPU (and in --dry mode on a CPU).
CAPS = {
    "env": (60, 60), "pycocotools": (60, 30), "build": (240, 30), "cuda_tests": (150, 120), "sync_count": (90, 120),
    "bench_ops": (90, 90), "train": (240, 150), "bench_train": (180, 150), "tests": (600, 120),
}
MIN_STEP_SECONDS = 20  # a step with less time left than this is skipped
REPORT_RESERVE = 10
AP50_TARGET = 0.7


# ----------------------------------------------------------------------------- running commands
@dataclass
class Completed:
    rc: int | None
    seconds: float
    timed_out: bool
    lines: list[tuple[float, str]] = field(default_factory=list)  # (seconds since start, line)

    @property
    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


class Runner:
    """Runs commands with a time limit in their own process group and tees their output to the log."""

    def __init__(self, log_path: Path, echo: bool = False) -> None:
        self.log_path = log_path
        self.echo = echo
        self.current: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def log(self, text: str) -> None:
        with self._lock, open(self.log_path, "a", encoding="utf-8") as handle:
            handle.write(text.rstrip("\n") + "\n")

    def run(self, name: str, argv: list[str], timeout: float, env: dict | None = None,
            on_line: Callable[[float, str], None] | None = None) -> Completed:
        started = time.monotonic()
        self.log(f"\n===== [{name}] $ {shlex.join(argv)}  (limit {timeout:.0f} s)")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        try:
            # Its own process group (not session): stop() ends it with all its children, and the
            # machine's cleanup still sees it.
            group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
            process = subprocess.Popen(
                argv, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                errors="replace", bufsize=1, **group,
            )
        except OSError as error:
            self.log(f"[{name}] could not start: {error}")
            return Completed(None, 0.0, False, [(0.0, f"could not start: {error}")])
        self.current = process
        lines: list[tuple[float, str]] = []

        def pump() -> None:
            assert process.stdout is not None
            for raw in process.stdout:
                stamp = time.monotonic() - started
                line = raw.rstrip("\n")
                lines.append((stamp, line))
                self.log(f"[{name} {stamp:7.1f}s] {line}")
                if self.echo:
                    print(f"  | {line}", flush=True)
                if on_line is not None:
                    on_line(stamp, line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            process.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            timed_out = True
            self.stop(process)
        reader.join(timeout=10)
        self.current = None
        seconds = time.monotonic() - started
        self.log(f"===== [{name}] rc={process.returncode} after {seconds:.1f} s" + (" (time limit)" if timed_out else ""))
        return Completed(process.returncode, seconds, timed_out, lines)

    @staticmethod
    def stop(process: subprocess.Popen) -> None:
        """SIGTERM to the whole process group (pytest workers, data-loader workers), then SIGKILL."""
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(process.pid, sig)
            except (ProcessLookupError, PermissionError):
                return
            try:
                process.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


def python_json(text: str) -> dict | None:
    """The last line of ``text`` that parses as a JSON object."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    return None


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


# ----------------------------------------------------------------------------- parsing results
def junit_summary(path: Path) -> dict | None:
    """Counts and failed test ids of a pytest ``--junitxml`` report."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    failed, xfailed = [], 0
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        for child in case:
            if child.tag in ("failure", "error"):
                message = " ".join((child.get("message") or child.text or "").split())[:240]
                failed.append({"test": name, "kind": child.tag, "message": message})
            elif child.tag == "skipped" and child.get("type") == "pytest.xfail":
                xfailed += 1
    skipped = counts["skipped"] - xfailed
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {"passed": passed, "failed": counts["failures"], "errors": counts["errors"], "skipped": skipped,
            "xfailed": xfailed, "total": counts["tests"], "failures": failed}


PYTEST_RESULT = re.compile(r"(?:^|\s)(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)(?:\s|$)")
PYTEST_ID = re.compile(r"(tests/\S+\.py::\S+)")
PYTEST_COLLECTED = re.compile(r"collected (\d+) items|\[(\d+) items?\]")


def pytest_progress(lines: list[tuple[float, str]]) -> dict | None:
    """Counts from the per-test lines of ``pytest -v`` (with or without xdist), for a run that was
    stopped before it wrote its junit file; ``not_run`` = collected - reported."""
    status: dict[str, str] = {}
    collected = None
    for _, line in lines:
        match = PYTEST_COLLECTED.search(line)
        if match and collected is None:
            collected = int(match.group(1) or match.group(2))
        result, test = PYTEST_RESULT.search(line), PYTEST_ID.search(line)
        if result and test:
            status[test.group(1)] = result.group(1)
    if not status and collected is None:
        return None
    tally = lambda *names: sum(1 for v in status.values() if v in names)  # noqa: E731
    counts = {"passed": tally("PASSED", "XPASS"), "failed": tally("FAILED"), "errors": tally("ERROR"),
              "skipped": tally("SKIPPED"), "xfailed": tally("XFAIL"), "total": len(status),
              "failures": [{"test": t, "kind": v.lower(), "message": ""} for t, v in status.items() if v in ("FAILED", "ERROR")]}
    if collected is not None:
        counts["collected"] = collected
        counts["not_run"] = max(0, collected - len(status))
    return counts


EVAL_LINE = re.compile(r"evaluating on \d+ images after epoch (\d+)")
EVAL_SECONDS = re.compile(r"box metrics on \d+ images \(([\d.]+)s\)")
TRAIN_START = re.compile(r"^training \S+: ")


def train_summary(log_records: list[dict], lines: list[tuple[float, str]], target: float = AP50_TARGET) -> dict:
    """Per-epoch AP50 from ``log.jsonl`` and the time stamps of ``train.py``'s output lines.

    ``time_to_target_s``: from the start of the process to the start of the first evaluation whose
    AP50 >= ``target`` (the training up to that epoch, with the evaluations before it);
    ``train_time_to_target_s``: the same without process setup (data generation, model build:
    from the line ``training <model>: ...``) and without the evaluations' own time.
    """
    val = [r for r in log_records if r.get("mode") == "val"]
    train_rows = [r for r in log_records if r.get("mode") == "train"]
    eval_starts: dict[int, float] = {}
    eval_seconds: list[float] = []
    train_start = None
    for stamp, line in lines:
        if train_start is None and TRAIN_START.match(line):
            train_start = stamp
        match = EVAL_LINE.search(line)
        if match:
            eval_starts[int(match.group(1))] = stamp
        match = EVAL_SECONDS.search(line)
        if match:
            eval_seconds.append(float(match.group(1)))
    epochs = []
    for index, record in enumerate(val):
        epoch = int(record.get("epoch", index + 1))
        epochs.append({"epoch": epoch, "iter": record.get("iter"), "AP": record.get("AP"), "AP50": record.get("AP50"),
                       "eval_started_s": round(eval_starts[epoch], 1) if epoch in eval_starts else None})
    result: dict[str, Any] = {
        "epochs": epochs,
        "final_AP": val[-1].get("AP") if val else None,
        "final_AP50": val[-1].get("AP50") if val else None,
        "target_AP50": target,
        "reached_at_epoch": None,
        "time_to_target_s": None,
        "train_time_to_target_s": None,
        "iterations": train_rows[-1].get("iter") if train_rows else None,
    }
    times = sorted(r["time"] for r in train_rows if isinstance(r.get("time"), (int, float)))
    result["s_per_iter_median"] = round(times[len(times) // 2], 4) if times else None
    for position, entry in enumerate(epochs):
        if entry["AP50"] is not None and entry["AP50"] >= target:
            result["reached_at_epoch"] = entry["epoch"]
            if entry["eval_started_s"] is not None:
                result["time_to_target_s"] = entry["eval_started_s"]
                if train_start is not None:
                    spent_evaluating = sum(eval_seconds[:position])
                    result["train_time_to_target_s"] = round(entry["eval_started_s"] - train_start - spent_evaluating, 1)
            break
    return result


def read_jsonl(path: Path) -> list[dict]:
    records = []
    try:
        with open(path) as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict):
                    records.append(record)
    except OSError:
        pass
    return records


# ----------------------------------------------------------------------------- the table
def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def figures_of(results: dict) -> list[dict]:
    """Every figure of the results as ``{"step", "figure", "value", "note"}`` rows (the table)."""
    rows: list[dict] = []

    def add(step: str, figure: str, value: Any, note: str = "") -> None:
        rows.append({"step": step, "figure": figure, "value": fmt(value), "note": note})

    steps = results.get("steps", {})
    for name in STEPS:
        step = steps.get(name)
        if step is None:
            continue
        note = step.get("detail", "")
        status = step.get("status", "?")
        if step.get("seconds") is not None:
            status += f" ({step['seconds']:.0f} s)"
        add(name, "status", status, note)

    env = steps.get("env", {}).get("data") or {}
    if env:
        add("env", "GPU", env.get("gpu") or "none", env.get("nvidia_smi") or "")
        add("env", "compute capability", env.get("capability"), f"{env.get('gpu_memory_gb')} GiB" if env.get("gpu_memory_gb") else "")
        add("env", "torch / CUDA", f"{env.get('torch')} / {env.get('torch_cuda')}", f"python {env.get('python')}")
        add("env", "nvcc", env.get("nvcc"), f"CUDA_HOME {env.get('cuda_home')}")
    coco = steps.get("pycocotools", {})
    if coco:
        add("pycocotools", "pycocotools", coco.get("version") or "missing", coco.get("detail", ""))
    build = steps.get("build", {})
    if build:
        check = build.get("check") or {}
        add("build", "libra._C", fmt(check.get("extension")), build.get("method", ""))
        add("build", "CUDA kernels", check.get("cuda_kernels"), f"TORCH_CUDA_ARCH_LIST={build.get('arch_list')}")
        if "nms_cuda_equals_cpu" in check:
            add("build", "nms CUDA == CPU", check["nms_cuda_equals_cpu"],
                f"roi_align max abs diff {fmt(check.get('roi_align_cuda_max_abs_diff'))}, "
                f"deform_conv2d max abs diff {fmt(check.get('deform_conv2d_cuda_max_abs_diff'))}")
    for name, label in (("cuda_tests", "CUDA tests"), ("tests", "other tests")):
        counts = steps.get(name, {}).get("counts")
        if counts:
            extra = [steps[name]["selection"]] if steps[name].get("selection") else []
            extra += [f"{counts['xfailed']} xfailed"] if counts.get("xfailed") else []
            extra += [f"{counts['not_run']} not run (time limit)"] if counts.get("not_run") else []
            add(name, label, f"{counts.get('passed', 0)} passed, {counts.get('failed', 0)} failed, "
                f"{counts.get('errors', 0)} errors, {counts.get('skipped', 0)} skipped", ", ".join(extra))
            for failure in (counts.get("failures") or [])[:10]:
                add(name, "FAILED", failure["test"], failure["message"][:160])
    syncs = steps.get("sync_count", {}).get("data") or {}
    if syncs:
        add("sync_count", "host syncs / iteration", syncs.get("syncs_per_iter"), syncs.get("model", ""))
        add("sync_count", "outside logging/timing", syncs.get("syncs_per_iter_outside_logging"),
            ", ".join(f"{k} {v}" for k, v in (syncs.get("groups_per_iter") or {}).items()) or syncs.get("note", ""))
        for site in (syncs.get("sites") or [])[:10]:
            add("sync_count", f"{site['group']}: {site['site']}", f"{site['per_iter']}/iter",
                f"{site['function']}: {site['code'][:70]}" + (f" -> {site['op']}" if site.get("op") else ""))
        for name, value in (syncs.get("profiler_per_iter") or {}).items():
            add("sync_count", f"profiler {name}", f"{value}/iter")
        if syncs.get("profiler_error"):
            add("sync_count", "profiler", "failed", syncs["profiler_error"][:160])
    ops = steps.get("bench_ops", {}).get("data") or {}
    for row in ops.get("rows", []):
        add("bench_ops", " ".join(row["case"].split()), f"{row['libra_ms']:.3f} ms",
            f"torchvision {row['torchvision_ms']:.3f} ms, libra/tv time {row['ratio']:.2f}, {row['agreement']}")
    train = steps.get("train", {}).get("data") or {}
    if train:
        reached = train.get("reached_at_epoch")
        seconds = train.get("time_to_target_s")
        add("train", f"time to AP50 >= {train.get('target_AP50')}", f"{seconds:.0f} s" if seconds is not None else "n/a",
            (f"epoch {reached}; training alone {fmt(train.get('train_time_to_target_s'))} s (no setup, no evaluations)"
             if reached else "not reached"))
        add("train", "final AP50 / AP", f"{fmt(train.get('final_AP50'))} / {fmt(train.get('final_AP'))}",
            f"{len(train.get('epochs', []))} evaluations, {fmt(train.get('iterations'))} iterations")
        add("train", "s / iteration (median)", train.get("s_per_iter_median"), "from log.jsonl 'time'")
        curve = ", ".join(f"{e['epoch']}:{fmt(e['AP50'], 2)}" for e in train.get("epochs", []))
        add("train", "AP50 per epoch", curve or "n/a")
    bench = steps.get("bench_train", {}).get("data") or {}
    groups: dict[tuple, list[dict]] = {}
    for row in bench.get("rows", []):  # one table row per (task, precision, model), the batches side by side
        groups.setdefault((row["task"], row["precision"], row["model"]), []).append(row)
    for (task, precision, model), group in groups.items():
        values, vs_peer, vs_frcnn, memory, errors = [], [], [], [], []
        for row in group:
            if "images_per_s" in row:
                values.append(f"b{row['batch']} {row['images_per_s']:.1f}")
                if row.get("vs_peer") is not None:
                    vs_peer.append(f"{row['vs_peer']:.2f}")
                if row.get("vs_tv_fasterrcnn") is not None and row.get("peer") != "tv_fasterrcnn":
                    vs_frcnn.append(f"{row['vs_tv_fasterrcnn']:.2f}")
                if row.get("peak_memory_gb") is not None:
                    memory.append(f"{row['peak_memory_gb']:.0f}")
            else:
                values.append(f"b{row['batch']} failed")
                errors.append(row.get("error", "")[:100])
        notes = []
        if vs_peer:
            notes.append(f"x{'/'.join(vs_peer)} vs {group[0].get('peer')}")
        if vs_frcnn:
            notes.append(f"x{'/'.join(vs_frcnn)} vs tv_fasterrcnn")
        if memory:
            notes.append(f"{'/'.join(memory)} GiB")
        notes += errors[:1]
        add("bench_train", f"{task} {precision} {model}", ", ".join(values) + " img/s", "; ".join(notes))
    return rows


def render_table(rows: list[dict]) -> str:
    clean = lambda text: str(text).replace("|", "/").replace("\n", " ")  # noqa: E731
    lines = ["| step | figure | value | note |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['step']} | {clean(r['figure'])} | {clean(r['value'])} | {clean(r['note'])} |" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the check
class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dry = args.dry
        self.python = args.python or sys.executable
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work or tempfile.mkdtemp(prefix="libra_gpu_check_")).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.log_path = self.out / "gpu_check.log"
        self.log_path.write_text("")
        self.runner = Runner(self.log_path, echo=args.verbose)
        self.started = time.monotonic()
        self.deadline = self.started + args.budget
        self.results: dict[str, Any] = {
            "schema": SCHEMA,
            "mode": "dry" if self.dry else "gpu",
            "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "budget_s": args.budget,
            "command": [sys.argv[0], *sys.argv[1:]],
            "work_dir": str(self.work),
            "steps": {},
        }
        self.env: dict = {}

    # -------------------------------------------------------------- budget and report
    def remaining(self) -> float:
        return self.deadline - time.monotonic() - REPORT_RESERVE

    def limit(self, name: str) -> float:
        cap = CAPS[name][1 if self.dry else 0]
        return min(cap, self.remaining())

    def write_report(self) -> str:
        self.results["seconds"] = round(time.monotonic() - self.started, 1)
        self.results["figures"] = figures_of(self.results)
        table = render_table(self.results["figures"])
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=2, default=str) + "\n")
        (self.out / "gpu_check.md").write_text(
            f"# libra GPU check ({self.results['mode']}), {self.results['started_utc']}, "
            f"{self.results['seconds']:.0f} s\n\n{table}\n"
        )
        return table

    def record(self, name: str, step: dict) -> None:
        self.results["steps"][name] = step
        self.write_report()
        status = step.get("status")
        print(f"[{name}] {status} in {step.get('seconds', 0):.0f} s" + (f": {step['detail']}" if step.get("detail") else ""),
              flush=True)

    def run_step(self, name: str, function: Callable[[float], dict]) -> None:
        limit = self.limit(name)
        if limit < MIN_STEP_SECONDS:
            self.record(name, {"status": "skipped", "detail": f"budget: {max(0, self.remaining()):.0f} s left",
                               "seconds": 0.0})
            return
        print(f"[{name}] running (limit {limit:.0f} s) ...", flush=True)
        started = time.monotonic()
        try:
            step = function(limit)
        except Exception as error:  # noqa: BLE001 - a bug in a step must not stop the others
            step = {"status": "error", "detail": f"{type(error).__name__}: {error}"[:300]}
        step.setdefault("seconds", round(time.monotonic() - started, 1))
        step["limit_s"] = round(limit)
        self.record(name, step)

    def command_step(self, name: str, argv: list[str], limit: float, env: dict | None = None, on_line=None) -> tuple[dict, Completed]:
        completed = self.runner.run(name, argv, limit, env=env, on_line=on_line)
        if completed.timed_out:
            status, detail = "timeout", f"stopped at its {limit:.0f} s limit"
        elif completed.rc == 0:
            status, detail = "ok", ""
        else:
            last = [line for _, line in completed.lines if line.strip()][-1:] or [""]
            status, detail = "failed", f"exit code {completed.rc}: {last[0][:200]}"
        return {"status": status, "detail": detail, "seconds": round(completed.seconds, 1), "rc": completed.rc,
                "command": shlex.join(argv)}, completed

    # -------------------------------------------------------------- steps
    def step_env(self, limit: float) -> dict:
        step, completed = self.command_step("env", [self.python, str(HERE / "probe_env.py")], limit)
        self.env = python_json(completed.text) or {}
        step["data"] = self.env
        if step["status"] == "ok" and not self.dry and not self.env.get("cuda_available"):
            step["status"], step["detail"] = "failed", "no CUDA device visible to torch (use --dry on a CPU)"
        return step

    def wheel_dirs(self) -> list[Path]:
        candidates = [Path(self.args.wheels)] if self.args.wheels else []
        candidates += [HERE / "wheels", REPO / ".whl"]
        return [d for d in candidates if d.is_dir() and any(d.glob("pycocotools-*.whl"))]

    def step_pycocotools(self, limit: float) -> dict:
        version = self.env.get("pycocotools")
        if version:
            return {"status": "ok", "version": version, "detail": "already importable"}
        dirs = self.wheel_dirs()
        if self.dry:
            return {"status": "missing", "version": None,
                    "detail": "not importable; --dry installs nothing" + (f" (wheels in {dirs[0]})" if dirs else "")}
        if not dirs:
            return {"status": "missing", "version": None,
                    "detail": "not importable and no pycocotools-*.whl in --wheels / tests/gpu/wheels / .whl "
                              "(tests/gpu/fetch_wheels.sh): evaluation and the training step's AP fail"}
        argv = [self.python, "-m", "pip", "install", "--no-index", "--no-deps", "--find-links", str(dirs[0]), "pycocotools"]
        step, _ = self.command_step("pycocotools", argv, limit)
        probe = self.runner.run("pycocotools", [self.python, "-c", "import pycocotools, importlib.metadata as m; "
                                                "print(m.version('pycocotools'))"], 60)
        step["version"] = probe.text.strip().splitlines()[-1] if probe.rc == 0 and probe.text.strip() else None
        if step["version"]:
            step["status"], step["detail"] = "ok", f"installed from {dirs[0]}"
        elif step["status"] == "ok":
            step["status"], step["detail"] = "failed", "installed but not importable"
        return step

    def check_ops(self) -> dict:
        probe = self.runner.run("build", [self.python, str(HERE / "probe_env.py"), "--check-ops"], 120)
        return python_json(probe.text) or {"extension": False, "error": probe.text[-300:]}

    def step_build(self, limit: float) -> dict:
        if self.dry or self.args.no_build:
            check = self.check_ops()
            status = "ok" if check.get("extension") else "failed"
            why = "--dry" if self.dry else "--no-build"
            detail = f"kept the existing libra._C ({why})" if status == "ok" else check.get("error", "")
            if status == "ok" and not self.dry and self.env.get("cuda_available") and not check.get("cuda_kernels"):
                status, detail = "failed", "the existing libra._C has no working CUDA kernels: build it (drop --no-build)"
            return {"status": status, "method": f"not rebuilt ({why})", "check": check, "arch_list": None, "detail": detail}
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or self.env.get("capability")
        env = {"FORCE_CUDA": "1", "MAX_JOBS": str(min(16, os.cpu_count() or 4))}
        if arch:
            env["TORCH_CUDA_ARCH_LIST"] = arch
        if self.env.get("cuda_home") and not os.environ.get("CUDA_HOME"):
            env["CUDA_HOME"] = self.env["cuda_home"]
        started = time.monotonic()
        argv = [self.python, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps", "-e", "."]
        step, _ = self.command_step("build", argv, limit, env=env)
        method = "pip install --no-build-isolation --no-deps -e ."
        if step["status"] == "failed":
            left = limit - (time.monotonic() - started)
            if left > MIN_STEP_SECONDS:
                pip_detail = step["detail"]
                step, _ = self.command_step("build", [self.python, str(HERE / "build_inplace.py")], left, env=env)
                method = f"tests/gpu/build_inplace.py (pip failed: {pip_detail[:120]})"
        check = self.check_ops()
        step.update(method=method, arch_list=arch, check=check, env=env, seconds=round(time.monotonic() - started, 1))
        if step["status"] == "ok" and not (check.get("extension") and check.get("cuda_kernels")):
            step["status"] = "failed"
            step["detail"] = "built, but libra._C " + ("has no CUDA kernels" if check.get("extension") else
                                                      f"does not load: {check.get('error', '')[:200]}")
        elif step["status"] == "ok" and check.get("nms_cuda_equals_cpu") is False:
            step["status"], step["detail"] = "failed", "CUDA nms differs from the CPU kernel"
        return step

    def pytest_step(self, name: str, targets: list[str], limit: float, extra: list[str], workers: int = 0) -> dict:
        junit = self.work / f"{name}.xml"
        junit.unlink(missing_ok=True)
        argv = [self.python, "-m", "pytest", *targets, "-v", "-rfE", "-p", "no:cacheprovider", f"--junitxml={junit}", *extra]
        if workers > 1 and self.env.get("xdist"):
            argv += ["-n", str(workers)]
        if self.env.get("pytest_timeout"):
            argv += ["--timeout", str(int(max(60, min(300, limit / 2))))]
        step, completed = self.command_step(name, argv, limit, env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
        counts = junit_summary(junit) or pytest_progress(completed.lines)
        step["counts"] = counts
        if counts:
            bad = counts.get("failed", 0) + counts.get("errors", 0)
            if step["status"] in ("ok", "failed"):
                step["status"] = "ok" if bad == 0 and completed.rc == 0 else "failed"
            step["detail"] = (f"{counts.get('passed', 0)} passed, {bad} failed or errors, {counts.get('skipped', 0)} skipped"
                              + (f", {counts['not_run']} not run" if counts.get("not_run") else "")
                              + (f" ({step['detail']})" if step["status"] == "timeout" else ""))
        return step

    def workers(self) -> int:
        return max(1, min(14, (self.env.get("cpu_count") or 2) - 2))

    def step_cuda_tests(self, limit: float) -> dict:
        if self.dry:
            step = self.pytest_step("cuda_tests", ["tests/test_cuda_sync.py"], limit, [])
            step["selection"] = "pytest tests/test_cuda_sync.py (CPU logic mode)"
            return step
        step = self.pytest_step("cuda_tests", ["tests"], limit, ["-k", "cuda"], workers=min(4, self.workers()))
        step["selection"] = "pytest tests -k cuda"
        return step

    def step_tests(self, limit: float) -> dict:
        """The rest of the suite: with ``cuda_tests`` in the same run, the tests it ran are left out."""
        if self.dry:
            step = self.pytest_step("tests", ["tests/test_boxes.py", "tests/test_anchors_coder.py"], limit, [])
            step["selection"] = "pytest tests/test_boxes.py tests/test_anchors_coder.py (dry subset)"
            return step
        rest = ["-k", "not cuda"] if self.results["steps"].get("cuda_tests", {}).get("counts") else []
        step = self.pytest_step("tests", ["tests"], limit, rest, workers=self.workers())
        step["selection"] = "pytest tests -k 'not cuda' (cuda_tests ran the others)" if rest else "pytest tests"
        return step

    def step_sync_count(self, limit: float) -> dict:
        out = self.work / "syncs.json"
        if self.dry:
            argv = [self.python, str(HERE / "count_syncs.py"), "--device", "cpu", "--iters", "1", "--warmup", "1",
                    "--json", str(out), "--train-args", "--threads 1 --batch-size 2"]
        else:
            argv = [self.python, str(HERE / "count_syncs.py"), "--device", "cuda", "--iters", "5", "--warmup", "2",
                    "--profile", "--json", str(out)]
        step, _ = self.command_step("sync_count", argv, limit)
        step["data"] = read_json(out)
        return step

    def step_bench_ops(self, limit: float) -> dict:
        out = self.work / "bench_ops.json"
        if self.dry:
            argv = [self.python, "tests/benchmarks/bench_ops.py", "--device", "cpu", "--tiny", "--repeats", "1",
                    "--warmup", "0", "--threads", "1"]
        else:
            argv = [self.python, "tests/benchmarks/bench_ops.py", "--device", "cuda", "--repeats", "20", "--warmup", "3"]
        argv += ["--json", str(out), "--time-limit", str(int(max(10, limit - 20)))]
        step, _ = self.command_step("bench_ops", argv, limit)
        step["data"] = read_json(out)
        return step

    def step_train(self, limit: float) -> dict:
        work_dir, data_root = self.work / "train", self.work / "synthetic"
        argv = [self.python, "train.py", "--work-dir", str(work_dir), "--data-root", str(data_root),
                "--eval-interval", "1", "--overwrite"]
        if self.dry:
            argv += ["--device", "cpu", "--threads", "1", "--synthetic-num-train", "4", "--synthetic-num-val", "2",
                     "--epochs", "2", "--batch-size", "2", "--log-interval", "1", "--warmup-iters", "1"]
        else:
            argv += ["--device", "cuda"]
        coco = self.results["steps"].get("pycocotools", {})
        no_eval = not (self.env.get("pycocotools") or coco.get("version"))
        if no_eval:  # the evaluation would fail at the first epoch: time the training alone
            argv.append("--no-eval")
        step, completed = self.command_step("train", argv, limit)
        records = read_jsonl(work_dir / "log.jsonl")
        step["data"] = train_summary(records, completed.lines)
        if no_eval:
            step["detail"] = (step["detail"] + "; " if step["detail"] else "") + "--no-eval: pycocotools is missing, no AP"
        if records:
            (self.out / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        return step

    def step_bench_train(self, limit: float) -> dict:
        out = self.work / "bench_train.json"
        if self.dry:
            argv = [self.python, "tests/benchmarks/bench_train.py", "--device", "cpu", "--iters", "1", "--warmup", "0",
                    "--size", "128", "128", "--train-batches", "1", "--infer-batches", "1", "--threads", "1",
                    "--models", "libra_faster_rcnn_r50_fpn", "tv_fasterrcnn"]
        else:
            argv = [self.python, "tests/benchmarks/bench_train.py", "--device", "cuda", "--iters", "3", "--warmup", "2"]
        argv += ["--json", str(out), "--time-limit", str(int(max(10, limit - 40)))]
        step, _ = self.command_step("bench_train", argv, limit)
        step["data"] = read_json(out)
        return step

    def run(self, steps: list[str]) -> int:
        functions = {name: getattr(self, f"step_{name}") for name in STEPS}
        print(f"libra GPU check ({self.results['mode']}): steps {', '.join(steps)}; budget {self.args.budget:.0f} s; "
              f"results in {self.out}", flush=True)
        if "env" not in steps:  # the other steps read it
            probe = self.runner.run("env", [self.python, str(HERE / "probe_env.py")], 60)
            self.env = python_json(probe.text) or {}
        for name in steps:
            self.run_step(name, functions[name])
        table = self.write_report()
        print(f"\nlibra GPU check ({self.results['mode']}) in {self.results['seconds']:.0f} s; "
              f"{self.out / 'gpu_check.json'}\n")
        print(table, flush=True)
        failed = [n for n, s in self.results["steps"].items() if s.get("status") not in ("ok", "skipped")]
        return 1 if failed else 0


def default_out() -> str:
    return os.environ.get("OUT") or str(REPO / "work_dirs" / "gpu_check")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="See tests/gpu/README.md.")
    parser.add_argument("--dry", action="store_true", default=os.environ.get("LIBRA_GPU_DRY") == "1",
                        help="CPU dry run at tiny sizes (also LIBRA_GPU_DRY=1)")
    parser.add_argument("--out", default=None, help="results folder (default $OUT, else work_dirs/gpu_check)")
    parser.add_argument("--work", default=None, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--wheels", default=None, help="folder with pycocotools-*.whl for an offline install")
    parser.add_argument("--budget", type=float, default=None, help="seconds for all steps (default 555; --dry 600)")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    parser.add_argument("--skip", default="", help="comma-separated steps to leave out")
    parser.add_argument("--no-build", action="store_true", help="keep the libra._C that is there (check it only)")
    parser.add_argument("--python", default=None, help="interpreter for the steps (default: this one)")
    parser.add_argument("--verbose", action="store_true", help="echo the steps' output")
    args = parser.parse_args(argv)
    args.out = args.out or default_out()
    if args.budget is None:
        args.budget = 600.0 if args.dry else 555.0
    chosen = [s.strip() for s in args.steps.split(",") if s.strip()]
    skipped = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = sorted((set(chosen) | skipped) - set(STEPS))
    if unknown:
        parser.error(f"unknown step(s) {', '.join(unknown)}; steps: {', '.join(STEPS)}")
    args.step_list = [s for s in STEPS if s in chosen and s not in skipped]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check = Check(args)

    def interrupted(signum, frame):  # noqa: ARG001
        if check.runner.current is not None:
            Runner.stop(check.runner.current)
        check.results["interrupted"] = signal.Signals(signum).name
        print(f"\ninterrupted ({signal.Signals(signum).name}); partial results:\n\n{check.write_report()}", flush=True)
        sys.exit(130)

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    return check.run(args.step_list)


if __name__ == "__main__":
    sys.exit(main())
