"""Regenerate (and check) the README's number for the default run: ``python train.py`` as shipped.

    python tests/benchmarks/readme_numbers.py              # trains the default job (~10 min on 2 cores)
    python tests/benchmarks/readme_numbers.py --work-dir work_dirs/libra_faster_rcnn_r50_fpn_synthetic
                                                            # reads a finished default run instead

Prints the sentence the README states ("box AP ... / AP50 ... / AP75 ... with torch X") and exits
1 when the README states other values, so a change that moves the default run's result is noticed.
The default run is deterministic on the CPU for a given torch version (same data, seeds and
order); another torch version may differ in the last digits.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
README_PATTERN = re.compile(r"box AP ([0-9.]+) / AP50 ([0-9.]+) / AP75 ([0-9.]+) with torch ([0-9.]+)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default=None, help="a finished default run to read instead of training one")
    args = parser.parse_args(argv)
    minutes = None
    if args.work_dir is None:
        sys.path.insert(0, str(REPO))
        import train

        work = Path(tempfile.mkdtemp(prefix="libra_default_run_"))
        start = time.perf_counter()
        code = train.main(["--work-dir", str(work / "run"), "--data-root", str(work / "data")])
        minutes = (time.perf_counter() - start) / 60
        if code != 0:
            return code
        metrics_file = work / "run" / "metrics.json"
    else:
        metrics_file = Path(args.work_dir) / "metrics.json"
    metrics = json.loads(metrics_file.read_text())
    version = torch.__version__.split("+")[0]
    measured = (f"{metrics['AP']:.3f}", f"{metrics['AP50']:.3f}", f"{metrics['AP75']:.3f}")
    sentence = f"box AP {measured[0]} / AP50 {measured[1]} / AP75 {measured[2]} with torch {version}"
    print(sentence + (f" ({minutes:.1f} min)" if minutes is not None else ""))
    stated = README_PATTERN.search((REPO / "README.md").read_text())
    if stated is None:
        print("the README states no default-run number in the form above")
        return 1
    if stated.groups()[:3] != measured:
        print(f"the README states {stated.group(0)!r}: update it to {sentence!r}")
        return 1
    print("the README's number is the one this code produces")
    return 0


if __name__ == "__main__":
    sys.exit(main())
