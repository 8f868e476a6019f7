"""The command line's foundation: help, version, make-toy, and bad input → one line, exit code 2.

Stage-level bad input goes through a local click group of the same class as ``cli`` with one
probe command built from ``stage_options`` (the global ``cli`` group is left untouched).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from spp_detect import __version__
from spp_detect.cli import cli, records_run, split_option, stage_options
from spp_detect.config import load_config
from spp_detect.data.toy import TOY_CLASSES
from spp_detect.runtime.run_dir import RunDir
from spp_detect.stages.context import StageContext, split_records
from spp_detect.stages.manifests import MANIFEST, require_upstream, write_manifest
from spp_detect.stages.provenance import stage_fingerprint
from spp_detect.testing import assert_one_line_error


@click.group(cls=type(cli))
def local() -> None:
    """A group like `spp-detect` holding only the probe."""


@local.command("probe")
@stage_options
@split_option
@click.option("--upstream", default=None, help="Require this upstream stage's manifest.")
def probe(ctx: StageContext, split: str | None, upstream: str | None) -> None:
    """Read the split (and an upstream manifest) the way a stage does."""
    split = split or ctx.config.data.train_split
    if upstream:
        require_upstream(ctx.config, ctx.run_dir, upstream, split)
    records = split_records(ctx.config, split, ctx.limit)
    click.echo(f"probe: {len(records)} images")


def test_help_and_version():
    runner = CliRunner()
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0 and "make-toy" in result.output
    result = runner.invoke(cli, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output
    result = runner.invoke(cli, ["make-toy", "--help"])
    assert result.exit_code == 0 and "--num-train" in result.output and "--seed" in result.output


def test_a_ctrl_c_after_the_command_is_ignored(monkeypatch):
    """Once a command is over, SIGINT is ignored: a Ctrl-C while the interpreter shuts down
    (joining reader and writer threads) must not turn a finished command into a death by
    signal (exit -2, found by scripts/fault_suite.py)."""
    import signal

    from spp_detect.cli import main

    monkeypatch.setattr(sys, "argv", ["spp-detect", "--version"])
    before = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as ended:
            main()
        assert ended.value.code == 0
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_make_toy(tmp_path):
    out = tmp_path / "toy"
    args = ["make-toy", str(out), "--num-train", "4", "--num-test", "3", "--seed", "5"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"toy dataset in {out}: 4 trainval + 3 test images")
    assert len(result.stdout.splitlines()) == 1
    assert len((out / "ImageSets/Main/test.txt").read_text().split()) == 3
    assert len(list((out / "JPEGImages").glob("*.jpg"))) == 7


def test_make_toy_refuses_a_negative_seed(tmp_path):
    """--seed -1 was numpy's ValueError, a traceback (issue 27); click's range check now."""
    result = CliRunner().invoke(cli, ["make-toy", str(tmp_path / "toy"), "--seed", "-1"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "'--seed': -1 is not in the range 0<=x<=4294967295" in result.output
    assert not (tmp_path / "toy").exists()


def test_make_toy_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    result = CliRunner().invoke(cli, ["make-toy", str(tmp_path / "mine")])
    assert_one_line_error(result, str(tmp_path / "mine"), "not a toy dataset")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_real_process_exit_code_and_no_traceback(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    code = "from spp_detect.cli import main; main()"
    done = subprocess.run(
        [sys.executable, "-c", code, "make-toy", str(tmp_path / "mine")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ")
    assert "Traceback" not in done.stderr


@pytest.fixture
def stage_env(toy_root, tmp_path):
    """A private copy of the toy set, a run dir, and the probe's base arguments (one good run)."""
    data = tmp_path / "data"
    shutil.copytree(toy_root, data)
    run_dir = tmp_path / "run"
    base = [
        "probe", "--run-dir", str(run_dir), "--device", "cpu",
        "--set", f"data.root={data}", "--set", f"data.classes=[{', '.join(TOY_CLASSES)}]",
    ]  # fmt: skip
    result = CliRunner().invoke(local, base)
    assert result.exit_code == 0, result.output
    assert result.stdout == "probe: 12 images\n"
    config_path = run_dir / "config.yaml"
    assert load_config(config_path).data.root == str(data)
    return data, run_dir, base, config_path.read_bytes()


def test_probe_split_and_limit(stage_env):
    _, _, base, _ = stage_env
    result = CliRunner().invoke(local, [*base, "--split", "test", "--limit", "4"])
    assert result.exit_code == 0 and result.stdout == "probe: 4 images\n"


BREAKAGES = {
    "missing split file": (["--split", "val"], None, "ImageSets/Main/val.txt", "trainval"),
    "id without xml": ([], "ghost", "Annotations/ghost.xml", "drop the id"),
    "xml not xml": ([], "bad_xml", "Annotations/trainval_00002.xml", "not valid XML"),
    "image does not decode": ([], "bad_jpg", "JPEGImages/trainval_00003.jpg", "not a readable"),
    "image missing": ([], "no_jpg", "JPEGImages/trainval_00004.jpg", "image not found"),
}


@pytest.mark.parametrize("case", BREAKAGES)
def test_bad_dataset_is_one_line(stage_env, case):
    data, run_dir, base, config_bytes = stage_env
    extra, breakage, name, fix = BREAKAGES[case]
    if breakage == "ghost":
        with (data / "ImageSets/Main/trainval.txt").open("a") as split:
            split.write("ghost\n")
    elif breakage == "bad_xml":
        (data / "Annotations/trainval_00002.xml").write_text("<annotation><object>")
    elif breakage == "bad_jpg":
        (data / "JPEGImages/trainval_00003.jpg").write_bytes(b"\xff\xd8 truncated nonsense")
    elif breakage == "no_jpg":
        (data / "JPEGImages/trainval_00004.jpg").unlink()
    result = CliRunner().invoke(local, [*base, *extra])
    assert_one_line_error(result, str(data / name), fix)
    assert (run_dir / "config.yaml").read_bytes() == config_bytes  # same config, same file


def test_missing_dataset_root(stage_env, tmp_path):
    _, run_dir, base, _ = stage_env
    result = CliRunner().invoke(local, [*base, "--set", f"data.root={tmp_path / 'absent'}"])
    assert_one_line_error(result, str(tmp_path / "absent"), "data.root")
    load_config(run_dir / "config.yaml")  # still a whole, valid config


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("svm.CC=1", ["svm.CC", "valid keys: C, pos_weight"]),
        ("svn.C=1", ["svn", "valid: data, propose"]),
        ("test.nms_thresh=high", ["test.nms_thresh", "must be float"]),
        ("extract.scales=[688, x]", ["extract.scales", "must be int"]),
        ("nodot=1", ["expected section.key=value"]),
    ],
)
def test_bad_set_is_one_line_and_writes_nothing(stage_env, override, names):
    _, run_dir, base, config_bytes = stage_env
    result = CliRunner().invoke(local, [*base, "--set", override])
    assert_one_line_error(result, *names)
    assert (run_dir / "config.yaml").read_bytes() == config_bytes


def test_bad_config_file_is_one_line(stage_env, tmp_path):
    _, run_dir, base, config_bytes = stage_env
    typo = tmp_path / "typo.yaml"
    typo.write_text("test:\n  nms_tresh: 0.3\n")
    result = CliRunner().invoke(local, [*base, "-c", str(typo)])
    assert_one_line_error(result, str(typo), "test.nms_tresh", "nms_thresh")
    broken = tmp_path / "broken.yaml"
    broken.write_text("svm: {C: [\n")
    result = CliRunner().invoke(local, [*base, "-c", str(broken)])
    assert_one_line_error(result, str(broken), "not valid YAML")
    assert (run_dir / "config.yaml").read_bytes() == config_bytes


def test_stale_upstream_fingerprint(stage_env):
    data, run_dir, base, _ = stage_env
    classes = f"data.classes=[{', '.join(TOY_CLASSES)}]"
    current = load_config(None, [f"data.root={data}", classes])
    older = load_config(None, [f"data.root={data}", classes, "propose.min_size=10"])
    assert stage_fingerprint(older, "propose") != stage_fingerprint(current, "propose")
    folder = RunDir(run_dir).stage_dir("propose", "trainval")
    write_manifest(folder, "propose", "trainval", 12, stage_fingerprint(older, "propose"))
    manifest_bytes = (folder / MANIFEST).read_bytes()
    result = CliRunner().invoke(local, [*base, "--upstream", "propose"])
    assert_one_line_error(result, str(folder / MANIFEST), "different config", "--force")
    assert (folder / MANIFEST).read_bytes() == manifest_bytes  # the old artefacts are kept
    result = CliRunner().invoke(
        local, [*base, "--upstream", "propose", "--set", "propose.min_size=10"]
    )
    assert result.exit_code == 0 and result.stdout == "probe: 12 images\n"


@pytest.mark.parametrize(
    ("device", "gpus", "names"),
    [
        ("cuda", 0, ["--device cuda", "no CUDA device available", "--device cpu"]),
        ("cuda:7", 1, ["--device cuda:7", "1 CUDA device(s), cuda:0 to cuda:0"]),
        ("mps", 0, ["--device mps", "use cpu or cuda"]),
        ("gpu0", 0, ["--device gpu0", "not a torch device"]),
    ],
)
def test_unusable_device_is_one_line_and_writes_nothing(
    stage_env, monkeypatch, device, gpus, names
):
    """Checked before any work, on any machine: the CUDA device count is faked."""
    import torch

    _, run_dir, base, config_bytes = stage_env
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    result = CliRunner().invoke(local, [*base, "--device", device])
    assert_one_line_error(result, *names)
    assert (run_dir / "config.yaml").read_bytes() == config_bytes


def test_missing_upstream_names_the_stage_to_run(stage_env):
    _, run_dir, base, _ = stage_env
    result = CliRunner().invoke(local, [*base, "--upstream", "extract"])
    assert_one_line_error(result, str(run_dir / "features" / "trainval"), "spp-detect extract")


def test_mismatched_torchvision_gives_one_line(monkeypatch, tmp_path):
    import torchvision.ops

    def broken(*args, **kwargs):
        raise RuntimeError("operator torchvision::nms does not exist")

    monkeypatch.setattr(torchvision.ops, "nms", broken)
    result = CliRunner().invoke(cli, ["run", "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "install a matching pair" in result.output
    assert "Traceback" not in result.output


# --- a newcomer's first hour (issue 29) -------------------------------------------------------


def test_a_config_typo_is_reported_before_torch_loads(tmp_path):
    """A torch that cannot be imported stands in the way: the typo is still named, so the
    config was read and checked first."""
    fake = tmp_path / "fake" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('torch was imported')\n")
    done = subprocess.run(
        [sys.executable, "-m", "spp_detect", "propose", "--set", "svm.CC=1"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(fake.parent)},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        "error: --set svm.CC=1: unknown key svm.CC (did you mean svm.C?); valid keys: C, "
        "pos_weight, intercept_scaling, tol, neg_iou, hard_thresh, evict_thresh, retrain_limit, "
        "cache_gib, target_norm, norm_images, norm_windows, seed"
    ]


def test_a_hint_carries_the_callers_config_run_dir_and_sets(stage_env, tmp_path):
    data, _, _, _ = stage_env
    run_dir = tmp_path / "fresh run"
    args = ["train-svm", "-c", "toy", "--run-dir", str(run_dir), "--device", "cpu",
            "--set", f"data.root={data}", "--set", "finetune.fc_dim=64"]  # fmt: skip
    line = assert_one_line_error(CliRunner().invoke(cli, args))
    assert (
        f"run `spp-detect propose --split trainval -c toy --run-dir '{run_dir}' "
        f"--set data.root={data} --set finetune.fc_dim=64` first"
    ) in line


def test_the_runs_config_is_written_when_the_command_starts(stage_env, tmp_path):
    """An interrupted first run resumes with --run-dir alone: its record exists already."""
    data, _, _, _ = stage_env
    run_dir = tmp_path / "first"
    args = ["train-svm", "-c", "toy", "--run-dir", str(run_dir), "--device", "cpu",
            "--set", f"data.root={data}", "--set", "finetune.fc_dim=64"]  # fmt: skip
    assert_one_line_error(CliRunner().invoke(cli, args))  # refused: no proposals yet
    saved = load_config(run_dir / "config.yaml")
    assert saved.name == "toy" and saved.finetune.fc_dim == 64
    # a later call the run refuses leaves its record as it was
    args[args.index("finetune.fc_dim=64")] = "finetune.fc_dim=32"
    assert_one_line_error(CliRunner().invoke(cli, args))
    assert load_config(run_dir / "config.yaml").finetune.fc_dim == 64


def test_test_settings_alone_keep_the_runs_record(tmp_path):
    run_dir = RunDir(tmp_path)
    load_config("toy").dump(run_dir.config_path)
    only_test = load_config("toy", ["test.bbox_reg=false", "eval.iou_thresh=0.6"])
    other = load_config("toy", ["test.bbox_reg=false", "svm.C=0.01"])
    sections = ("test", "eval")
    assert not records_run(False, sections, only_test, run_dir)
    assert records_run(False, sections, other, run_dir)
    assert records_run(False, (), only_test, run_dir)
    assert not records_run(True, (), other, run_dir)


def test_values_after_one_set_say_to_repeat_set(stage_env):
    _, _, base, _ = stage_env
    result = CliRunner().invoke(local, [*base, "--set", "svm.C=1", "svm.tol=0.2"])
    assert_one_line_error(result, "svm.tol=0.2: not an option", "its own --set")


@pytest.mark.parametrize(
    ("verb", "shown", "hidden"),
    [
        ("propose", ["--workers", "--limit", "--force"], []),
        ("extract", ["--limit", "--force"], ["--workers"]),
        ("test", ["--limit", "--force"], ["--workers"]),
        ("eval", ["--limit"], ["--workers", "--force"]),
        ("detect", [], ["--workers", "--limit", "--force"]),
        ("demo", ["--workers", "--force"], ["--limit"]),
        ("run", ["--workers", "--limit", "--force"], []),
    ],
)
def test_each_verb_shows_only_the_options_it_uses(verb, shown, hidden):
    text = CliRunner().invoke(cli, [verb, "--help"]).output
    assert all(f"{option} " in text for option in shown), text
    assert not any(f"{option} " in text for option in hidden), text


def test_voc2007_with_another_split_is_refused(stage_env):
    _, run_dir, _, _ = stage_env
    result = CliRunner().invoke(cli, ["eval", "--run-dir", str(run_dir), "--voc2007", "--split",
                                      "trainval", "--device", "cpu"])  # fmt: skip
    assert_one_line_error(result, "--voc2007 evaluates the 'test' split", "drop --split trainval")


def test_without_config_or_run_dir_it_says_which_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["extract", "--device", "cpu"])
    assert result.exit_code == 2  # the default VOC root is not here
    assert "no -c or --run-dir: the code defaults (data.root data/VOCdevkit/VOC2007)" in (
        result.stderr
    )
    assert "runs/default" in result.stderr


def test_an_option_a_verb_does_not_use_is_accepted_and_said_ignored(stage_env):
    _, _, base, _ = stage_env
    result = CliRunner().invoke(local, [*base, "--workers", "2"])  # the probe reads no images
    assert result.exit_code == 0, result.output
    assert "--workers does nothing for this command; ignored" in result.stderr
