"""`spp-detect propose`: outputs, toy recall, reproducibility, resume, .mat import, failure path."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from click.testing import CliRunner

from spp_detect.cli import cli
from spp_detect.config import load_config
from spp_detect.data.image import read_image
from spp_detect.errors import UserError
from spp_detect.runtime.artifacts import load_json, load_npz, save_npz
from spp_detect.runtime.run_dir import RunDir
from spp_detect.runtime.workers import run_jobs
from spp_detect.stages import propose as propose_stage
from spp_detect.stages.context import StageContext
from spp_detect.stages.propose import ProposalJob, run_propose, save_proposals

TOY_CLASSES = "data.classes=[circle, square, triangle]"
CRASH_ID = "trainval_00003"  # the image whose worker dies in the crash tests


def _context(root: Path, run: Path, *overrides: str, workers: int = 2, limit=None, force=False):
    config = load_config(None, [f"data.root={root}", TOY_CLASSES, *overrides])
    return StageContext(config, RunDir(run), "cpu", workers, limit, force)


def _cli_args(root: Path, run: Path, *extra: str) -> list[str]:
    return [
        "propose",
        "--run-dir",
        str(run),
        "--set",
        f"data.root={root}",
        "--set",
        TOY_CLASSES,
        *extra,
    ]


# Job functions below run in spawned worker processes, which import this module by name.


def fake_proposals(job: ProposalJob) -> int:
    """Cheap stand-in for selective search: reads the image, writes one whole-image box."""
    height, width = read_image(job.image_path).shape[:2]
    save_proposals(
        job.out_path, np.array([[0, 0, width, height]], np.float32), job.fingerprint, 0.0
    )
    return 1


def crash_on_target(job: ProposalJob) -> int:
    """Kills its worker process on CRASH_ID, as a segfault inside OpenCV would."""
    if job.image_id == CRASH_ID:
        os._exit(1)
    return fake_proposals(job)


def _truncate_jpeg(path: Path) -> bytes:
    """Cut a JPEG before its scan data (header parses, decoding fails); returns the old bytes."""
    data = path.read_bytes()
    path.write_bytes(data[: data.find(b"\xff\xda")])
    return data


@pytest.mark.slow  # selective search on the whole test split, ~9 s
def test_toy_fast_selective_search_recall(toy_root, tmp_path):
    ctx = _context(toy_root, tmp_path / "run")
    text = run_propose(ctx, "test")
    out = ctx.run_dir.proposals_dir("test")
    report = load_json(out / "report.json")
    assert report["recall"]["all"]["recall_0.5"] >= 0.9
    assert report["num_images"] == 6 and report["gt"] == "non-difficult"
    assert report["seconds_per_image"] > 0 and report["mean_boxes_per_image"] > 20
    assert set(report["recall"]) == {"100", "500", "1000", "2000", "all"}
    assert "recall@0.5" in text and "propose: 6 items" in text
    manifest = load_json(out / "manifest.json")
    assert (manifest["stage"], manifest["split"], manifest["count"]) == ("propose", "test", 6)
    for path in sorted(out.glob("*.npz")):
        arrays = load_npz(path)
        boxes = arrays["boxes"]
        assert boxes.dtype == np.float32 and boxes.ndim == 2 and boxes.shape[1] == 4
        sizes = boxes[:, 2:] - boxes[:, :2]
        assert sizes.min() >= 20 and len(np.unique(boxes, axis=0)) == len(boxes)
        assert float(arrays["seconds"]) > 0


@pytest.mark.slow  # selective search in two pools, ~8 s
def test_same_boxes_with_one_or_two_workers(toy_root, tmp_path):
    runs = []
    for workers in (1, 2):
        ctx = _context(toy_root, tmp_path / f"run{workers}", workers=workers, limit=3)
        run_propose(ctx, "trainval")
        out = ctx.run_dir.proposals_dir("trainval")
        runs.append({p.name: load_npz(p)["boxes"] for p in sorted(out.glob("*.npz"))})
    assert list(runs[0]) == list(runs[1]) and len(runs[0]) == 3
    for name, boxes in runs[0].items():
        np.testing.assert_array_equal(boxes, runs[1][name])  # same boxes, same order


@pytest.mark.slow  # crash + rerun through the CLI, ~5 s
def test_failures_exit_2_and_rerun_redoes_only_them(toy_copy, tmp_path, monkeypatch):
    broken = toy_copy / "JPEGImages" / "trainval_00005.jpg"
    original = _truncate_jpeg(broken)
    monkeypatch.setattr(propose_stage, "compute_proposals", crash_on_target)
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, _cli_args(toy_copy, run, "--workers", "2"))
    assert result.exit_code == 2, result.output
    message = result.output.strip().splitlines()[-1]
    assert "2 of 12 images failed" in message
    assert f"{CRASH_ID} (the worker process crashed" in message
    assert "trainval_00005 (UserError:" in message and "not a readable image" in message
    out = RunDir(run).proposals_dir("trainval")
    done = sorted(p.stem for p in out.glob("*.npz"))
    assert len(done) == 10 and CRASH_ID not in done and "trainval_00005" not in done
    assert not (out / "manifest.json").exists()
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npz")}
    # fix the image, stop the crashes: the rerun computes the two failures only
    broken.write_bytes(original)
    monkeypatch.setattr(propose_stage, "compute_proposals", fake_proposals)
    result = CliRunner().invoke(cli, _cli_args(toy_copy, run, "--workers", "2"))
    assert result.exit_code == 0, result.output
    assert "propose: 2 items" in result.output and "10 already done" in result.output
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.npz") if p.name in stamps} == stamps
    assert len(list(out.glob("*.npz"))) == 12 and (out / "manifest.json").is_file()


def slow_crash_on_target(job: ProposalJob) -> int:
    """Crashes on CRASH_ID; otherwise takes 0.3 s and records the worker's process id."""
    if job.image_id == CRASH_ID:
        os._exit(1)
    time.sleep(0.3)
    save_npz(job.out_path, boxes=np.zeros((0, 4), np.float32), pid=np.int64(os.getpid()))
    return 0


@pytest.mark.slow  # worker crash and retries, ~6 s
def test_run_jobs_isolates_a_crash_among_many(toy_root, tmp_path):
    images = sorted((toy_root / "JPEGImages").glob("trainval_*.jpg"))[:8]
    jobs = [ProposalJob(p.stem, str(p), str(tmp_path / f"{p.stem}.npz")) for p in images]
    failures = run_jobs(jobs, workers=2, job_fn=slow_crash_on_target)
    assert list(failures) == [CRASH_ID] and "crashed" in failures[CRASH_ID]
    written = sorted(p.stem for p in tmp_path.glob("*.npz"))
    assert written == sorted(p.stem for p in images if p.stem != CRASH_ID)
    # after the crash and the one-at-a-time retries, the rest run on two processes again
    last_pids = {int(load_npz(tmp_path / f"{p.stem}.npz")["pid"]) for p in images[-4:]}
    assert len(last_pids) == 2


@pytest.mark.slow  # kill/resume, four propose runs, ~8 s
def test_resume_after_a_simulated_kill(toy_root, tmp_path, monkeypatch):
    monkeypatch.setattr(propose_stage, "compute_proposals", fake_proposals)
    ctx = _context(toy_root, tmp_path / "run")
    run_propose(ctx, "trainval")
    out = ctx.run_dir.proposals_dir("trainval")
    # what a kill leaves: no manifest, some images missing, a half-written temporary file
    (out / "manifest.json").unlink()
    for name in ("trainval_00002.npz", "trainval_00009.npz"):
        (out / name).unlink()
    (out / ".trainval_00002.npz.abc123.tmp").write_bytes(b"half")
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npz")}
    text = run_propose(ctx, "trainval")
    assert "propose: 2 items" in text and "10 already done" in text
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.npz") if p.name in stamps} == stamps
    assert len(list(out.glob("*.npz"))) == 12 and not list(out.glob(".*.tmp"))
    assert load_json(out / "manifest.json")["count"] == 12
    forced = _context(toy_root, tmp_path / "run", force=True)
    assert "propose: 12 items" in run_propose(forced, "trainval")
    # files made with another propose config are not reused, even without --force
    other = _context(toy_root, tmp_path / "run", "propose.min_size=30")
    assert "propose: 12 items" in run_propose(other, "trainval")
    assert "propose: 0 items" in run_propose(other, "trainval")  # and now they are reused


def _process_group_alive(pgid: int) -> bool:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, …
            return True
    return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_resume_after_a_real_kill(toy_root, tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-c", "from spp_detect.cli import main; main()"]
    args = _cli_args(toy_root, run, "--workers", "2")
    process = subprocess.Popen(
        command + args, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    out = RunDir(run).proposals_dir("trainval")
    deadline = time.monotonic() + 60
    while len(list(out.glob("*.npz"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    process.kill()  # SIGKILL to the stage process only: its workers are orphaned
    process.wait()
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npz")}
    assert 3 <= len(done) < 12 and not (out / "manifest.json").exists()
    deadline = time.monotonic() + 20
    while _process_group_alive(process.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _process_group_alive(process.pid), "orphaned workers did not exit"
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npz")}  # orphans may add one
    text = run_propose(_context(toy_root, run), "trainval")
    assert f"{len(done)} already done" in text
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.npz") if p.name in done} == done
    assert load_json(out / "manifest.json")["count"] == 12


def test_mat_method_imports_and_filters(toy_root, tmp_path):
    ids = [f"test_{i:05d}" for i in range(1, 7)]
    images = np.empty((len(ids), 1), dtype=object)
    cells = np.empty((1, len(ids)), dtype=object)
    for i, image_id in enumerate(ids):
        images[i, 0] = image_id
        # [y1 x1 y2 x2] 1-based: a 30 × 40 box, a duplicate, a 10-px box, one past the image
        cells[0, i] = np.array(
            [[11, 21, 40, 60], [11, 21, 40, 60], [1, 1, 10, 10], [1, 1, 5000, 5000]], np.float64
        )
    mat = tmp_path / "ss.mat"
    scipy.io.savemat(mat, {"images": images, "boxes": cells})
    ctx = _context(toy_root, tmp_path / "run", "propose.method=mat", f"propose.mat_file={mat}")
    text = run_propose(ctx, "test")
    assert "recall@0.5" in text and "time unknown" in text
    out = ctx.run_dir.proposals_dir("test")
    for image_id in ids:
        height, width = read_image(toy_root / "JPEGImages" / f"{image_id}.jpg").shape[:2]
        boxes = load_npz(out / f"{image_id}.npz")["boxes"]
        np.testing.assert_array_equal(boxes, [[20, 10, 60, 40], [0, 0, width, height]])
    missing = _context(toy_root, tmp_path / "run2", "propose.method=mat", f"propose.mat_file={mat}")
    with pytest.raises(UserError, match="no boxes for 12 image"):
        run_propose(missing, "trainval")


def test_report_only_and_bad_config(toy_root, tmp_path, monkeypatch):
    ctx = _context(toy_root, tmp_path / "run", limit=2)
    with pytest.raises(UserError, match="no proposals for 2 of 2 images"):
        run_propose(ctx, "test", report_only=True)
    monkeypatch.setattr(propose_stage, "compute_proposals", fake_proposals)
    run_propose(ctx, "test")
    report_path = ctx.run_dir.proposals_dir("test") / "report.json"
    report_path.unlink()
    text = run_propose(ctx, "test", report_only=True)
    assert report_path.is_file() and "recall@0.5" in text
    for override, match in [  # names fail when the config loads
        ("propose.method=sliding", "propose.method"),
        ("propose.mode=best", "propose.mode"),
    ]:
        with pytest.raises(UserError, match=match):
            _context(toy_root, tmp_path / "bad", override)
    for override, match in [  # model files when the stage starts
        ("propose.edge_model=/nonexistent/model.yml.gz", "model.yml.gz: structured-edge model not"),
        (f"propose.edge_model={toy_root / 'toy.json'}", "not a structured-edge model"),
    ]:
        bad = _context(toy_root, tmp_path / "bad", override, "propose.method=edge_boxes")
        with pytest.raises(UserError, match=match):
            run_propose(bad, "test")


def test_another_dataset_with_the_same_ids_is_proposed_again(tmp_path, monkeypatch):
    """A run directory pointed at another data.root (same image ids, other pictures) or at
    images rewritten in place must not keep the old proposals."""
    from spp_detect.data.toy import make_toy_dataset

    monkeypatch.setattr(propose_stage, "compute_proposals", fake_proposals)
    first, second = tmp_path / "first", tmp_path / "second"
    make_toy_dataset(first, num_train=3, num_test=1, seed=0)
    make_toy_dataset(second, num_train=3, num_test=1, seed=5)
    run = tmp_path / "run"
    assert "3 items" in run_propose(_context(first, run, workers=1), "trainval")
    text = run_propose(_context(second, run, workers=1), "trainval")
    assert "propose: 3 items" in text and "already done" not in text
    assert "3 already done" in run_propose(_context(second, run, workers=1), "trainval")
    # the same folder regenerated in place (new files, same paths)
    make_toy_dataset(second, num_train=3, num_test=1, seed=7)
    text = run_propose(_context(second, run, workers=1), "trainval")
    assert "propose: 3 items" in text and "already done" not in text


@pytest.mark.parametrize("method", ["selective_search", "edge_boxes"])
def test_opencv_without_contrib_is_one_line_naming_the_fix(toy_root, tmp_path, monkeypatch, method):
    """opencv-python beside opencv-contrib-python-headless shadows its cv2: propose stops before
    any image with the reinstall to do, instead of failing every image; .mat proposals still
    work, and so does the Python API's propose_image with a UserError."""
    import types

    from spp_detect.data import proposals

    without_contrib = types.SimpleNamespace(__version__="4.10.0")
    monkeypatch.setattr(proposals, "cv2", without_contrib)
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, _cli_args(toy_root, run, "--set", f"propose.method={method}"))
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]
    assert f"propose.method={method}: this OpenCV (4.10.0) lacks" in line
    assert "pip install opencv-contrib-python-headless" in line and "propose.method=mat" in line
    assert not list(RunDir(run).proposals_dir("trainval").glob("*"))
    with pytest.raises(UserError, match="lacks the contrib module"):
        proposals.propose_image(np.zeros((20, 20, 3), np.uint8), method)


def test_an_image_too_long_to_propose_on_quickly_names_propose_max_side(caplog):
    """A 30,000 x 200 image made no progress for minutes without a hint (issue 27)."""
    from spp_detect.structures import ImageRecord

    def record(height: int, width: int) -> ImageRecord:
        empty = np.zeros((0, 4), np.float32)
        path = Path(f"/data/{height}x{width}.jpg")
        return ImageRecord(path.stem, path, height, width, empty, np.zeros(0), np.zeros(0, bool))

    images = [record(375, 500), record(200, 30_000)]
    with caplog.at_level("WARNING", logger="spp_detect.stages.propose"):
        propose_stage.hint_max_side(images, max_side=0)
    assert (
        "1 image(s) with a side over 4000 px (e.g. /data/200x30000.jpg, 30000x200)" in caplog.text
    )
    assert "set propose.max_side (e.g. 1000)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="spp_detect.stages.propose"):
        propose_stage.hint_max_side(images, max_side=1000)  # downscaled: no hint
    assert not caplog.text
