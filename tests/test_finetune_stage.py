"""`spp-detect finetune` on the toy set: learning, resume equality, initialisation, bad input.

Proposals are written directly (jittered gt boxes plus random boxes, with a real propose
manifest) instead of running selective search, which would cost most of this file's time; the
conv5 cache comes from the real extract stage.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from spp_detect.cli import cli
from spp_detect.config import load_config
from spp_detect.errors import UserError
from spp_detect.models.head import load_head
from spp_detect.models.weights import build_backbone
from spp_detect.runtime.artifacts import load_json, save_npz, save_torch
from spp_detect.runtime.run_dir import RunDir
from spp_detect.stages.context import StageContext, split_records
from spp_detect.stages.extract import run_extract
from spp_detect.stages.finetune import evaluation_windows, run_finetune
from spp_detect.stages.manifests import read_manifest, write_manifest
from spp_detect.stages.provenance import item_fingerprint, stage_fingerprint
from spp_detect.train import finetune
from spp_detect.train.finetune import majority_rate
from spp_detect.train.finetune import window_accuracy as accuracy_of

CLASSES = "[circle, square, triangle]"
SCALES = "[224, 320]"
TIGHT_PER_GT = 15  # proposals hugging each gt box (IoU about 0.6–0.95): foreground
LOOSE_PER_GT = 25  # proposals shifted off or grown around each gt box (IoU < 0.45): background
RANDOM_PER_IMAGE = 60  # proposals anywhere in the image


def _overrides(root: Path, *extra: str) -> list[str]:
    return [
        f"data.root={root}",
        f"data.classes={CLASSES}",
        f"extract.scales={SCALES}",
        "extract.backbone=zf5",
        "extract.weights=none",
        *extra,
    ]


def _ctx(
    root: Path, run: Path, *extra: str, force: bool = False, limit: int | None = None
) -> StageContext:
    config = load_config(None, _overrides(root, *extra))
    return StageContext(config, RunDir(run), "cpu", 1, limit, force)


def write_proposals(ctx: StageContext, split: str) -> None:
    """Tight, loose and random boxes for every image, closed by a propose manifest.

    Tight and loose boxes keep clear of the 0.5 fg threshold, so that window accuracy measures
    learning rather than the label noise of windows at IoU ≈ 0.5.
    """
    records = split_records(ctx.config, split)
    for index, record in enumerate(records):
        rng = np.random.default_rng([index, len(split)])
        boxes = [_random_boxes(rng, record.width, record.height, RANDOM_PER_IMAGE)]
        for gt in record.gt_boxes:
            boxes += [_tight_boxes(rng, gt, TIGHT_PER_GT), _loose_boxes(rng, gt, LOOSE_PER_GT)]
        boxes = np.concatenate(boxes)
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, record.width)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, record.height)
        keep = (boxes[:, 2] - boxes[:, 0] >= 8) & (boxes[:, 3] - boxes[:, 1] >= 8)
        path = ctx.run_dir.proposal_path(split, record.image_id)
        save_npz(
            path,
            boxes=boxes[keep].astype(np.float32),
            fingerprint=np.str_(item_fingerprint(ctx.config, "propose", record)),
        )
    write_manifest(
        ctx.run_dir.proposals_dir(split), "propose", split, len(records),
        stage_fingerprint(ctx.config, "propose"),
    )  # fmt: skip


def _tight_boxes(rng: np.random.Generator, gt: np.ndarray, count: int) -> np.ndarray:
    size = np.tile(gt[2:] - gt[:2], 2)
    return gt + rng.normal(0, 0.04, size=(count, 4)) * size


def _loose_boxes(rng: np.random.Generator, gt: np.ndarray, count: int) -> np.ndarray:
    """Boxes of the gt's size moved 0.6–1 of it sideways, or grown 2–3× around it."""
    size = gt[2:] - gt[:2]
    shift = rng.uniform(0.6, 1.0, size=(count, 2)) * rng.choice([-1, 1], size=(count, 2)) * size
    shifted = np.tile(gt[:2], (count, 1)) + shift
    grow = rng.uniform(2.0, 3.0, size=(count, 1)) * size / 2
    centre = (gt[:2] + gt[2:]) / 2
    moved = np.concatenate([shifted, shifted + size], axis=1)
    grown = np.concatenate([centre - grow, centre + grow], axis=1)
    return np.where(rng.uniform(size=(count, 1)) < 0.7, moved, grown)


def _random_boxes(rng: np.random.Generator, width: int, height: int, count: int) -> np.ndarray:
    corners = rng.uniform(0, 1, size=(count, 2, 2)) * [width, height]
    return np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=1)


@pytest.fixture(scope="module")
def upstream(toy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory with proposals and the conv5 cache of both toy splits.

    Runs two stages: every test that requests it must be marked slow."""
    run = tmp_path_factory.mktemp("finetune") / "upstream"
    ctx = _ctx(toy_root, run)
    for split in ("trainval", "test"):
        write_proposals(ctx, split)
        run_extract(ctx, split)
    return run


def _copy(upstream: Path, tmp_path: Path, name: str = "run") -> Path:
    run = tmp_path / name
    shutil.copytree(upstream, run)
    return run


FAST = (
    "spp.levels=[2, 1]",
    "finetune.fc_dim=32",
    "finetune.batch_size=32",
    "finetune.lr=0.01",
    "finetune.lr_steps=[7]",
    "finetune.iterations=12",  # tests that train set their own
)


def _head_tensors(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(RunDir(run).head_path, weights_only=True)


def _whole_and_killed(toy_root, upstream, tmp_path, extra, stop_after: int) -> tuple[Path, Path]:
    """Two runs: one fine-tuned to the end, one stopped after ``stop_after`` iterations as a
    kill would (its last regular checkpoint left, no head)."""
    whole = _copy(upstream, tmp_path, "whole")
    run_finetune(_ctx(toy_root, whole, *extra), "trainval")
    killed = _copy(upstream, tmp_path, "killed")
    line = run_finetune(_ctx(toy_root, killed, *extra), "trainval", stop_after=stop_after)
    assert f"stopped at iteration {stop_after} of" in line
    assert RunDir(killed).checkpoint_path.is_file() and not RunDir(killed).head_path.exists()
    return whole, killed


@pytest.mark.slow  # uses the upstream fixture (propose + extract)
def test_a_checkpoint_from_another_device_type_starts_over(toy_root, upstream, tmp_path, caplog):
    """A CUDA generator's dropout state does not load into a CPU one, so the checkpoint records
    its device type: one made on CUDA is set aside with a warning on the CPU (and the run equals
    an uninterrupted one), not refused as unusable."""
    extra = (*FAST, "finetune.iterations=6", "finetune.checkpoint_every=3")
    whole, killed = _whole_and_killed(toy_root, upstream, tmp_path, extra, stop_after=4)
    path = RunDir(killed).checkpoint_path
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["identity"]["device"] == "cpu"
    checkpoint["identity"]["device"] = "cuda"
    checkpoint["dropout_rng"] = torch.zeros(16, dtype=torch.uint8)  # a CUDA generator's size
    save_torch(path, checkpoint)
    with caplog.at_level("WARNING"):
        run_finetune(_ctx(toy_root, killed, *extra), "trainval")
    assert "made with other settings; starting over" in caplog.text
    expected, got = _head_tensors(whole), _head_tensors(killed)
    assert all(torch.equal(expected[key], got[key]) for key in expected)


@pytest.mark.slow
def test_learns_toy_windows(toy_root, upstream, tmp_path, caplog):
    run = _copy(upstream, tmp_path)
    extra = (
        "finetune.fc_dim=256",
        "finetune.iterations=150",
        "finetune.lr=0.003",
        "finetune.log_every=25",
        "finetune.val_split=test",
    )
    ctx = _ctx(toy_root, run, *extra)
    with caplog.at_level(logging.INFO):
        line = run_finetune(ctx, "trainval")
    assert line.startswith("finetune: 150 items")
    trunk_lines = [r for r in caplog.records if r.getMessage().startswith("trunk ")]
    assert len(trunk_lines) == 1, "one trunk line per stage, with a held-out split too"
    history = load_json(RunDir(run).history_path)["entries"]
    assert [e["iteration"] for e in history] == [25, 50, 75, 100, 125, 150]
    assert history[-1]["loss"] < 0.6 * history[0]["loss"]
    # window accuracy on the held-out test split, recomputed from the saved head
    head = load_head(RunDir(run).head_path)
    features, labels = evaluation_windows(ctx.config, RunDir(run), "test", None, "cpu")
    accuracy, majority = accuracy_of(head, features, labels), majority_rate(labels)
    assert majority == pytest.approx(0.75, abs=0.01)  # 32 fg + 96 bg per minibatch
    assert accuracy >= majority + 0.4 * (1 - majority), (accuracy, majority)  # error cut by 40 %
    assert history[-1]["val_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    manifest = read_manifest(RunDir(run).finetune_dir)
    assert manifest["classes"] == ["circle", "square", "triangle"]
    assert manifest["feature_dim"] == 256 * 50 and manifest["count"] == 150
    assert not RunDir(run).checkpoint_path.exists()
    # a second run is a no-op
    assert "already complete" in run_finetune(ctx, "trainval")


@pytest.mark.slow  # uses the upstream fixture (propose + extract)
def test_resume_equals_uninterrupted(toy_root, upstream, tmp_path, monkeypatch):
    # blocks of 4 iterations, checkpoints every 5, a kill after 8: the restart redraws block 1
    # mid-way and replays iterations 6–8 from the checkpoint at 5.
    monkeypatch.setattr(finetune, "MAX_BLOCK_ITERATIONS", 4)
    extra = (*FAST, "finetune.iterations=11", "finetune.checkpoint_every=5", "finetune.log_every=3")
    whole, killed = _whole_and_killed(toy_root, upstream, tmp_path, extra, stop_after=8)
    checkpoint = torch.load(RunDir(killed).checkpoint_path, weights_only=True)
    assert checkpoint["progress"]["iteration"] == 5
    run_finetune(_ctx(toy_root, killed, *extra), "trainval")
    expected, got = _head_tensors(whole), _head_tensors(killed)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert load_json(RunDir(whole).history_path) == load_json(RunDir(killed).history_path)
    # and a different seed gives different weights
    other = _copy(upstream, tmp_path, "other")
    run_finetune(_ctx(toy_root, other, *extra, "finetune.seed=1"), "trainval")
    assert not torch.equal(_head_tensors(other)["cls.weight"], expected["cls.weight"])


@pytest.mark.slow  # uses the upstream fixture (propose + extract)
def test_pretrained_classifier_initialises_fc6_fc7(toy_root, upstream, tmp_path, monkeypatch):
    """With a classifier, fc6 starts from its columns for the first level, zeros elsewhere."""
    from spp_detect.models import weights

    gen = torch.Generator().manual_seed(0)
    classifier = {
        "fc6.weight": torch.randn(16, 256 * 4, generator=gen),
        "fc6.bias": torch.randn(16, generator=gen),
        "fc7.weight": torch.randn(16, 16, generator=gen),
        "fc7.bias": torch.randn(16, generator=gen),
    }
    monkeypatch.setattr(weights, "load_classifier_state", lambda name, weights: classifier)
    run = _copy(upstream, tmp_path)
    extra = ("spp.levels=[2, 1]", "finetune.fc_dim=16", "finetune.iterations=0")
    run_finetune(_ctx(toy_root, run, *extra), "trainval")
    state = _head_tensors(run)
    assert torch.equal(state["fc6.weight"][:, : 256 * 4], classifier["fc6.weight"])
    assert torch.all(state["fc6.weight"][:, 256 * 4 :] == 0)
    assert torch.equal(state["fc7.weight"], classifier["fc7.weight"])
    assert abs(state["cls.weight"].std().item() - 0.01) < 0.003
    # the first level must be the classifier's pooled size
    with pytest.raises(UserError, match=r"spp\.levels"):
        run_finetune(_ctx(toy_root, run, "spp.levels=[3, 1]", *extra[1:], force=True), "trainval")


@pytest.mark.slow  # uses the upstream fixture (propose + extract)
def test_flipped_windows_and_on_the_fly_features(toy_root, upstream, tmp_path):
    run = _copy(upstream, tmp_path)
    for split in ("trainval", "test"):
        shutil.rmtree(RunDir(run).features_dir(split))
    extra = (*FAST, "extract.cache=none", "extract.flip=true", "finetune.iterations=3")
    line = run_finetune(_ctx(toy_root, run, *extra, "extract.scales=[160]", limit=4), "trainval")
    assert line.startswith("finetune: 3 items")
    assert _head_tensors(run)["fc6.weight"].shape == (32, 256 * 5)


@pytest.mark.slow  # uses the upstream fixture (propose + extract)
def test_bad_input(toy_root, upstream, tmp_path):
    fast = (*FAST, "finetune.iterations=4")
    # no proposals: name the stage to run first
    with pytest.raises(UserError, match="spp-detect propose"):
        run_finetune(_ctx(toy_root, tmp_path / "empty", *fast), "trainval")
    # proposals but no conv5 cache
    run = _copy(upstream, tmp_path)
    shutil.rmtree(RunDir(run).features_dir("trainval"))
    with pytest.raises(UserError, match="spp-detect extract"):
        run_finetune(_ctx(toy_root, run, *fast), "trainval")
    # classes that differ from the cached artefacts
    run = _copy(upstream, tmp_path, "classes")
    with pytest.raises(UserError, match="different config"):
        run_finetune(_ctx(toy_root, run, *fast, "data.classes=[circle, square]"), "trainval")
    # a corrupt checkpoint
    RunDir(run).finetune_dir.mkdir(parents=True)
    RunDir(run).checkpoint_path.write_bytes(b"garbage")
    with pytest.raises(UserError, match=r"checkpoint\.pt"):
        run_finetune(_ctx(toy_root, run, *fast), "trainval")
    # settings that cannot train, and a rate that diverges
    with pytest.raises(UserError, match=r"finetune\.batch_size must be 1 to 65536"):
        run_finetune(_ctx(toy_root, run, *fast, "finetune.batch_size=0"), "trainval")
    RunDir(run).checkpoint_path.unlink()
    with pytest.raises(UserError, match=r"lower finetune\.lr"):
        run_finetune(_ctx(toy_root, run, *fast, "finetune.lr=1e30"), "trainval")
    # a held-out split without proposals
    with pytest.raises(UserError, match="spp-detect propose"):
        run_finetune(_ctx(toy_root, run, *fast, "finetune.val_split=nosuch"), "trainval")


def test_cli_bad_input_is_one_line(toy_root, tmp_path):
    args = ["finetune", "--run-dir", str(tmp_path / "run"), "--device", "cpu"]
    for item in _overrides(toy_root, *FAST):
        args += ["--set", item]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "spp-detect propose" in lines[0]


# End-to-end fine-tuning (finetune.conv_from): small images and few windows keep it quick.
CONV = (
    *FAST,
    "extract.scales=[160, 200]",
    "finetune.conv_from=conv4",
    "finetune.conv_lr_mult=0.1",
    "finetune.images_per_batch=2",
)


@pytest.mark.slow  # uses the upstream fixture (propose + extract)
def test_conv_resume_equals_uninterrupted(toy_root, upstream, tmp_path):
    extra = (*CONV, "finetune.iterations=7", "finetune.checkpoint_every=3", "finetune.log_every=2")
    whole, killed = _whole_and_killed(toy_root, upstream, tmp_path, extra, stop_after=5)
    run_finetune(_ctx(toy_root, killed, *extra), "trainval")
    for name in ("head.pt", "trunk.pt"):
        expected = torch.load(RunDir(whole).finetune_dir / name, weights_only=True)
        got = torch.load(RunDir(killed).finetune_dir / name, weights_only=True)
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.equal(expected[key], got[key]), (name, key)
    assert load_json(RunDir(whole).history_path) == load_json(RunDir(killed).history_path)
    # frozen layers kept their weights; trained ones moved
    initial = build_backbone("zf5", "none").state_dict()
    trunk = torch.load(RunDir(whole).trunk_path, weights_only=True)
    assert torch.equal(trunk["features.0.weight"], initial["features.0.weight"])  # conv1
    assert not torch.equal(trunk["features.12.weight"], initial["features.12.weight"])  # conv5


@pytest.mark.slow  # uses the upstream fixture (propose + extract)
def test_a_cache_from_another_trunk_is_refused_then_recomputed(toy_root, upstream, tmp_path):
    from spp_detect.stages.builders import open_feature_source

    run = _copy(upstream, tmp_path)  # its conv5 cache comes from the untrained trunk
    same_scales = [s for s in CONV if not s.startswith("extract.scales")]
    ctx = _ctx(toy_root, run, *same_scales, "finetune.iterations=2")
    run_finetune(ctx, "trainval")
    with pytest.raises(UserError, match=r"another conv trunk than the fine-tuned one.*extract"):
        open_feature_source(ctx.config, ctx.run_dir, "trainval", "cpu")
    text = run_extract(ctx, "trainval")
    assert "0 already cached" in text  # every file recomputed with the fine-tuned trunk
    source = open_feature_source(ctx.config, ctx.run_dir, "trainval", "cpu")
    # training again (another seed) makes this cache stale in turn
    retrained = _ctx(toy_root, run, *same_scales, "finetune.iterations=2", "finetune.seed=1")
    run_finetune(retrained, "trainval")
    with pytest.raises(UserError, match="another conv trunk"):
        open_feature_source(retrained.config, retrained.run_dir, "trainval", "cpu")
    assert source.channels == 256
