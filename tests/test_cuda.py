"""The CUDA path (issue 13): every stage on the toy set on cuda, CPU against GPU, the
out-of-memory fallback of extract, bf16 autocast, cached maps read through pinned memory, and
same-size image batching in extract.

Marked ``cuda`` and skipped without a CUDA device: ``pytest -m cuda`` runs them, and
``scripts/gpu_check.sh`` runs that on a machine lent a GPU. Without CUDA,
``SPP_CUDA_TESTS_ON_CPU=1`` runs them with the CPU standing in for the device (the GPU check's
dry run does), so that their own code is exercised before a GPU is lent; the few that use
CUDA-only APIs (streams, the sync debug mode, the out-of-memory retry) still skip. Proposals
come from a ``.mat`` of jittered ground truth and random boxes (``testing.write_proposal_mat``),
so nothing needs OpenCV's contrib modules, which the GPU machine lacks.

CPU against GPU: the conv5 maps within 1e-3 of their largest value with TF32 off; pooling exact
(a max) given the same maps; the toy mAP of the same trained models within half a point. The
models are trained once, on the GPU: two trainings on two devices differ by training noise,
which is not what is tested here.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from spp_detect import testing
from spp_detect.data.toy import TOY_CLASSES
from spp_detect.data.voc import read_split
from spp_detect.models.features import (
    compute_maps,
    compute_maps_batch,
    prefetching,
    read_record_image,
)
from spp_detect.models.head import load_head
from spp_detect.ops.spp import inverse_permutation, pool_windows
from spp_detect.runtime.artifacts import load_npz
from spp_detect.stages.builders import (
    build_detector,
    build_trunk,
    live_feature_source,
    load_proposals,
    open_feature_source,
)

HAS_CUDA = torch.cuda.is_available()
ON_CPU = not HAS_CUDA and os.environ.get("SPP_CUDA_TESTS_ON_CPU") == "1"
DEVICE = "cuda" if HAS_CUDA else "cpu"  # the device under test
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not (HAS_CUDA or ON_CPU), reason="needs a CUDA device"),
]
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="uses CUDA-only APIs")

PROPOSALS_PER_IMAGE = 300
MAP_FLOOR = 0.3  # as the CPU toy run (tests/test_pipeline.py): far above chance
CONV_TOLERANCE = 1e-3  # issue 13: CPU against GPU conv5 maps, max |difference| / max |map|


@pytest.fixture(scope="module")
def gpu_run(toy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The toy pipeline, every stage on cuda: the run folder and the CLI output."""
    folder = tmp_path_factory.mktemp("cuda")
    records = [r for s in ("trainval", "test") for r in read_split(toy_root, s, TOY_CLASSES)]
    mat = testing.write_proposal_mat(folder / "proposals.mat", records, PROPOSALS_PER_IMAGE)
    run_dir = folder / "run"
    args = testing.toy_args(toy_root, run_dir, "propose.method=mat", f"propose.mat_file={mat}")
    result = testing.invoke("run", *args, "--device", DEVICE)
    assert result.exit_code == 0, result.output
    return run_dir, result.output


@pytest.fixture
def without_tf32():
    """Full fp32 products and convolutions on the GPU (cuDNN uses TF32 by default)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def on_device(tensor: torch.Tensor) -> bool:
    return tensor.device.type == DEVICE


def max_relative_error(expected: torch.Tensor, actual: torch.Tensor) -> float:
    """max |actual − expected| / max |expected|, on the CPU."""
    expected, actual = expected.float().cpu(), actual.float().cpu()
    return float((actual - expected).abs().max() / expected.abs().max())


def test_every_stage_runs_on_cuda(gpu_run):
    run_dir, output = gpu_run
    for path in [
        "features/trainval/manifest.json",
        "features/test/manifest.json",
        "finetune/head.pt",
        "svm/svms.npz",
        "bbox_reg/regressors.npz",
        "detections/test.npz",
    ]:
        assert (run_dir / path).is_file(), path
    assert "redone on the CPU" not in output  # no image fell back
    assert json.loads((run_dir / "eval/test.json").read_text())["mAP"] >= MAP_FLOOR


def test_conv5_maps_match_the_cpu(gpu_run, without_tf32):
    config, run_dir, records = testing.trained_test_split(gpu_run[0])
    cpu = live_feature_source(config, run_dir, "cpu")
    gpu = live_feature_source(config, run_dir, DEVICE)
    for record in records:
        for cpu_map, gpu_map in zip(cpu.maps(record), gpu.maps(record), strict=True):
            assert on_device(gpu_map)
            assert max_relative_error(cpu_map, gpu_map) <= CONV_TOLERANCE, record.image_id


@pytest.mark.parametrize("engine", ["auto", "blockmax"])  # roi_pool on CUDA, and the CPU's
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # computed, and as cached
def test_pooled_vectors_identical_given_identical_maps(gpu_run, dtype, engine):
    config, run_dir, records = testing.trained_test_split(gpu_run[0])
    source = live_feature_source(config, run_dir, "cpu")
    g = source.geometry
    for record in records:
        maps = [fmap.to(dtype) for fmap in source.maps(record)]
        proposals = load_proposals(config, run_dir, config.data.test_split, record)
        index = source.scale_index(record, proposals)
        scales = source.image_scales(record)
        args = (proposals, record.image_hw, scales, index, g)
        cpu_pooled, _ = pool_windows(maps, *args)
        gpu_maps = [fmap.to(DEVICE) for fmap in maps]
        gpu_pooled, _ = pool_windows(gpu_maps, *args, engine=engine)
        assert on_device(gpu_pooled) and torch.equal(gpu_pooled.cpu(), cpu_pooled)
        # the test path's order (pooling order, no final reorder) may differ; the rows may not
        pooled, rows = pool_windows(gpu_maps, *args, keep_order=False, engine=engine)
        in_order = pooled[inverse_permutation(rows).to(pooled.device)]
        assert torch.equal(in_order.cpu(), cpu_pooled)


@needs_cuda
def test_pooling_and_fc7_queue_without_waiting_for_the_device(gpu_run):
    """Detector.window_features (cached maps read, pooled, fc6/fc7) makes no host-device
    synchronisation, so the CPU plans the next image while the GPU works
    (docs/method.md#gpu-path)."""
    config, run_dir, records = testing.trained_test_split(gpu_run[0])
    split = config.data.test_split
    detector = build_detector(config, run_dir, DEVICE)
    source = open_feature_source(config, run_dir, split, DEVICE)
    proposals = [load_proposals(config, run_dir, split, record) for record in records]
    with torch.inference_mode():
        detector.window_features(source, records[0], proposals[0])  # warm-up: allocations
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for record, boxes in zip(records[1:], proposals[1:], strict=True):
                pooled, fc7, rows = detector.window_features(source, record, boxes)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert all(on_device(t) for t in (pooled, fc7, rows)) and len(rows) == len(proposals[-1])


def test_toy_map_matches_the_cpu(gpu_run, without_tf32):
    config, run_dir, records = testing.trained_test_split(gpu_run[0])
    maps = {}
    for device in dict.fromkeys(("cpu", DEVICE)):  # once when the CPU stands in for the device
        detector = build_detector(config, run_dir, device)
        source = live_feature_source(config, run_dir, device)
        maps[device] = testing.detector_map(detector, source, config, run_dir, records)
    assert abs(maps[DEVICE] - maps["cpu"]) <= testing.MAP_TOLERANCE, maps


@needs_cuda
def test_out_of_gpu_memory_redoes_the_image_on_the_cpu(gpu_run, toy_root, tmp_path, monkeypatch):
    """An injected CUDA OOM on the first image: extract redoes it with its CPU copy of the
    trunk, carries on with the GPU for the others, and caches maps like the GPU's."""
    from spp_detect.stages import extract as stage

    compute, devices = stage.compute_maps, []

    def out_of_memory_once(backbone, *args, **kwargs):
        devices.append(next(backbone.parameters()).device.type)
        if devices == ["cuda"]:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return compute(backbone, *args, **kwargs)

    monkeypatch.setattr(stage, "compute_maps", out_of_memory_once)
    run_dir = tmp_path / "run"
    args = testing.toy_args(toy_root, run_dir)
    result = testing.invoke("extract", *args, "--split", "test", "--device", DEVICE)
    assert result.exit_code == 0, result.output
    assert "1 redone on the CPU" in result.output
    assert devices[:3] == ["cuda", "cpu", "cuda"]  # the retry ran on the CPU copy, then back
    first = read_split(toy_root, "test", TOY_CLASSES)[0].image_id
    redone = load_npz(run_dir / f"features/test/{first}.npz")
    on_gpu = load_npz(gpu_run[0] / f"features/test/{first}.npz")
    for key in (k for k in on_gpu if k.startswith("fmap_")):
        expected, actual = (torch.from_numpy(np.asarray(a[key])) for a in (on_gpu, redone))
        assert max_relative_error(expected, actual) <= testing.FMAP_TOLERANCE, key


def test_bf16_trunk_on_cuda_keeps_the_maps_and_the_map(gpu_run):
    config, run_dir, records = testing.trained_test_split(gpu_run[0])
    half_config = replace(config, extract=replace(config.extract, precision="bf16"))
    full = live_feature_source(config, run_dir, DEVICE)
    half = live_feature_source(half_config, run_dir, DEVICE)
    for record in records:
        for full_map, half_map in zip(full.maps(record), half.maps(record), strict=True):
            assert half_map.dtype == torch.float32
            assert testing.map_error(full_map, half_map) <= testing.HALF_FMAP_TOLERANCE
    detector = build_detector(config, run_dir, DEVICE)
    full_ap = testing.detector_map(detector, full, config, run_dir, records)
    half_ap = testing.detector_map(detector, half, config, run_dir, records)
    assert abs(full_ap - half_ap) <= testing.BF16_TRUNK_MAP_TOLERANCE


def test_bf16_fc_on_cuda_keeps_the_scores_and_the_map(gpu_run):
    config, run_dir, records = testing.trained_test_split(gpu_run[0])
    source = live_feature_source(config, run_dir, DEVICE)
    testing.assert_fc_precision_keeps_scores_and_map(
        config, run_dir, records, source, "bf16", DEVICE
    )


@pytest.mark.parametrize("conv_from", ["", "stage5"], ids=["head", "end-to-end"])
def test_finetune_with_a_box_branch_on_cuda(gpu_run, toy_root, tmp_path, conv_from):
    """The box branch's loss on the device, with targets built on the CPU (Fast R-CNN's
    multi-task loss, ``finetune.bbox_loss_weight``), for the head alone and end to end."""
    run_dir = Path(shutil.copytree(gpu_run[0], tmp_path / "run"))
    sets = [
        "propose.method=mat", f"propose.mat_file={gpu_run[0].parent / 'proposals.mat'}",
        "finetune.bbox_loss_weight=1.0", "finetune.iterations=6", f"finetune.conv_from={conv_from}",
    ]  # fmt: skip
    result = testing.invoke(
        "finetune", *testing.toy_args(toy_root, run_dir, *sets), "--device", DEVICE, "--force"
    )
    assert result.exit_code == 0, result.output
    assert load_head(run_dir / "finetune/head.pt").bbox is not None


@needs_cuda
def test_pooled_windows_from_the_cache_on_cuda_equal_the_cpu(gpu_run, monkeypatch):
    """Cached maps go to the GPU from pinned memory with non_blocking copies, the next image's
    read in a background thread; the windows pooled from them equal the CPU's (pooling is a max,
    exact in float16), also when the caller works on a stream of its own, which the background
    copies must then be queued on."""
    config, run_dir, records = testing.trained_test_split(gpu_run[0])
    split = config.data.test_split
    cpu = open_feature_source(config, run_dir, split, "cpu")
    pin, pinned = torch.Tensor.pin_memory, []

    def counted_pin(tensor: torch.Tensor, *args) -> torch.Tensor:
        if tensor.dtype == torch.float16:  # a cached map (pooling pins its int64/float32 plans)
            pinned.append(1)
        return pin(tensor, *args)

    monkeypatch.setattr(torch.Tensor, "pin_memory", counted_pin)
    for stream in (torch.cuda.current_stream(), torch.cuda.Stream()):
        gpu = open_feature_source(config, run_dir, split, DEVICE)  # nothing read yet
        with torch.cuda.stream(stream):
            for record in prefetching(gpu, records):
                proposals = load_proposals(config, run_dir, split, record)
                pooled, _ = gpu.pool(record, proposals)
                expected, _ = cpu.pool(record, proposals)
                assert on_device(pooled) and torch.equal(pooled.cpu(), expected), record.image_id
    # every map read once, both times (the first image's, read when pooled, may skip a scale)
    scales = len(config.extract.scales)
    assert 2 * (len(records) - 1) * scales <= len(pinned) <= 2 * len(records) * scales


BATCH_TOLERANCE = CONV_TOLERANCE  # another batch size may pick another cuDNN algorithm


def test_batched_maps_on_cuda_equal_one_image_at_a_time(gpu_run, without_tf32):
    """compute_maps_batch on the GPU against compute_maps, on test images cropped to one size."""
    config, run_dir, records = testing.trained_test_split(gpu_run[0])
    backbone = build_trunk(config, run_dir).to(DEVICE).eval()
    images = [read_record_image(record)[:230, :260] for record in records[:4]]
    scales, cap = config.extract.scales, config.extract.max_long_side
    with torch.inference_mode():
        batched = compute_maps_batch(backbone, images, scales, cap)
        for image, maps in zip(images, batched, strict=True):
            for single, fmap in zip(compute_maps(backbone, image, scales, cap), maps, strict=True):
                assert on_device(fmap) and fmap.shape == single.shape
                assert max_relative_error(single, fmap) <= BATCH_TOLERANCE


def test_batch_images_on_cuda_caches_maps_like_one_image_at_a_time(
    toy_root, tmp_path, without_tf32
):
    """extract --device cuda with extract.batch_images=4 on toy images cropped to one size (and
    mirrored): each image's file, with maps like those of batch_images=1."""
    root = testing.same_size_toy_set(toy_root, tmp_path / "toy")
    runs = {}
    for size in (1, 4):
        runs[size] = tmp_path / f"batch{size}"
        sets = [f"data.root={root}", "extract.flip=true", f"extract.batch_images={size}"]
        sets_args = [part for item in sets for part in ("--set", item)]
        args = ["-c", "toy", "--run-dir", str(runs[size]), "--device", DEVICE, *sets_args]
        result = testing.invoke("extract", *args, "--limit", "7")
        assert result.exit_code == 0, result.output
    files = sorted((runs[1] / "features" / "trainval").glob("*.npz"))
    assert len(files) == 7
    for path in files:
        expected = load_npz(path)
        actual = load_npz(runs[4] / "features" / "trainval" / path.name)
        for key in (k for k in expected if "fmap_" in k):
            one, four = (torch.from_numpy(np.asarray(a[key])) for a in (expected, actual))
            assert max_relative_error(one, four) <= BATCH_TOLERANCE, (path.name, key)
