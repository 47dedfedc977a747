"""The README's Python snippets, run verbatim (issue 22): every ```python block, in order, in one
namespace (later blocks use what earlier ones defined, as a reader following the README does).

The files the snippets name and a reader would have (released MMDetection checkpoints, a trained
work dir, a photo) are made beforehand in the snippets' working directory: the MMDetection files
with the released key layout (an independently written inverse of the importer's mapping,
``test_mmdet_checkpoint``), the work dir by a 2-iteration ``train.py`` run.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
SNIPPETS = re.findall(r"```python\n(.*?)```", README, re.S)
MMDET_FILES = {  # file the README names -> (preset, single neck)
    "libra_faster_rcnn_r50_fpn_1x_coco_20200130-3afee3a9.pth": ("libra_faster_rcnn_r50_fpn", False),
    "faster_rcnn_r50_fpn_1x_coco_20200130-047c8118.pth": ("faster_rcnn_r50_fpn", True),
    "mask_rcnn_r50_fpn_1x_coco_20200205-d4b0c5d6.pth": ("mask_rcnn_r50_fpn", True),
}

pytestmark = pytest.mark.usefixtures("single_thread")


def test_the_readme_has_python_snippets():
    assert len(SNIPPETS) >= 5
    code = "\n".join(line.split("#")[0] for snippet in SNIPPETS for line in snippet.splitlines())
    names = set(re.findall(r'"([\w./-]+\.pth)"', code))
    assert names <= set(MMDET_FILES), names - set(MMDET_FILES)  # every file a snippet loads is prepared below


def test_every_python_snippet_runs_verbatim(tmp_path, monkeypatch):
    from test_mmdet_checkpoint import fake_mmdet

    from libra.presets import build_model

    for name, (preset, single_neck) in MMDET_FILES.items():
        if name in "".join(SNIPPETS):
            torch.save({"state_dict": fake_mmdet(build_model(preset, 80), single_neck), "meta": {}}, tmp_path / name)
    sys.path.insert(0, str(REPO))
    import train

    work = "work_dirs/libra_faster_rcnn_r50_fpn_synthetic"
    monkeypatch.chdir(tmp_path)
    assert train.main(["--synthetic-num-train", "8", "--synthetic-num-val", "2", "--width-per-group", "8",
                       "--set", "fpn_channels=32", "--set", "fc_channels=32", "--max-iters", "2", "--no-eval",
                       "--threads", "1", "--work-dir", work]) == 0
    (tmp_path / "photos").mkdir()
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)).save("photos/a.jpg")
    namespace: dict = {"__name__": "readme"}
    for index, snippet in enumerate(SNIPPETS):
        try:
            exec(compile(snippet, f"README.md python block {index + 1}", "exec"), namespace)
        except Exception as error:  # noqa: BLE001 - name the block that failed
            raise AssertionError(f"README python block {index + 1} failed: {type(error).__name__}: {error}\n{snippet}") from error
    # What the snippets promise.
    assert isinstance(namespace["detections"], list) and "masks" in namespace["detections"][0]
    assert {"loss_mask", "loss_cls"} <= set(namespace["losses"])
    assert "file_name" in namespace["results"][0] and os.path.samefile(namespace["results"][0]["file_name"], "photos/a.jpg")
