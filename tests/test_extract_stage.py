"""`spp-detect extract` and FeatureSource: cache files, resume, flips, live maps, bad input."""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_spp import zf5_fmap_side  # conv5 size arithmetic by hand (docs/method.md#conv-trunks)

from spp_detect.artifacts import load_json
from spp_detect.backbones import build_backbone
from spp_detect.cli import cli
from spp_detect.config import ExtractConfig, load_config
from spp_detect.errors import UserError
from spp_detect.features import FeatureSource, PoolGeometry, compute_maps, read_record_image
from spp_detect.image import resized_hw
from spp_detect.run_dir import RunDir
from spp_detect.stages.common import open_feature_source, split_records
from spp_detect.voc import read_split

TOY_CLASSES = "data.classes=[circle,square,triangle]"
SCALES = (96, 128)
SCALES_SET = "extract.scales=[96,128]"


def _args(root: Path, run: Path, *extra: str) -> list[str]:
    return [
        "extract", "--run-dir", str(run), "--set", f"data.root={root}", "--set", TOY_CLASSES,
        "--set", SCALES_SET, "--device", "cpu", *extra,
    ]  # fmt: skip


def _config(root: Path, *extra: str):
    return load_config(None, [f"data.root={root}", TOY_CLASSES, SCALES_SET, *extra])


@pytest.fixture(scope="module")
def extracted(toy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """Three training images extracted with flips; returns the run folder and the CLI result."""
    run = tmp_path_factory.mktemp("extract") / "run"
    result = CliRunner().invoke(
        cli, _args(toy_root, run, "--limit", "3", "--set", "extract.flip=true")
    )
    assert result.exit_code == 0, result.output
    return run, result


@pytest.fixture
def toy_copy(toy_root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(toy_root, tmp_path / "toy"))


def test_cache_files_hold_every_scale(toy_root, extracted):
    run, result = extracted
    records = read_split(toy_root, "trainval", ("circle", "square", "triangle"))[:3]
    files = sorted((run / "features" / "trainval").glob("*.npz"))
    assert [f.stem for f in files] == [r.image_id for r in records]
    backbone = build_backbone("zf5", "none")
    for record, path in zip(records, files, strict=True):
        with np.load(path, allow_pickle=False) as data:
            assert data["scales"].tolist() == list(SCALES)
            assert data["image_hw"].tolist() == [record.height, record.width]
            for k, scale in enumerate(SCALES):
                height, width = resized_hw(record.image_hw, scale)
                fmap = data[f"fmap_{k}"]
                assert fmap.dtype == np.float16
                assert fmap.shape == (256, zf5_fmap_side(height), zf5_fmap_side(width))
                assert data[f"flip_fmap_{k}"].shape == fmap.shape
        with torch.no_grad():
            maps = compute_maps(backbone, read_record_image(record), SCALES)
        with np.load(path, allow_pickle=False) as data:
            for k, fmap in enumerate(maps):
                assert np.array_equal(data[f"fmap_{k}"], fmap.numpy().astype(np.float16))
    manifest = load_json(run / "features" / "trainval" / "manifest.json")
    assert manifest["count"] == 3 and manifest["channels"] == 256
    assert (manifest["stride"], manifest["offset0"], manifest["flip"]) == (16, 21.0, True)
    assert "extract (trainval): 3 images" in result.output and "written" in result.output
    assert "projected cache size" in result.output and "s/image" in result.output


@pytest.mark.slow  # three extract runs, ~4 s
def test_rerun_skips_and_force_recomputes(toy_root, tmp_path):
    run = tmp_path / "run"
    assert CliRunner().invoke(cli, _args(toy_root, run, "--limit", "2")).exit_code == 0
    path = run / "features" / "trainval" / "trainval_00001.npz"
    stamp = path.stat().st_mtime_ns
    result = CliRunner().invoke(cli, _args(toy_root, run, "--limit", "3"))
    assert result.exit_code == 0 and "1 images" in result.output
    assert "2 already cached" in result.output and path.stat().st_mtime_ns == stamp
    result = CliRunner().invoke(cli, _args(toy_root, run, "--limit", "3", "--force"))
    assert "3 images" in result.output and path.stat().st_mtime_ns != stamp
    # other scales: every file is stale, so none is skipped
    other = [a if a != SCALES_SET else "extract.scales=[80]" for a in _args(toy_root, run)]
    result = CliRunner().invoke(cli, [*other, "--limit", "3"])
    assert "3 images" in result.output and "0 already cached" in result.output
    with np.load(path, allow_pickle=False) as data:
        assert data["scales"].tolist() == [80] and "fmap_1" not in data.files


def test_test_split_has_no_flips(toy_root, tmp_path):
    run = tmp_path / "run"
    args = _args(toy_root, run, "--split", "test", "--limit", "1", "--set", "extract.flip=true")
    assert CliRunner().invoke(cli, args).exit_code == 0
    (path,) = (run / "features" / "test").glob("*.npz")
    with np.load(path, allow_pickle=False) as data:
        assert "flip_fmap_0" not in data.files


def test_feature_source_from_cache_matches_on_the_fly(toy_root, extracted):
    run, _ = extracted
    config = _config(toy_root, "extract.flip=true")
    record = split_records(config, "trainval", 1)[0]
    disk = open_feature_source(config, RunDir(run), "trainval", "cpu")
    live = open_feature_source(_config(toy_root, "extract.cache=none"), RunDir(run), "x", "cpu")
    assert (disk.channels, disk.geometry.stride, disk.geometry.offset0) == (256, 16, 21.0)
    assert disk.geometry.feature_dim(disk.channels) == 12_800
    boxes = np.array([[0, 0, record.width, record.height], [5, 5, 30, 40]], dtype=np.float32)
    for flipped in (False, True):
        from_disk, _ = disk.pool(record, boxes, flipped=flipped)
        computed, _ = live.pool(record, boxes, flipped=flipped)
        assert from_disk.shape == (2, 12_800) and from_disk.dtype == torch.float32
        assert torch.allclose(from_disk, computed, rtol=1e-3, atol=1e-3)  # float16 cache
    maps = disk.maps(record)
    assert [tuple(m.shape) for m in maps] == [
        (256, *(zf5_fmap_side(s) for s in resized_hw(record.image_hw, scale))) for scale in SCALES
    ]
    index = torch.tensor([1, 0])
    expected = torch.cat([disk.pool(record, boxes[i : i + 1], index[i : i + 1])[0] for i in (0, 1)])
    assert torch.equal(disk.pool(record, boxes, index)[0], expected)


def test_prefetched_maps_are_read_once_in_the_background(toy_root, extracted, monkeypatch):
    run, _ = extracted
    config = _config(toy_root, "extract.flip=true")
    first, second = split_records(config, "trainval", 2)
    expected = open_feature_source(config, RunDir(run), "trainval", "cpu").maps(second)
    source = open_feature_source(config, RunDir(run), "trainval", "cpu")
    threads, read = [], source._read
    monkeypatch.setattr(
        source,
        "_read",
        lambda *args: threads.append(threading.current_thread().name) or read(*args),
    )
    source.maps(first)
    source.prefetch(second)
    maps = source.maps(second)
    assert threads[0] == "MainThread" and threads[1].startswith("spp-prefetch")
    assert len(threads) == 2  # maps(second) took the prefetched maps
    assert all(torch.equal(a, b) for a, b in zip(maps, expected, strict=True))
    source.prefetch(first, flipped=True)  # the mirrored maps are not the ones asked for next
    unflipped = open_feature_source(config, RunDir(run), "trainval", "cpu").maps(first)
    assert all(torch.equal(a, b) for a, b in zip(source.maps(first), unflipped, strict=True))


def test_a_prefetched_broken_cache_fails_when_used(toy_root, extracted, tmp_path):
    run = Path(shutil.copytree(extracted[0], tmp_path / "run"))
    config = _config(toy_root, "extract.flip=true")
    first, second = split_records(config, "trainval", 2)
    broken = RunDir(run).feature_path("trainval", second.image_id)
    broken.write_bytes(b"not a zip")
    source = open_feature_source(config, RunDir(run), "trainval", "cpu")
    source.prefetch(second)
    source.maps(first)
    with pytest.raises(UserError, match=f"{broken.name}: unreadable cache file"):
        source.maps(second)


def test_feature_source_refuses_missing_flips_and_stale_cache(toy_root, tmp_path):
    run = tmp_path / "run"
    assert CliRunner().invoke(cli, _args(toy_root, run, "--limit", "1")).exit_code == 0
    config = _config(toy_root)
    record = split_records(config, "trainval", 1)[0]
    source = open_feature_source(config, RunDir(run), "trainval", "cpu")
    with pytest.raises(UserError, match=r"extract\.flip=true"):
        source.maps(record, flipped=True)
    with pytest.raises(UserError, match="spp-detect extract"):
        open_feature_source(
            _config(toy_root, "extract.scales=[64]"), RunDir(run), "trainval", "cpu"
        )
    with pytest.raises(UserError, match="spp-detect extract"):
        open_feature_source(config, RunDir(run), "test", "cpu")
    geometry = PoolGeometry(16, 21.0, 6.5, (6, 3, 2, 1), 224.0)
    cached = RunDir(run)
    other = FeatureSource(
        (96, 160), geometry, 256, "cpu", cache_path=lambda i: cached.feature_path("trainval", i)
    )
    with pytest.raises(UserError, match="cached for scales"):
        other.maps(record)


def test_cache_none_writes_nothing(toy_root, tmp_path):
    result = CliRunner().invoke(
        cli, _args(toy_root, tmp_path / "run", "--set", "extract.cache=none")
    )
    assert result.exit_code == 0 and "on the fly" in result.output
    assert not (tmp_path / "run" / "features").exists()


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("extract.backbone=resnet", "extract.backbone: unknown backbone"),
        ("extract.scales=[]", "extract.scales: empty"),
        ("extract.scales=[0,688]", "extract.scales: sizes must be positive"),
        ("extract.scales=[-5]", "extract.scales: sizes must be positive"),
        ("extract.cache=ram", "extract.cache"),
        ("extract.precision=int8", "extract.precision: must be one of fp32, bf16, fp16"),
        ("extract.scales=[20,96]", "extract.scales: 20 px is too small for zf5; use at least"),
    ],
)
def test_bad_settings_give_one_line_and_exit_2(toy_root, tmp_path, setting, message):
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, _args(toy_root, run, "--set", setting))
    assert result.exit_code == 2
    assert message in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("error")]) == 1
    assert not (run / "features").exists()


def test_wrong_weights_file_names_the_keys(toy_root, tmp_path):
    torch.save(build_backbone("alexnet", "none").state_dict(), tmp_path / "alexnet.pt")
    args = _args(toy_root, tmp_path / "run", "--set", f"extract.weights={tmp_path / 'alexnet.pt'}")
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert "alexnet.pt: weights do not fit the zf5 trunk" in result.output
    assert "features.0.weight (64, 3, 11, 11) vs (96, 3, 7, 7)" in result.output


def test_unreadable_image_stops_cleanly(toy_copy, tmp_path):
    broken = toy_copy / "JPEGImages" / "trainval_00003.jpg"
    data = broken.read_bytes()
    broken.write_bytes(data[: data.find(b"\xff\xda")])  # header parses, decoding fails
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, _args(toy_copy, run, "--limit", "4"))
    assert result.exit_code == 2
    assert "trainval_00003.jpg: not a readable image" in result.output
    out = run / "features" / "trainval"
    assert not (out / "manifest.json").exists()
    assert not list(out.glob(".*.tmp")) and not (out / "trainval_00003.npz").exists()
    for path in out.glob("*.npz"):  # whatever was written is complete
        with np.load(path, allow_pickle=False) as data:
            assert data["fmap_1"].shape[0] == 256


def test_out_of_gpu_memory_is_redone_on_the_cpu(toy_root, monkeypatch, caplog):
    from spp_detect.stages import extract as stage

    settings = ExtractConfig(scales=(64,))
    extractor = stage._Extractor(
        build_backbone("zf5", "none"), torch.device("cpu"), settings, False
    )
    extractor.cpu_backbone = build_backbone("zf5", "none")  # stands in for the CPU copy
    compute = stage.compute_maps

    def out_of_memory_on_the_device(backbone, *args, **kwargs):
        if backbone is extractor.backbone:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return compute(backbone, *args, **kwargs)

    monkeypatch.setattr(stage, "compute_maps", out_of_memory_on_the_device)
    monkeypatch.setattr(logging.getLogger("spp_detect"), "propagate", True)  # the CLI turns it off
    record = split_records(_config(toy_root), "trainval", 1)[0]
    arrays = extractor.arrays(record, read_record_image(record), "fingerprint")
    assert extractor.cpu_fallbacks == 1 and arrays["fmap_0"].shape[0] == 256
    assert "out of GPU memory; redoing this image on the CPU" in caplog.text
