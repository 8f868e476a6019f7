"""scripts/rehearse_scale.py at a tiny count: every stage runs on the synthetic VOC-like set
and the table has its columns (issue 17). Slow: nine stage processes."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "rehearse_scale.py"
HEADER = "| stage | split | images | peak RSS (MiB) | wall (s) | written (MiB) |"


def _script():
    spec = importlib.util.spec_from_file_location("rehearse_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_proposal_windows_are_valid_mat_boxes_and_cover_the_objects():
    rehearse = _script()
    rng = np.random.default_rng(0)
    gt = rehearse.random_boxes(rng, 375, 500, 3)
    windows = rehearse.proposal_windows(rng, 375, 500, gt, 2000)
    assert windows.shape == (2000, 4) and windows.dtype == np.uint16
    y1, x1, y2, x2 = windows.astype(int).T
    assert (x1 >= 1).all() and (y1 >= 1).all() and (x2 <= 500).all() and (y2 <= 375).all()
    assert (x2 - x1 >= rehearse.PROPOSAL_MIN_SIDE - 1).all()
    assert (y2 - y1 >= rehearse.PROPOSAL_MIN_SIDE - 1).all()
    xyxy = torch.from_numpy(np.stack([x1 - 1, y1 - 1, x2, y2], axis=1).astype(np.float32))
    gt_xyxy = torch.from_numpy(gt.astype(np.float32)) - torch.tensor([1.0, 1.0, 0.0, 0.0])
    best = box_iou(gt_xyxy, xyxy).max(dim=1).values
    assert (best > 0.7).all()  # like selective search, windows close to every object


@pytest.mark.slow
def test_tiny_rehearsal_runs_every_stage(tmp_path):
    out = tmp_path / "table.md"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--sweep", "6,8", "--test-images", "3", "--windows", "150",
         "--channels", "8", "--fc-dim", "32", "--iterations", "3",
         "--work", str(tmp_path / "work"), "--out", str(out)],
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert HEADER in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    stages = {row.split("|")[1].strip() for row in rows}
    assert {"propose", "extract", "finetune", "train-svm", "train-bbox", "test", "eval"} <= stages
    body = [row for row in rows if row.split("|")[3].strip().replace(",", "").isdigit()]
    assert len(body) == 2 * 9  # nine stage runs for each of the two counts
    for row in body:
        peak = float(row.split("|")[4].replace(",", ""))
        assert peak > 0, row
    assert "MiB per 1,000 images" in text  # the growth table of a sweep
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())
