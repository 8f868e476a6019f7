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

from spp_detect.cli import cli
from spp_detect.config import ExtractConfig, load_config
from spp_detect.data.image import resized_hw
from spp_detect.data.voc import read_split
from spp_detect.errors import UserError
from spp_detect.models.features import (
    FeatureSource,
    compute_maps,
    compute_maps_batch,
    prefetching,
    read_record_image,
)
from spp_detect.models.weights import build_backbone
from spp_detect.ops.spp import PoolGeometry
from spp_detect.runtime.artifacts import load_json
from spp_detect.runtime.device import device_failure
from spp_detect.runtime.run_dir import RunDir
from spp_detect.stages.builders import open_feature_source
from spp_detect.stages.context import split_records
from spp_detect.testing import same_size_toy_set, zf5_fmap_side  # conv5 size arithmetic by hand

TOY_CLASSES = "data.classes=[circle,square,triangle]"
SCALES = (96, 128)
SCALES_SET = "extract.scales=[96,128]"
# These tests check the cache against ZF-5's size arithmetic by hand: the trunk is pinned
ZF5 = ("extract.backbone=zf5", "extract.weights=none")


def _args(root: Path, run: Path, *extra: str) -> list[str]:
    return [
        "extract", "--run-dir", str(run), "--set", f"data.root={root}", "--set", TOY_CLASSES,
        "--set", SCALES_SET, "--set", ZF5[0], "--set", ZF5[1], "--device", "cpu", *extra,
    ]  # fmt: skip


def _config(root: Path, *extra: str):
    return load_config(None, [f"data.root={root}", TOY_CLASSES, SCALES_SET, *ZF5, *extra])


@pytest.fixture(scope="module")
def extracted(toy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """Three training images extracted with flips; returns the run folder and the CLI result."""
    run = tmp_path_factory.mktemp("extract") / "run"
    result = CliRunner().invoke(
        cli, _args(toy_root, run, "--limit", "3", "--set", "extract.flip=true")
    )
    assert result.exit_code == 0, result.output
    return run, result


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


def test_prefetching_reads_every_image_once_all_but_the_first_in_the_background(
    toy_root, extracted, monkeypatch
):
    """``prefetching`` asks for image p + 1 before the caller uses image p, whose read may still
    be pending: both reads are kept, so no image is read twice."""
    run, _ = extracted
    config = _config(toy_root, "extract.flip=true")
    records = split_records(config, "trainval", 3)
    source = open_feature_source(config, RunDir(run), "trainval", "cpu")
    reads, read = [], source._read
    monkeypatch.setattr(
        source, "_read",
        lambda record, *args: reads.append((record.image_id, threading.current_thread().name))
        or read(record, *args),
    )  # fmt: skip
    for record in prefetching(source, records):
        source.pool(record, np.array([[0.0, 0.0, 50.0, 50.0]], np.float32))
    in_main = [image for image, thread in reads if thread == "MainThread"]
    in_background = sorted(image for image, thread in reads if thread.startswith("spp-prefetch"))
    assert in_main == [records[0].image_id] and len(reads) == len(records)
    assert in_background == sorted(r.image_id for r in records[1:])


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
        ("extract.batch_images=0", "extract.batch_images must be 1 to 65536, got 0"),
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
    assert "alexnet.pt: holds alexnet weights but extract.backbone is zf5" in result.output


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


ILLEGAL_ACCESS = (
    "CUDA error: an illegal memory access was encountered\n"
    "CUDA kernel errors might be asynchronously reported at some other API call, so the "
    "stacktrace below might be incorrect.\n"
    "For debugging consider passing CUDA_LAUNCH_BLOCKING=1"
)


def _accelerator_errors() -> list[BaseException]:
    """torch.AcceleratorError, in the torch versions that have it (the GPU machine's 2.11 may
    not)."""
    if not hasattr(torch, "AcceleratorError"):
        return []
    try:
        return [torch.AcceleratorError("CUDA error: unspecified launch failure")]
    except TypeError:  # a constructor that wants more than a message: not built by hand
        return []


def test_device_failure_tells_the_devices_errors_from_the_others():
    illegal = device_failure(RuntimeError(ILLEGAL_ACCESS))
    assert illegal is not None and not illegal.out_of_memory
    assert illegal.reason == "an illegal memory access was encountered"
    oom = device_failure(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert oom is not None and oom.out_of_memory and oom.reason == "CUDA out of memory"
    assert device_failure(RuntimeError("CUDA error: out of memory")).out_of_memory
    cublas = device_failure(
        RuntimeError(
            "CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( handle)`"
        )
    )
    assert cublas.reason == "CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( handle)`"
    assert device_failure(RuntimeError("cuDNN error: CUDNN_STATUS_MAPPING_ERROR")).reason == (
        "cuDNN error: CUDNN_STATUS_MAPPING_ERROR"
    )
    long = device_failure(RuntimeError("CUDA error: " + "x" * 500))
    assert len(long.reason) == 160 and long.reason.endswith("…")
    for error in _accelerator_errors():
        assert device_failure(error).reason == "unspecified launch failure"
    # not raised by the device: left alone
    for other in [
        RuntimeError("shape '[2, 3]' is invalid for input of size 5"),
        ValueError("CUDA error: an illegal memory access was encountered"),
        KeyError("fmap_0"),
        MemoryError(),
    ]:
        assert device_failure(other) is None, other
    message = illegal.message("a.jpg", "extracting", 2, "x")
    assert message == (
        "a.jpg: CUDA error while extracting (an illegal memory access was encountered); "
        "the 2 images done are kept; rerun to resume"
    )
    assert "the 1 image done is kept" in illegal.message("a.jpg", "testing", 1, "x")
    assert oom.message("a.jpg", "testing", 0, "test.batch_windows=1").startswith(
        "a.jpg: out of GPU memory while testing; lower it with test.batch_windows=1; "
        "no image done yet"
    )


def _fail_on_call(monkeypatch, module, name: str, failing: int, error: BaseException) -> list:
    """Make ``module.name`` raise ``error`` on its ``failing``-th call (1-based); returns the
    list of calls made."""
    original, calls = getattr(module, name), []

    def faulty(*args, **kwargs):
        calls.append(args)
        if len(calls) == failing:
            raise error
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, faulty)
    return calls


def _error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("error:")]


def test_a_cuda_error_mid_extract_is_one_line_and_keeps_the_images_done(
    toy_root, tmp_path, monkeypatch
):
    """A CUDA error while extracting the 3rd image (injected: no GPU needed) stops the stage
    with one line naming it; the first two files stay, and a rerun resumes after them."""
    from spp_detect.stages import extract as stage

    run = tmp_path / "run"
    records = read_split(toy_root, "test", ("circle", "square", "triangle"))[:4]
    with monkeypatch.context() as patch:
        _fail_on_call(patch, stage, "compute_maps", 3, RuntimeError(ILLEGAL_ACCESS))
        result = CliRunner().invoke(cli, _args(toy_root, run, "--split", "test", "--limit", "4"))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.exception.__class__ is SystemExit
    assert _error_lines(result) == [
        f"error: {records[2].path}: CUDA error while extracting (an illegal memory access was "
        "encountered); the 2 images done are kept; rerun to resume"
    ]
    out = run / "features" / "test"
    done = [out / f"{r.image_id}.npz" for r in records[:2]]
    assert all(path.is_file() for path in done)
    assert (
        not (out / f"{records[2].image_id}.npz").exists() and not (out / "manifest.json").exists()
    )
    stamps = [path.stat().st_mtime_ns for path in done]
    result = CliRunner().invoke(cli, _args(toy_root, run, "--split", "test", "--limit", "4"))
    assert result.exit_code == 0, result.output
    assert "extract (test): 2 images" in result.output and "2 already cached" in result.output
    assert [path.stat().st_mtime_ns for path in done] == stamps


def test_any_other_error_mid_extract_is_not_taken_for_a_device_error(
    toy_root, tmp_path, monkeypatch
):
    from spp_detect.stages import extract as stage

    _fail_on_call(monkeypatch, stage, "compute_maps", 1, RuntimeError("a bug, not the device"))
    result = CliRunner().invoke(cli, _args(toy_root, tmp_path / "run", "--limit", "2"))
    assert result.exit_code == 1 and isinstance(result.exception, RuntimeError)


@pytest.fixture(scope="module")
def same_size_root(toy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return same_size_toy_set(toy_root, tmp_path_factory.mktemp("same") / "toy")


# batched against one image a pass, float32 maps: within this relative to each value, plus this
# times the map's largest value (a value near 0 is a sum that cancels: its own relative error
# is not bounded)
BATCH_RTOL = 1e-5


def test_batched_maps_equal_one_image_at_a_time(same_size_root):
    """compute_maps_batch against compute_maps, float32: within BATCH_RTOL, not bit for bit, as
    a conv may sum in another order for another batch size (oneDNN and cuDNN choose their
    algorithm and blocking by the input's shape)."""
    backbone = build_backbone("zf5", "none").eval()
    records = split_records(_config(same_size_root), "trainval", 4)
    images = [read_record_image(records[i]) for i in (0, 2, 3)]  # the 2nd has another size
    with torch.inference_mode():
        batched = compute_maps_batch(backbone, images, SCALES)
        for image, maps in zip(images, batched, strict=True):
            for single, fmap in zip(compute_maps(backbone, image, SCALES), maps, strict=True):
                atol = BATCH_RTOL * float(single.abs().max())
                torch.testing.assert_close(fmap, single, rtol=BATCH_RTOL, atol=atol)


@pytest.mark.slow  # three extract runs
def test_batch_images_groups_same_size_images_and_writes_each_file(
    same_size_root, tmp_path, monkeypatch
):
    """extract.batch_images=4 on 7 images: the 6 same-size ones in passes of 4 and 2 per scale
    (and as many for their mirrored images), the other one alone; the cached maps equal those of
    batch_images=1 up to one float16 step plus BATCH_RTOL of the map's largest value (the float32
    maps differ in their last bits, which can round to the neighbouring float16); a rerun skips
    every file."""
    from spp_detect.stages import extract as stage

    flip = ("--set", "extract.flip=true", "--limit", "7")
    one = tmp_path / "one"
    assert CliRunner().invoke(cli, _args(same_size_root, one, *flip)).exit_code == 0
    batch_sizes: list[int] = []
    batched = stage.compute_maps_batch

    def counted(backbone, images, *args, **kwargs):
        batch_sizes.append(len(images))
        return batched(backbone, images, *args, **kwargs)

    monkeypatch.setattr(stage, "compute_maps_batch", counted)
    four = tmp_path / "four"
    batch = ("--set", "extract.batch_images=4")
    result = CliRunner().invoke(cli, _args(same_size_root, four, *flip, *batch))
    assert result.exit_code == 0, result.output
    assert batch_sizes == [4, 4, 2, 2]  # each batch, then its mirrored images
    files = sorted((one / "features" / "trainval").glob("*.npz"))
    assert len(files) == 7
    for path in files:
        with (
            np.load(path, allow_pickle=False) as expected,
            np.load(four / "features" / "trainval" / path.name, allow_pickle=False) as actual,
        ):
            keys = [k for k in expected.files if "fmap_" in k]
            assert sorted(keys) == sorted(k for k in actual.files if "fmap_" in k) and keys
            for key in keys:
                assert actual[key].dtype == np.float16
                wanted = expected[key].astype(np.float32)
                # float16 has 10 mantissa bits: one step is at most 2⁻¹⁰ relative
                np.testing.assert_allclose(
                    actual[key].astype(np.float32), wanted,
                    rtol=2**-10, atol=BATCH_RTOL * float(np.abs(wanted).max()),
                )  # fmt: skip
    result = CliRunner().invoke(cli, _args(same_size_root, four, *flip, *batch))
    assert "7 already cached" in result.output and "extract (trainval): 0 images" in result.output


def test_batches_keep_the_order_with_one_image_a_batch(toy_root):
    from spp_detect.stages import extract as stage

    records = split_records(_config(toy_root), "trainval", 5)
    todo = [(record, Path(f"{record.image_id}.npz")) for record in records]
    assert stage._batches(todo, ExtractConfig(scales=SCALES)) == [[item] for item in todo]
    same = [(r, p) for r, p in todo]
    same[3] = (records[1], Path("again.npz"))  # the size of the 2nd image again
    batches = stage._batches(same, ExtractConfig(scales=SCALES, batch_images=4))
    assert batches == [[same[0]], [same[1], same[3]], [same[2]], [same[4]]]


def test_a_batch_out_of_gpu_memory_is_redone_one_image_at_a_time(
    same_size_root, monkeypatch, caplog
):
    from spp_detect.stages import extract as stage

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(stage, "compute_maps_batch", out_of_memory)
    monkeypatch.setattr(logging.getLogger("spp_detect"), "propagate", True)  # the CLI turns it off
    settings = ExtractConfig(scales=(64,), batch_images=2)
    backbone = build_backbone("zf5", "none")
    extractor = stage._Extractor(backbone, torch.device("cpu"), settings, False)
    records = split_records(_config(same_size_root), "trainval", 3)[::2]  # the 2nd: other size
    images = [read_record_image(record) for record in records]
    arrays = extractor.batch_arrays(records, images, ["a", "b"])
    assert "and 1 more: out of GPU memory in one batch; redoing them one at a time" in caplog.text
    assert extractor.cpu_fallbacks == 0  # redone on the device, one image a pass
    with torch.inference_mode():
        for image, image_arrays in zip(images, arrays, strict=True):
            (expected,) = compute_maps(backbone, image, (64,))
            assert np.array_equal(image_arrays["fmap_0"], expected.numpy().astype(np.float16))
    assert [str(a["fingerprint"]) for a in arrays] == ["a", "b"]


def test_cached_maps_are_not_pinned_on_the_cpu(toy_root, extracted, monkeypatch):
    """Page-locked memory only pays for copies to a GPU."""
    run, _ = extracted
    config = _config(toy_root, "extract.flip=true")
    first, second = split_records(config, "trainval", 2)

    def refuse(self, *args, **kwargs):
        raise AssertionError("pinned on the CPU path")

    monkeypatch.setattr(torch.Tensor, "pin_memory", refuse)
    source = open_feature_source(config, RunDir(run), "trainval", "cpu")
    source.maps(first)
    source.prefetch(second)
    assert all(fmap.device.type == "cpu" for fmap in source.maps(second))


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (
            RuntimeError(
                "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                "allocate memory: you tried to allocate 92160000000 bytes. Error code 12"
            ),
            "DefaultCPUAllocator: can't allocate memory: you tried to allocate 92160000000 bytes",
        ),
        (MemoryError("Unable to allocate 86 GiB for an array"), "Unable to allocate 86 GiB"),
    ],
    ids=["torch", "numpy"],
)
def test_out_of_memory_mid_extract_is_one_line_and_keeps_the_images_done(
    toy_root, tmp_path, monkeypatch, error, reason
):
    """Out of the machine's memory on the 3rd image (a 20,000 px scale under `ulimit -v` was a
    traceback, issue 27): one line naming the image and the settings that lower it; the first
    two files stay."""
    from spp_detect.stages import extract as stage

    run = tmp_path / "run"
    records = read_split(toy_root, "test", ("circle", "square", "triangle"))[:4]
    _fail_on_call(monkeypatch, stage, "compute_maps", 3, error)
    result = CliRunner().invoke(cli, _args(toy_root, run, "--split", "test", "--limit", "4"))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    (line,) = _error_lines(result)
    assert line.startswith(f"error: {records[2].path}: out of memory while extracting ({reason}")
    assert line.endswith(
        "lower it with extract.batch_images=1, smaller extract.scales, extract.max_long_side "
        "(e.g. 1000) or extract.precision=bf16; the 2 images done are kept; rerun to resume"
    )
    out = run / "features" / "test"
    assert all((out / f"{r.image_id}.npz").is_file() for r in records[:2])
    assert not (out / "manifest.json").exists()
