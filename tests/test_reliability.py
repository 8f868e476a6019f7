"""Never a silently wrong result: files checked on every read, one writer per stage, write
errors and Ctrl-C as one line, make-like `run`, truncated images (issue 18).

Each test here failed before the fix it names. The kill -9 / corruption / stale-data matrix
at scale is `scripts/fault_suite.py` (its CI slice: tests/test_fault_suite.py).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from spp_detect.cli import cli
from spp_detect.config import load_config
from spp_detect.data.image import image_size, read_image
from spp_detect.errors import UserError
from spp_detect.runtime import artifacts, locks
from spp_detect.runtime.artifacts import load_npz, save_npz, save_torch
from spp_detect.runtime.run_dir import RunDir
from spp_detect.stages.builders import load_proposals, open_feature_source
from spp_detect.stages.context import split_records
from spp_detect.stages.manifests import is_current, require_manifest

TOY = ["data.classes=[circle,square,triangle]", "extract.scales=[96]", "propose.max_side=200"]


def _sets(root: Path, *extra: str) -> list[str]:
    return [part for item in [f"data.root={root}", *TOY, *extra] for part in ("--set", item)]


def _invoke(verb: str, root: Path, run: Path, *args: str):
    command = [verb, "--run-dir", str(run), "--device", "cpu", "--workers", "1", *args]
    return CliRunner().invoke(cli, command + _sets(root))


def _config(root: Path, *extra: str):
    return load_config(None, [f"data.root={root}", *TOY, *extra])


def _error_line(result) -> str:
    """The one line a refused command printed (its output holds no traceback)."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.fixture(scope="module")
def small_run(toy_root: Path, tmp_path_factory) -> Path:
    """Proposals and conv5 maps of the first 3 training images of the toy set."""
    run = tmp_path_factory.mktemp("reliability") / "run"
    for verb in ("propose", "extract"):
        result = _invoke(verb, toy_root, run, "--limit", "3")
        assert result.exit_code == 0, result.output
    return run


@pytest.fixture
def run_copy(small_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(small_run, tmp_path / "run"))


def _tamper(path: Path, **changes) -> None:
    """Rewrite a per-item .npz with some arrays replaced (another origin, as a second writer
    with other settings would leave it)."""
    arrays = load_npz(path)
    arrays.update(changes)
    save_npz(path, **arrays)


# --- files checked when read, not only when skipped ------------------------------------------


def test_conv5_maps_of_another_origin_are_refused_when_read(toy_root, run_copy):
    config = _config(toy_root)
    record = split_records(config, "trainval", 3)[1]
    _tamper(RunDir(run_copy).feature_path("trainval", record.image_id), fingerprint="other")
    source = open_feature_source(config, RunDir(run_copy), "trainval", "cpu")
    source.maps(split_records(config, "trainval", 3)[0])  # the untouched ones still read
    with pytest.raises(UserError, match=r"conv5 maps made from other inputs.*spp-detect extract"):
        source.maps(record)


def test_proposals_of_another_origin_are_refused_when_read(toy_root, run_copy):
    config = _config(toy_root)
    record = split_records(config, "trainval", 3)[0]
    run_dir = RunDir(run_copy)
    assert len(load_proposals(config, run_dir, "trainval", record))
    _tamper(run_dir.proposal_path("trainval", record.image_id), fingerprint="other")
    with pytest.raises(UserError, match=r"other inputs.*spp-detect propose --split trainval"):
        load_proposals(config, run_dir, "trainval", record)


def test_a_regenerated_image_makes_its_cached_maps_stale(toy_copy, tmp_path, small_run):
    root = toy_copy
    run = Path(shutil.copytree(small_run, tmp_path / "run"))
    config = _config(root)
    for verb in ("propose", "extract"):  # this dataset's own items (paths differ from toy_root)
        assert _invoke(verb, root, run, "--limit", "3").exit_code == 0
    record = split_records(config, "trainval", 3)[2]
    os.utime(record.path, ns=(1, 1))  # same bytes, another modification time: another file
    source = open_feature_source(config, RunDir(run), "trainval", "cpu")
    with pytest.raises(UserError, match="other inputs"):
        source.maps(split_records(config, "trainval", 3)[2])


def test_a_weights_file_rewritten_under_its_name_makes_the_maps_stale(toy_root, tmp_path):
    from spp_detect.models.weights import build_backbone, trunk_state

    weights = tmp_path / "zf5.pt"
    save_torch(weights, trunk_state(build_backbone("zf5", "none")))
    run, settings = tmp_path / "run", (f"extract.weights={weights}", "extract.backbone=zf5")
    result = CliRunner().invoke(
        cli, ["extract", "--run-dir", str(run), "--device", "cpu", "--limit", "2",
              *_sets(toy_root, *settings)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    config = _config(toy_root, *settings)
    record = split_records(config, "trainval", 2)[0]
    open_feature_source(config, RunDir(run), "trainval", "cpu").maps(record)
    torch.manual_seed(1)
    save_torch(weights, trunk_state(build_backbone("zf5", "none")))  # converted again
    with pytest.raises(UserError, match="other inputs"):
        open_feature_source(config, RunDir(run), "trainval", "cpu").maps(record)


# --- one writer per run directory and stage ---------------------------------------------------


def test_a_second_writer_is_refused_naming_the_first(toy_root, run_copy):
    lock = RunDir(run_copy).lock_path("extract", "trainval")
    with locks.exclusive(lock, "extract"):
        line = _error_line(_invoke("extract", toy_root, run_copy, "--limit", "3"))
    assert f"pid {os.getpid()}" in line and "already writing extract" in line
    assert _invoke("extract", toy_root, run_copy, "--limit", "3").exit_code == 0  # released


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    lock = tmp_path / ".locks" / "extract.trainval.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from spp_detect.runtime import locks\n"
         "with locks.exclusive(Path(sys.argv[1]), 'x'):\n    print('held', flush=True); "
         "time.sleep(60)", str(lock)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(UserError, match=f"pid {holder.pid}"), locks.exclusive(lock, "x"):
        pass
    holder.kill()
    holder.wait()
    with locks.exclusive(lock, "x"):  # the kernel released it with the process
        pass


def test_other_torchrun_ranks_do_not_take_the_lock(tmp_path, monkeypatch):
    lock = tmp_path / "x.lock"
    with locks.exclusive(lock, "x"):
        monkeypatch.setenv("RANK", "1")
        with locks.exclusive(lock, "x"):  # rank 0 holds it for the job
            pass


def test_stale_temporaries_are_removed_when_a_stage_starts(toy_root, run_copy):
    folder = RunDir(run_copy).features_dir("trainval")
    stale = folder / ".000001.npz.abc123.tmp"
    stale.write_bytes(b"half a file")
    assert _invoke("extract", toy_root, run_copy, "--limit", "3").exit_code == 0
    assert not stale.exists()


# --- write errors and Ctrl-C ----------------------------------------------------------------


def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(toy_root, run_copy, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "savez", full)
    line = _error_line(_invoke("extract", toy_root, run_copy, "--limit", "3", "--force"))
    assert "could not write" in line and "needed" in line and "bytes free" in line
    assert "disk is full" in line
    folder = RunDir(run_copy).features_dir("trainval")
    assert not list(folder.glob(".*.tmp"))
    assert not (folder / "manifest.json").exists()  # the stage is not closed


def test_extract_refuses_to_start_without_room_for_its_cache(toy_root, tmp_path, monkeypatch):
    monkeypatch.setattr(artifacts, "free_bytes", lambda folder: 1000)
    line = _error_line(_invoke("extract", toy_root, tmp_path / "run", "--limit", "2"))
    assert re.search(r"the conv5 cache needs about [\d,]+ bytes, 1,000 are free", line), line
    assert not list((tmp_path / "run").glob("features/trainval/*.npz"))


def test_finetune_refuses_to_start_without_room_for_its_checkpoints(
    toy_root, run_copy, monkeypatch
):
    monkeypatch.setattr(artifacts, "free_bytes", lambda folder: 1000)
    tiny = ["--set", "finetune.iterations=2", "--set", "finetune.fc_dim=16"]
    line = _error_line(_invoke("finetune", toy_root, run_copy, "--limit", "3", *tiny))
    assert "fine-tuning checkpoints needs about" in line and "1,000 are free" in line


@pytest.mark.parametrize(
    ("code", "fix"),
    [
        (errno.EROFS, "read-only"),
        (errno.EACCES, "permission"),
        (errno.EIO, "I/O error"),
        (errno.ENOTDIR, "is a file, not a folder"),
        (errno.ENAMETOOLONG, "longer than the file system allows"),
    ],
)
def test_each_write_error_names_the_path_and_the_fix(tmp_path, monkeypatch, code, fix):
    def failing(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(np, "savez", failing)
    target = tmp_path / "out" / "a.npz"
    with pytest.raises(UserError, match=rf"{target}: could not write.*{fix}"):
        save_npz(target, x=np.zeros(3))
    assert not list(target.parent.glob(".*"))


def test_torch_iostream_failure_on_a_full_disk_is_named(tmp_path, monkeypatch):
    def failing(obj, handle):
        handle.write(b"partial")
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(torch, "save", failing)
    monkeypatch.setattr(artifacts, "free_bytes", lambda folder: 1000)
    with pytest.raises(UserError, match=r"checkpoint\.pt: could not write.*disk is full"):
        save_torch(tmp_path / "checkpoint.pt", {"w": torch.zeros(1000)})
    assert not list(tmp_path.iterdir())


def test_ctrl_c_ends_with_exit_130_and_the_resume_hint(toy_root, run_copy, monkeypatch):
    from spp_detect.stages import extract

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(extract, "_extract_all", interrupted)
    result = _invoke("extract", toy_root, run_copy, "--limit", "3", "--force")
    assert result.exit_code == 130
    assert result.output.strip().splitlines()[-1] == "interrupted; rerun to resume"


# --- `run` is make-like -----------------------------------------------------------------------


def test_a_split_left_partial_by_limit_is_not_current(toy_root, run_copy):
    config, run_dir = _config(toy_root), RunDir(run_copy)
    assert is_current(config, run_dir, "propose", "trainval", limit=3)
    assert not is_current(config, run_dir, "propose", "trainval", limit=None)


def test_an_upstream_rerun_makes_the_downstream_stale(toy_root, run_copy):
    tiny = ["--set", "finetune.iterations=2", "--set", "finetune.fc_dim=16"]
    config, run_dir = (
        _config(toy_root, "finetune.iterations=2", "finetune.fc_dim=16"),
        RunDir(run_copy),
    )
    assert _invoke("finetune", toy_root, run_copy, "--limit", "3", *tiny).exit_code == 0
    assert is_current(config, run_dir, "finetune", "trainval", limit=3)
    # the same config and images: only the proposal files are new
    assert _invoke("propose", toy_root, run_copy, "--limit", "3", "--force").exit_code == 0
    assert not is_current(config, run_dir, "finetune", "trainval", limit=3)


def test_a_dataset_regenerated_in_place_makes_every_stage_stale(toy_copy, tmp_path, small_run):
    from spp_detect.data.toy import make_toy_dataset

    root = toy_copy
    run = Path(shutil.copytree(small_run, tmp_path / "run"))
    config, run_dir = _config(root), RunDir(run)
    for verb in ("propose", "extract"):
        assert _invoke(verb, root, run, "--limit", "3").exit_code == 0
    assert is_current(config, run_dir, "extract", "trainval", limit=3)
    make_toy_dataset(root, num_train=12, num_test=6, seed=5)  # same ids, other images and boxes
    for stage in ("propose", "extract"):
        assert not is_current(config, run_dir, stage, "trainval", limit=3)


def test_a_dataset_reannotated_in_place_makes_the_stage_stale(toy_copy, tmp_path, small_run):
    root = toy_copy
    run = Path(shutil.copytree(small_run, tmp_path / "run"))
    config, run_dir = _config(root), RunDir(run)
    assert _invoke("propose", root, run, "--limit", "3").exit_code == 0
    record = split_records(config, "trainval", 3)[0]
    annotation = root / "Annotations" / f"{record.image_id}.xml"
    text = annotation.read_text()
    box = f"<xmin>{int(record.gt_boxes[0, 0]) + 1}</xmin>"  # VOC's pixel numbers are 1-based
    assert box in text
    annotation.write_text(text.replace(box, f"<xmin>{int(record.gt_boxes[0, 0]) + 3}</xmin>", 1))
    assert not is_current(config, run_dir, "propose", "trainval", limit=3)


def test_finetune_trains_again_when_its_data_changed_in_place(toy_copy, tmp_path, small_run):
    root = toy_copy
    run = Path(shutil.copytree(small_run, tmp_path / "run"))
    tiny = ("finetune.iterations=2", "finetune.fc_dim=16")
    sets = [part for item in tiny for part in ("--set", item)]
    for verb in ("propose", "extract", "finetune"):
        assert _invoke(verb, root, run, "--limit", "3", *sets).exit_code == 0
    again = _invoke("finetune", root, run, "--limit", "3", *sets)
    assert "already complete" in again.output
    record = split_records(_config(root), "trainval", 3)[0]
    annotation = root / "Annotations" / f"{record.image_id}.xml"
    annotation.write_text(annotation.read_text().replace("<difficult>0", "<difficult>1", 1))
    retrained = _invoke("finetune", root, run, "--limit", "3", *sets)
    assert retrained.exit_code == 0, retrained.output
    assert "already complete" not in retrained.output


def test_a_trained_head_replaced_since_finetune_is_refused(toy_root, run_copy):
    from spp_detect.stages.builders import load_trained_head

    tiny = ("finetune.iterations=2", "finetune.fc_dim=16")
    sets = [part for item in tiny for part in ("--set", item)]
    assert _invoke("finetune", toy_root, run_copy, "--limit", "3", *sets).exit_code == 0
    config, run_dir = _config(toy_root, *tiny), RunDir(run_copy)
    load_trained_head(config, run_dir, "cpu")
    state = torch.load(run_dir.head_path, weights_only=False)
    state["fc6.weight"] = state["fc6.weight"] * 2  # another run's head, same shapes
    stat = run_dir.head_path.stat()
    torch.save(state, run_dir.head_path)
    os.utime(run_dir.head_path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(UserError, match=r"head.pt: missing, or not the file its finetune"):
        load_trained_head(config, run_dir, "cpu")


def test_a_file_changed_after_its_manifest_makes_the_stage_stale(toy_root, run_copy):
    config, run_dir = _config(toy_root), RunDir(run_copy)
    path = next(run_dir.features_dir("trainval").glob("*.npz"))
    _tamper(path)  # rewritten (as a second process would) after the manifest was closed
    assert not is_current(config, run_dir, "extract", "trainval", limit=3)


# --- images ----------------------------------------------------------------------------------


def test_a_truncated_jpeg_is_used_with_one_warning(toy_root, tmp_path, caplog):
    source = next((toy_root / "JPEGImages").glob("*.jpg"))
    whole = read_image(source)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(source.read_bytes()[:-20])
    with caplog.at_level(logging.WARNING, logger="spp_detect"):
        image = read_image(cut)
        read_image(cut)
    assert image.shape == whole.shape
    assert image_size(cut) == whole.shape[:2]  # the header check agrees with the decoder
    warnings = [r for r in caplog.records if "truncated or damaged" in r.getMessage()]
    assert len(warnings) == 1 and str(cut) in warnings[0].getMessage()


def test_an_undecodable_image_is_one_error(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 50)
    with pytest.raises(UserError, match=r"bad\.jpg: not a readable image"):
        read_image(bad)


def test_a_missing_image_is_named_without_dataset_advice(tmp_path):
    with pytest.raises(UserError, match=r"missing\.jpg: image not found; check the path$"):
        read_image(tmp_path / "missing.jpg")


# --- small items ------------------------------------------------------------------------------


def test_a_garbage_npz_message_does_not_advise_unsafe_loading(tmp_path):
    path = tmp_path / "x.npz"
    path.write_bytes(b"\x93NUMPY garbage" * 10)
    with pytest.raises(UserError) as raised:
        load_npz(path)
    assert "allow_pickle" not in str(raised.value) and "delete it and rerun" in str(raised.value)


def test_hints_to_run_an_upstream_stage_name_the_split(tmp_path):
    with pytest.raises(UserError, match=r"run `spp-detect extract --split test` first"):
        require_manifest(tmp_path, "extract", "abc", "test")


def test_a_training_split_without_any_configured_class_is_an_error(toy_root, tmp_path):
    result = CliRunner().invoke(
        cli,
        ["propose", "--run-dir", str(tmp_path / "run"), "--set", f"data.root={toy_root}",
         "--set", "data.classes=[hexagon]"],
    )  # fmt: skip
    line = _error_line(result)
    assert "trainval.txt: no box of data.classes ['hexagon']" in line


@pytest.mark.parametrize(
    "setting", ["test.nms_thresh=1.5", "finetune.fg_thresh=1.5", "finetune.bg_thresh_lo=-0.1"]
)
def test_thresholds_out_of_range_are_refused_at_load(setting):
    with pytest.raises(UserError, match=setting.split("=")[0]):
        load_config(None, [setting])


def test_a_write_error_outside_the_atomic_writer_is_one_line(toy_root, run_copy, monkeypatch):
    from spp_detect.stages import extract

    def read_only(*args, **kwargs):  # e.g. creating a folder on a read-only file system
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(run_copy / "features"))

    monkeypatch.setattr(extract, "_extract_all", read_only)
    line = _error_line(_invoke("extract", toy_root, run_copy, "--limit", "3", "--force"))
    assert f"{run_copy / 'features'}: could not write" in line and "read-only" in line


def test_a_config_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_bytes(b"name: x\n\x8b\n")
    with pytest.raises(UserError, match=r"config\.yaml: not a UTF-8 text file"):
        load_config(path, [])


def test_a_garbage_cache_file_message_does_not_advise_unsafe_loading(toy_root, run_copy):
    config = _config(toy_root)
    record = split_records(config, "trainval", 3)[0]
    RunDir(run_copy).feature_path("trainval", record.image_id).write_bytes(b"\x93NUMPY" * 40)
    with pytest.raises(UserError, match="unreadable cache file") as raised:
        open_feature_source(config, RunDir(run_copy), "trainval", "cpu").maps(record)
    assert "allow_pickle" not in str(raised.value)


def test_torch_full_disk_mid_archive_is_named(tmp_path, monkeypatch):
    def failing(obj, handle):
        raise RuntimeError(
            "[enforce fail at inline_container.cc:672] . unexpected pos 2752 vs 2646"
        )

    monkeypatch.setattr(torch, "save", failing)
    monkeypatch.setattr(artifacts, "free_bytes", lambda folder: 0)
    with pytest.raises(UserError, match="disk is full"):
        save_torch(tmp_path / "checkpoint.pt", {"w": torch.zeros(10)})


# --- inputs from the wild (issue 27) ---------------------------------------------------------

TRAINED = ["finetune.fc_dim=16", "finetune.iterations=2", "finetune.lr_steps=[1]",
           "finetune.batch_size=16", "test.bbox_reg=false"]  # fmt: skip


def _run_verb(verb: str, root: Path, run: Path, *args: str, extra: tuple[str, ...] = ()):
    """``verb`` on ``run`` with the TOY and TRAINED settings (and ``extra`` ones)."""
    command = [verb, "--run-dir", str(run), "--device", "cpu", "--workers", "1", *args]
    return CliRunner().invoke(cli, command + _sets(root, *TRAINED, *extra))


@pytest.fixture(scope="module")
def trained(toy_root: Path, tmp_path_factory) -> tuple[Path, Path]:
    """A copy of the toy set (tests that change it put it back) and the smallest run on it that
    `test` takes: a head and SVMs trained on 3 training images, and the detections of the first
    2 test images."""
    folder = tmp_path_factory.mktemp("trained")
    root = Path(shutil.copytree(toy_root, folder / "toy"))
    run = folder / "run"
    train, test = ("--limit", "3"), ("--split", "test", "--limit", "2")
    for verb, args in [("propose", train), ("extract", train), ("finetune", train),
                       ("train-svm", train), ("propose", test), ("extract", test),
                       ("test", test)]:  # fmt: skip
        result = _run_verb(verb, root, run, *args)
        assert result.exit_code == 0, result.output
    return root, run


@contextlib.contextmanager
def _changed_for_a_while(path: Path, change: Callable[[Path], None]):
    """``change(path)``, put back as it was (bytes and times) afterwards."""
    data, stat = path.read_bytes(), path.stat()
    try:
        change(path)
        yield
    finally:
        path.write_bytes(data)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_test_refuses_svms_trained_on_another_split(trained, tmp_path):
    """`train-svm --split test`, then `test --force`: models trained on the test set scored it
    without a word (`run` noticed, `test` did not)."""
    root, run = trained[0], Path(shutil.copytree(trained[1], tmp_path / "run"))
    assert _run_verb("train-svm", root, run, "--split", "test", "--limit", "2").exit_code == 0
    line = _error_line(_run_verb("test", root, run, "--split", "test", "--limit", "2", "--force"))
    assert line.startswith(  # the hint then carries this call's --run-dir and --sets
        f"error: {run / 'svm/svms.npz'}: trained on split 'test', but data.train_split is "
        "'trainval'; rerun `spp-detect train-svm --split trainval --force --run-dir "
    )


def test_test_refuses_svms_trained_on_a_head_fine_tuned_since(trained, tmp_path):
    root, run = trained[0], Path(shutil.copytree(trained[1], tmp_path / "run"))
    assert _run_verb("finetune", root, run, "--limit", "3", "--force").exit_code == 0
    line = _error_line(_run_verb("test", root, run, "--split", "test", "--limit", "2", "--force"))
    assert f"{run / 'svm/svms.npz'}: trained with another finetune output than the one" in line
    assert "rerun `spp-detect train-svm --split trainval --force --run-dir " in line


def test_test_refuses_models_trained_before_the_training_data_changed(trained, tmp_path):
    """A training image re-annotated in place since the models were trained."""
    root, run = trained[0], Path(shutil.copytree(trained[1], tmp_path / "run"))
    first = split_records(_config(root), "trainval")[0].image_id
    xml = root / "Annotations" / f"{first}.xml"

    def reannotate(path: Path) -> None:
        path.write_text(re.sub(r"<xmin>\d+", "<xmin>2", path.read_text()))

    with _changed_for_a_while(xml, reannotate):
        test = _run_verb("test", root, run, "--split", "test", "--limit", "2", "--force")
    line = _error_line(test)
    assert f"{run / 'finetune/head.pt'}: made from other data than split 'trainval'" in line


def test_eval_refuses_detections_of_test_images_changed_since(trained, tmp_path):
    """A test image rewritten in place after `test`: eval scored the old detections against
    the new image's boxes."""
    root, run = trained[0], Path(shutil.copytree(trained[1], tmp_path / "run"))
    image = split_records(_config(root), "test")[0].path
    with _changed_for_a_while(image, lambda p: os.utime(p, ns=(1, 1))):
        line = _error_line(_run_verb("eval", root, run, "--split", "test", "--limit", "2"))
    assert f"{run / 'detections/test.npz'}: made from other data than split 'test'" in line
    assert "rerun `spp-detect test --split test --force --run-dir " in line


def test_detect_and_eval_leave_the_runs_saved_config_as_it_is(trained, tmp_path, monkeypatch):
    """`detect --set ...` rewrote the run's config.yaml (then `eval --run-dir` refused the
    run), and on a read-only run directory it wrote its results and exited 2."""
    root, run = trained[0], Path(shutil.copytree(trained[1], tmp_path / "run"))
    saved = (run / "config.yaml").read_bytes()
    image = split_records(_config(root), "test")[0].path
    detect = ["detect", "--run-dir", str(run), str(image), "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(cli, [*detect, "--set", "test.nms_thresh=0.4"])
    assert result.exit_code == 0, result.output
    assert (run / "config.yaml").read_bytes() == saved
    monkeypatch.setattr(  # a read-only run directory: its config cannot be written
        "spp_detect.config.Config.dump",
        lambda *a: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only file system")),
    )
    assert CliRunner().invoke(cli, detect).exit_code == 0
    monkeypatch.undo()
    evaluate = ["eval", "--run-dir", str(run), "--split", "test", "--limit", "2"]
    result = CliRunner().invoke(cli, [*evaluate, "--set", "eval.iou_thresh=0.6"])
    assert result.exit_code == 0, result.output
    assert (run / "config.yaml").read_bytes() == saved


def test_a_bad_seed_on_a_finished_run_is_refused_before_the_stage_touches_it(trained, tmp_path):
    """`finetune --set finetune.seed=-1` crashed after putting the finished head aside."""
    root, run = trained[0], Path(shutil.copytree(trained[1], tmp_path / "run"))
    before = {p: p.read_bytes() for p in (run / "finetune").iterdir()}
    line = _error_line(
        _run_verb("finetune", root, run, "--limit", "3", extra=("finetune.seed=-1",))
    )
    assert "finetune.seed must be in [0, 4294967295], got -1" in line
    assert {p: p.read_bytes() for p in (run / "finetune").iterdir()} == before


def _images(folder: Path, *names: str) -> list[Path]:
    import cv2

    paths = []
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), np.full((40, 60, 3), 100, np.uint8))
        paths.append(path)
    return paths


def _detect(run: Path, images: list[Path], *args: str):
    command = ["detect", "-c", "toy", "--run-dir", str(run), *map(str, images), *args]
    return CliRunner().invoke(cli, command)


def test_detect_never_lets_two_inputs_share_an_output_name(tmp_path):
    """a/img.jpg and b/img.jpg (or img.jpg and img.png) wrote the same <stem>.json and .png:
    the summary counted both, one JSON was left. Refused before any work."""
    out = tmp_path / "out"
    for names in (("a/img.jpg", "b/img.jpg"), ("c/img.jpg", "c/img.png")):
        first, second = _images(tmp_path, *names)
        line = _error_line(_detect(tmp_path / "run", [first, second], "--out", str(out)))
        assert line == (
            f"error: {first} and {second}: both would write {out / 'img'}.json and .png; "
            "rename one, or run them with different --out"
        )
    assert not out.exists()


def test_detect_never_overwrites_its_input(tmp_path):
    """--out set to the input's folder: a 16-bit PNG input became an 8-bit drawing."""
    (image,) = _images(tmp_path / "photos", "img.png")
    data = image.read_bytes()
    line = _error_line(_detect(tmp_path / "run", [image], "--out", str(image.parent)))
    assert line == (
        f"error: {image}: exists and is not an output of detect (e.g. an input image); it would "
        "be overwritten, so pass another --out"
    )
    assert image.read_bytes() == data


def test_detect_refuses_a_score_threshold_that_is_not_a_number(tmp_path):
    """--score-thresh nan kept no detection, without a word."""
    (image,) = _images(tmp_path, "img.jpg")
    line = _error_line(_detect(tmp_path / "run", [image], "--score-thresh", "nan"))
    assert line == "error: --score-thresh nan: give a finite score, e.g. 0"


def test_detect_on_an_empty_file_gives_no_dataset_advice(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    line = _error_line(_detect(tmp_path / "run", [empty]))
    assert line == f"error: {empty}: an empty file (0 bytes), not an image; " + (
        "pass an image file (JPEG, PNG, ...)"
    )


def test_a_run_dir_or_out_below_a_file_or_too_long_is_one_line(tmp_path):
    """ENOTDIR and ENAMETOOLONG were tracebacks."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = CliRunner().invoke(cli, ["propose", "-c", "toy", "--run-dir", str(blocker / "run")])
    assert _error_line(result) == (
        f"error: --run-dir {blocker / 'run'}: {blocker} is a file, not a folder; use another "
        "--run-dir"
    )
    (image,) = _images(tmp_path, "img.jpg")
    line = _error_line(_detect(tmp_path / "run", [image], "--out", str(blocker / "out")))
    assert line.startswith(f"error: --out {blocker / 'out'}: {blocker} is a file, not a folder")
    long = tmp_path / ("x" * 300)
    line = _error_line(CliRunner().invoke(cli, ["propose", "-c", "toy", "--run-dir", str(long)]))
    assert "is 300 bytes, longer than the 255 a file system allows; use a shorter --run-dir" in line
