"""scripts/gpu_check.sh: its dry run on the CPU, so that it cannot rot between GPU loans, and the
proposal file that lets the CUDA tests run without OpenCV's contrib modules."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from spp_detect.data.proposals import load_mat_proposals
from spp_detect.data.toy import TOY_CLASSES
from spp_detect.data.voc import read_split
from spp_detect.testing import write_proposal_mat

REPO = Path(__file__).resolve().parents[1]
# Rows of the table per step: the CUDA tests' counts, 2 settings × (zf5 fp32/bf16, Lite0 fp32)
# of the test time, per trunk (zf5, Lite0) R-CNN, SPP at 1 and 5 scales and at 1 scale with svd
# and int8, extraction at 1 and 5 scales.
EXPECTED_ROWS = {"pytest -m cuda": 1, "test time": 6, "SPP vs R-CNN": 10, "extract": 2}


def table_rows(report: str) -> list[list[str]]:
    """The cells of the markdown table's body rows."""
    lines = [line for line in report.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[2:]]


@pytest.mark.slow  # five Python processes, each importing torch: about a minute on 2 cores
def test_dry_run_writes_one_table(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(
        [str(REPO / "scripts/gpu_check.sh"), "--dry-run"],
        capture_output=True, text=True, env=env, timeout=900, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    report = (tmp_path / "gpu_check.md").read_text()
    assert report in done.stdout
    assert "- mode: dry run" in report and "- torch " in report and "numpy" in report
    rows = table_rows(report)
    counts = {step: sum(row[0] == step for row in rows) for step in EXPECTED_ROWS}
    assert counts == EXPECTED_ROWS, rows
    assert all(row[4] == "ok" for row in rows), rows
    # no CUDA here: the CUDA tests ran with the CPU as their device, but those of CUDA-only APIs
    passed, failed, skipped = (int(part.split()[0]) for part in rows[0][2].split(", "))
    assert passed >= 8 and failed == 0 and skipped >= 1, rows[0]
    assert all("ms/image" in row[2] for row in rows[1:]), rows
    assert len(list((tmp_path / "gpu_check_logs").glob("*.log"))) == 7  # one per step


# Hides OpenCV's contrib module ximgproc, as on the GPU machine, then imports every module.
WITHOUT_XIMGPROC = """
import importlib, pkgutil, sys
import cv2
if hasattr(cv2, "ximgproc"):
    delattr(cv2, "ximgproc")
sys.modules["cv2.ximgproc"] = None
import spp_detect
for module in pkgutil.walk_packages(spp_detect.__path__, "spp_detect."):
    importlib.import_module(module.name)
print(hasattr(cv2, "ximgproc"))
"""


def test_every_module_imports_without_ximgproc():
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_XIMGPROC], capture_output=True, text=True, timeout=300,
        cwd=REPO, check=False,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout == "False\n", done.stderr


def test_proposal_mat_covers_every_object(toy_root, tmp_path):
    records = read_split(toy_root, "test", TOY_CLASSES)
    path = write_proposal_mat(tmp_path / "proposals.mat", records, per_image=50)
    boxes = load_mat_proposals(path, [r.image_id for r in records])
    for record in records:
        found = torch.from_numpy(boxes[record.image_id])
        height, width = record.image_hw
        assert found.shape == (50, 4)
        assert bool((found[:, :2] >= 0).all() and (found[:, 2:] > found[:, :2]).all())
        assert bool((found[:, 2] <= width).all() and (found[:, 3] <= height).all())
        overlaps = box_iou(torch.from_numpy(np.asarray(record.gt_boxes)), found)
        assert bool((overlaps.max(dim=1).values >= 0.7).all())  # positives for every object
        assert bool((overlaps.max(dim=0).values < 0.3).any())  # and background windows


def test_a_missing_module_is_named_before_any_step(tmp_path):
    """On a bare GPU machine, a module the check needs and that was not carried is one line."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(  # the interpreter imports it first: sklearn "missing"
        "import importlib.util\n"
        "real = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a: None if name == 'sklearn' else "
        "real(name, *a)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(hide)}
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts/gpu_check.py"), "--dry-run"],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip().splitlines() == [
        "gpu_check: Python modules missing here: sklearn; carry their wheels (unpacked) on "
        "PYTHONPATH and rerun"
    ]
    assert "GPU check" not in done.stdout
