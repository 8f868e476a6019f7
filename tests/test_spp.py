"""spp.py against slow references (docs/method.md#scale-selection, #projection, and
``spp_detect.testing.reference_pool`` for docs/method.md#spatial-pyramid-pooling), plus hand
cases."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from spp_detect.ops import _blockmax, spp
from spp_detect.ops.spp import (
    PoolGeometry,
    SpatialPyramidPool,
    dedup_keys,
    pool_windows,
    project_boxes,
    pyramid_dim,
    select_scale,
    spatial_pyramid_pool,
    window_cells,
)
from spp_detect.testing import cpu_and_cuda, random_boxes, reference_pool, zf5_fmap_side

ZF5 = {"stride": 16, "offset0": 21.0, "offset": 6.5}  # released spp_config.m (method.md#projection)
LEVELS = (6, 3, 2, 1)
ZF5_POOL = PoolGeometry(**ZF5, levels=LEVELS, target_size=224.0)


# ------------------------------------------------ slow references (scale selection, projection)


def reference_select_scale(box, image_hw, scales, target=224.0) -> int:
    """docs/method.md#scale-selection: e = target·m/√A, nearest scale, ties to the smaller."""
    x1, y1, x2, y2 = (float(v) for v in box)
    expected = target * min(image_hw) / math.sqrt((x2 - x1) * (y2 - y1))
    best = None
    for k, scale in enumerate(scales):
        distance = abs(scale - expected)
        if best is None or distance < best[0] or (distance == best[0] and scale < scales[best[1]]):
            best = (distance, k)
    return best[1]


def reference_edges(box, image_hw, scale, stride, offset0, offset) -> tuple[int, int, int, int]:
    """docs/method.md#projection steps 1–3 for one box, 1-based, unclamped."""
    x1, y1, x2, y2 = float(box[0]) + 1, float(box[1]) + 1, float(box[2]), float(box[3])
    m = min(image_hw)

    def scaled(v: float) -> float:
        return (v - 1) * (scale - 1) / (m - 1) + 1

    left = math.floor((scaled(x1) - offset0 + offset) / stride + 0.5) + 1
    top = math.floor((scaled(y1) - offset0 + offset) / stride + 0.5) + 1
    right = math.ceil((scaled(x2) - offset0 - offset) / stride - 0.5) + 1
    bottom = math.ceil((scaled(y2) - offset0 - offset) / stride - 0.5) + 1
    return left, top, right, bottom


def reference_project(box, image_hw, scale, fmap_hw, stride, offset0, offset):
    """docs/method.md#projection steps 1–6 for one box → 0-based inclusive cells."""
    left, top, right, bottom = reference_edges(box, image_hw, scale, stride, offset0, offset)
    if left > right:
        left = right = math.trunc((left + right) / 2)  # C integer division
    if top > bottom:
        top = bottom = math.trunc((top + bottom) / 2)
    fmap_h, fmap_w = fmap_hw
    left, right = min(max(left, 1), fmap_w), min(max(right, 1), fmap_w)
    top, bottom = min(max(top, 1), fmap_h), min(max(bottom, 1), fmap_h)
    return left - 1, top - 1, right - 1, bottom - 1


def mixed_boxes(rng: np.random.Generator, count: int, image_hw, min_side=1.0) -> np.ndarray:
    """``testing.random_boxes`` from ``min_side`` px to the whole image, the first half rounded
    to whole pixels (as VOC boxes are)."""
    boxes = random_boxes(rng, count, image_hw, min_side=min_side)
    half = boxes[: count // 2]
    half[:] = np.round(half)
    half[:, 2:] = np.maximum(half[:, 2:], half[:, :2] + 1)
    return boxes


def relu_map(rng: np.random.Generator, channels: int, height: int, width: int) -> torch.Tensor:
    """A post-ReLU-like map: non-negative with many exact zeros."""
    return torch.from_numpy(np.maximum(rng.standard_normal((channels, height, width)), 0)).float()


# -------------------- hand cases (docs/method.md#projection, #spatial-pyramid-pooling)


def test_224_box_at_scale_224_covers_13_by_13_cells():
    assert zf5_fmap_side(224) == 13
    cells = project_boxes(
        torch.tensor([[0.0, 0.0, 224.0, 224.0]]), (224, 224), 224, (13, 13), **ZF5
    )
    assert cells.tolist() == [[0, 0, 12, 12]]  # L = ⌊−0.34⌋+1 = 0 → clamped to 1; R = 13


def test_bins_of_a_13_cell_window():
    """A one-hot map (channel c lights cell c) shows which cells each bin takes."""
    fmap = torch.eye(13).reshape(13, 1, 13)  # C = 13, H = 1, W = 13
    pooled = spatial_pyramid_pool(fmap, torch.tensor([[0, 0, 12, 0]]), LEVELS)[0]
    expected = {
        6: [(0, 3), (2, 5), (4, 7), (6, 9), (8, 11), (10, 13)],
        3: [(0, 5), (4, 9), (8, 13)],
        2: [(0, 7), (6, 13)],
        1: [(0, 13)],
    }
    column = 0
    for n in LEVELS:
        level = pooled[column : column + 13 * n * n].reshape(13, n, n)
        column += 13 * n * n
        for i in range(n):  # every bin row covers the single map row
            spans = []
            for j in range(n):
                lit = torch.nonzero(level[:, i, j]).flatten().tolist()
                spans.append((lit[0], lit[-1] + 1))
                assert lit == list(range(lit[0], lit[-1] + 1))
            assert spans == expected[n]


def test_one_pixel_box_collapses_to_one_cell():
    # x1 = 108 → 1-based 109: L = ⌊(109−21+6.5)/16+0.5⌋+1 = 7, R = ⌈(109−21−6.5)/16−0.5⌉+1 = 6;
    # L > R → both ⌊13/2⌋ = 6 → 0-based 5 (docs/method.md#projection step 4)
    box = np.array([[108.0, 108.0, 109.0, 109.0]], dtype=np.float32)
    assert reference_edges(box[0], (300, 300), 300, **ZF5)[0::2] == (7, 6)
    cells = project_boxes(box, (300, 300), 300, (17, 17), **ZF5)
    assert cells.tolist() == [[5, 5, 5, 5]]


def test_one_pixel_box_in_the_corner():
    cells = project_boxes(np.array([[0.0, 0.0, 1.0, 1.0]]), (300, 300), 300, (17, 17), **ZF5)
    assert cells.tolist() == [[0, 0, 0, 0]]


def test_full_image_box_covers_the_whole_map():
    image_hw = (300, 400)
    fmap_hw = (zf5_fmap_side(300), zf5_fmap_side(400))
    assert fmap_hw == (17, 24)
    cells = project_boxes(np.array([[0.0, 0.0, 400.0, 300.0]]), image_hw, 300, fmap_hw, **ZF5)
    assert cells.tolist() == [[0, 0, 23, 16]]  # bottom: B = 18 clamped to H_f = 17


def test_box_on_the_border_and_beyond_is_clamped():
    image_hw, fmap_hw = (300, 400), (17, 24)
    boxes = np.array([[350.0, 250.0, 400.0, 300.0], [-40.0, -40.0, 450.0, 350.0]])
    cells = project_boxes(boxes, image_hw, 300, fmap_hw, **ZF5)
    assert cells.tolist()[1] == [0, 0, 23, 16]
    assert cells.tolist()[0] == list(reference_project(boxes[0], image_hw, 300, fmap_hw, **ZF5))
    assert cells[0, 2] == 23 and cells[0, 3] == 16


def test_projection_scales_about_pixel_one():
    """At twice the shorter side, 1-based x maps to (x−1)(S−1)/(m−1)+1 (projection step 2)."""
    box = np.array([[99.0, 99.0, 200.0, 200.0]])  # 1-based 100 … 200
    image_hw, scale = (301, 301), 601  # factor (601−1)/(301−1) = 2
    left, top, right, bottom = reference_edges(box[0], image_hw, scale, **ZF5)
    assert left == math.floor((199 - 21 + 6.5) / 16 + 0.5) + 1  # x1' = 99·2 + 1 = 199
    assert right == math.ceil((399 - 21 - 6.5) / 16 - 0.5) + 1  # x2' = 199·2 + 1 = 399
    cells = project_boxes(box, image_hw, scale, (40, 40), **ZF5)
    assert cells.tolist() == [[left - 1, top - 1, right - 1, bottom - 1]]


def test_scale_selection_ties_go_to_the_smaller_scale():
    # m = 300, √A = 448 → e = 224·300/448 = 150, halfway between 100 and 200
    box = torch.tensor([[0.0, 0.0, 448.0, 448.0]])
    assert select_scale(box, (300, 500), (100, 200)).tolist() == [0]
    assert select_scale(box, (300, 500), (200, 100)).tolist() == [1]  # order does not matter
    slightly_smaller = torch.tensor([[0.0, 0.0, 447.0, 448.0]])  # e > 150 → 200
    assert select_scale(slightly_smaller, (300, 500), (100, 200)).tolist() == [1]


def test_scale_selection_paper_scales():
    scales = (480, 576, 688, 864, 1200)
    image_hw = (375, 500)
    boxes = torch.tensor([[0.0, 0.0, 500.0, 375.0], [10.0, 10.0, 40.0, 40.0], [0, 0, 122, 122]])
    # e = 224·375/433 = 194 → 480; e = 224·375/30 = 2800 → 1200; e = 224·375/122 = 688.5 → 688
    assert select_scale(boxes, image_hw, scales).tolist() == [0, 4, 2]


def test_output_dimension_is_12800_for_256_channels():
    assert pyramid_dim(256, LEVELS) == 12_800
    fmap = torch.rand(256, 13, 13)
    assert spatial_pyramid_pool(fmap, torch.tensor([[0, 0, 12, 12]]), LEVELS).shape == (1, 12_800)


def test_whole_window_level_one_is_the_channel_max():
    fmap = torch.rand(8, 5, 7)
    pooled = spatial_pyramid_pool(fmap, torch.tensor([[0, 0, 6, 4]]), LEVELS)
    assert torch.equal(pooled[0, -8:], fmap.amax(dim=(1, 2)))


def test_empty_window_list():
    pooled = spatial_pyramid_pool(
        torch.rand(4, 5, 5), torch.zeros((0, 4), dtype=torch.long), LEVELS
    )
    assert pooled.shape == (0, 200)


def test_cells_outside_the_map_are_refused():
    with pytest.raises(ValueError):
        spatial_pyramid_pool(torch.rand(4, 5, 5), torch.tensor([[0, 0, 5, 4]]), LEVELS)


# ---------------------------------------------------------------- vectorised vs reference


@pytest.mark.parametrize("scale", [160, 224, 480, 688])
def test_projection_matches_reference_on_random_boxes(scale):
    rng = np.random.default_rng(scale)
    image_hw = (333, 500)
    boxes = mixed_boxes(rng, 500, image_hw)
    resized = (scale, round(scale * 500 / 333))
    fmap_hw = (zf5_fmap_side(resized[0]), zf5_fmap_side(resized[1]))
    cells = project_boxes(boxes, image_hw, scale, fmap_hw, **ZF5)
    expected = [reference_project(b, image_hw, scale, fmap_hw, **ZF5) for b in boxes]
    assert cells.tolist() == [list(e) for e in expected]
    keys = dedup_keys(boxes, image_hw, [scale], torch.zeros(len(boxes)), ZF5_POOL)
    assert keys[:, :4].tolist() == [list(reference_edges(b, image_hw, scale, **ZF5)) for b in boxes]


def test_scale_selection_matches_reference_on_random_boxes():
    rng = np.random.default_rng(1)
    image_hw, scales = (333, 500), (480, 576, 688, 864, 1200)
    boxes = mixed_boxes(rng, 2000, image_hw)
    expected = [reference_select_scale(b, image_hw, scales) for b in boxes]
    assert select_scale(boxes, image_hw, scales).tolist() == expected


def random_cells(rng: np.random.Generator, count: int, height: int, width: int) -> np.ndarray:
    """(count, 4) windows of any size on a height × width map; the first three are the whole
    map, one cell and the bottom-right corner."""
    left = rng.integers(0, width, count)
    top = rng.integers(0, height, count)
    right = np.minimum(left + rng.integers(0, width, count), width - 1)
    bottom = np.minimum(top + rng.integers(0, height, count), height - 1)
    cells = np.stack([left, top, right, bottom], axis=1)
    cells[:3] = [[0, 0, width - 1, height - 1], [5, 5, 5, 5], [width - 1, height - 1] * 2]
    return cells


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("levels", [LEVELS, (4, 3, 2), (7, 5, 1), (1,)])
def test_pooling_matches_reference_on_random_windows(levels, device):
    """On the CPU the block-max engine; on CUDA roi_pool where its bins are exact (``auto``)."""
    rng = np.random.default_rng(sum(levels))
    fmap = relu_map(rng, 16, 23, 37)
    cells = random_cells(rng, 300, 23, 37)
    pooled = spatial_pyramid_pool(fmap.to(device), torch.from_numpy(cells), levels)
    expected = torch.from_numpy(reference_pool(fmap.numpy(), cells, levels))
    assert pooled.device.type == device and torch.equal(pooled.cpu(), expected)
    module = SpatialPyramidPool(levels)
    assert torch.equal(module(fmap.to(device), torch.from_numpy(cells)), pooled)


@pytest.mark.parametrize("chunk_bytes", [1, 40_000])  # 1 window per chunk; 17 or 8
@pytest.mark.parametrize("levels", [LEVELS, (7, 5, 1)])
def test_pooling_in_cache_sized_chunks_matches_reference(monkeypatch, chunk_bytes, levels):
    monkeypatch.setattr(_blockmax, "POOL_CHUNK_BYTES", chunk_bytes)
    rng = np.random.default_rng(11)
    fmap = relu_map(rng, 16, 23, 37)
    cells = random_cells(rng, 300, 23, 37)
    pooled = spatial_pyramid_pool(fmap, torch.from_numpy(cells), levels)
    assert torch.equal(pooled, torch.from_numpy(reference_pool(fmap.numpy(), cells, levels)))


def pool_windows_case(seed: int, count: int = 40):
    """Positional arguments of ``pool_windows`` for ``count`` windows over two 4-channel maps."""
    rng = np.random.default_rng(seed)
    image_hw, scales = (120, 160), (96, 128)
    maps = [relu_map(rng, 4, 5, 7), relu_map(rng, 4, 7, 9)]
    boxes = mixed_boxes(rng, count, image_hw)
    return (maps, boxes, image_hw, scales, torch.from_numpy(rng.integers(0, 2, count)))


def test_pool_windows_unordered_rows_reorder_to_input_order():
    args = pool_windows_case(13, count=60)
    ordered, arange = pool_windows(*args, geometry=ZF5_POOL)
    pooled, rows = pool_windows(*args, geometry=ZF5_POOL, keep_order=False)
    assert torch.equal(arange, torch.arange(60))
    assert sorted(rows.tolist()) == list(range(60)) and not torch.equal(rows, arange)
    assert torch.equal(pooled, ordered[rows])
    assert torch.equal(pooled[spp.inverse_permutation(rows)], ordered)


def test_pool_windows_into_a_larger_buffer():
    args = pool_windows_case(12)
    expected, _ = pool_windows(*args, geometry=ZF5_POOL)
    buffer = torch.full((50, 200), -1.0)
    pooled, rows = pool_windows(*args, geometry=ZF5_POOL, out=buffer, keep_order=False)
    assert pooled.data_ptr() == buffer.data_ptr() and pooled.shape == (40, 200)
    assert torch.equal(pooled, expected[rows]) and bool((buffer[40:] == -1).all())
    with pytest.raises(ValueError, match="cannot hold 40 rows of 200"):
        pool_windows(*args, geometry=ZF5_POOL, out=torch.empty(39, 200), keep_order=False)
    with pytest.raises(ValueError, match="cannot hold 40 rows of 200"):
        pool_windows(*args, geometry=ZF5_POOL, out=torch.empty(39, 200))


def test_pool_windows_in_input_order_into_a_buffer():
    """keep_order with ``out``: the result is still the buffer's first R rows, in input order."""
    args = pool_windows_case(14)
    expected, _ = pool_windows(*args, geometry=ZF5_POOL)
    buffer = torch.full((45, 200), -1.0, dtype=torch.float64)
    pooled, rows = pool_windows(*args, geometry=ZF5_POOL, out=buffer)
    assert pooled.data_ptr() == buffer.data_ptr() and pooled.dtype == torch.float64
    assert torch.equal(rows, torch.arange(40)) and bool((buffer[40:] == -1).all())
    assert torch.equal(pooled, expected.double())


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_pool_windows_matches_reference_at_several_scales(device):
    """Boxes → best scale → cells → pyramid, against the reference, rows in input order."""
    rng = np.random.default_rng(7)
    image_hw, scales = (150, 200), (96, 128, 224)
    fmaps = [
        relu_map(rng, 8, zf5_fmap_side(s), zf5_fmap_side(round(s * 200 / 150))) for s in scales
    ]
    on_device = [fmap.to(device) for fmap in fmaps]
    boxes = mixed_boxes(rng, 400, image_hw, min_side=4.0)
    scale_index = select_scale(boxes, image_hw, scales, target=100.0)  # all three in use
    assert len(set(scale_index.tolist())) == 3
    pooled, rows = pool_windows(on_device, boxes, image_hw, scales, scale_index, ZF5_POOL)
    assert pooled.device.type == device
    pooled = pooled.cpu()
    expected = []
    for box, k in zip(boxes, scale_index.tolist(), strict=True):
        fmap_hw = tuple(fmaps[k].shape[1:])
        cells = [reference_project(box, image_hw, scales[k], fmap_hw, **ZF5)]
        expected.append(reference_pool(fmaps[k].numpy(), cells, LEVELS)[0])
    assert pooled.dtype == torch.float32 and torch.equal(rows, torch.arange(400))
    assert torch.equal(pooled, torch.from_numpy(np.stack(expected)))
    unordered, rows = pool_windows(
        on_device, boxes, image_hw, scales, scale_index, ZF5_POOL, keep_order=False
    )
    assert torch.equal(unordered.cpu(), torch.from_numpy(np.stack(expected))[rows])


def test_pool_windows_with_random_scales_and_unused_maps():
    rng = np.random.default_rng(3)
    image_hw, scales = (120, 160), (96, 128)
    fmaps = [relu_map(rng, 4, 5, 7), relu_map(rng, 4, 7, 9)]
    boxes = mixed_boxes(rng, 50, image_hw)
    index = torch.from_numpy(rng.integers(0, 2, 50))
    pooled, _ = pool_windows(fmaps, boxes, image_hw, scales, index, geometry=ZF5_POOL)
    cells = window_cells(boxes, image_hw, scales, index, [(5, 7), (7, 9)], ZF5_POOL)
    for row in range(50):
        k = int(index[row])
        expected = spatial_pyramid_pool(fmaps[k], cells[row : row + 1], LEVELS)[0]
        assert torch.equal(pooled[row], expected)
    only_second = torch.ones(5, dtype=torch.long)
    pooled, _ = pool_windows(
        [None, fmaps[1]], boxes[:5], image_hw, scales, only_second, geometry=ZF5_POOL
    )
    assert pooled.shape == (5, 4 * 50)


def test_pool_windows_without_windows():
    boxes = np.zeros((0, 4), dtype=np.float32)
    index = select_scale(boxes, (100, 120), (64, 96))
    maps = [torch.rand(8, 3, 4), None]
    pooled, rows = pool_windows(maps, boxes, (100, 120), (64, 96), index, geometry=ZF5_POOL)
    assert index.shape == (0,) and pooled.shape == (0, 400) and rows.shape == (0,)
    pooled, rows = pool_windows(
        maps, boxes, (100, 120), (64, 96), index, geometry=ZF5_POOL, keep_order=False
    )
    assert pooled.shape == (0, 400) and rows.shape == (0,)


def test_float16_maps_pool_exactly_into_float32():
    rng = np.random.default_rng(5)
    image_hw, scales = (120, 160), (96, 128)
    maps = [relu_map(rng, 8, 5, 7).half(), relu_map(rng, 8, 7, 9).half()]
    boxes = mixed_boxes(rng, 60, image_hw)
    index = torch.from_numpy(rng.integers(0, 2, 60))
    args = (boxes, image_hw, scales, index)
    pooled, _ = pool_windows(maps, *args, geometry=ZF5_POOL, out_dtype=torch.float32)
    expected, _ = pool_windows([m.float() for m in maps], *args, geometry=ZF5_POOL)
    assert pooled.dtype == torch.float32 and torch.equal(pooled, expected)


# ---------------------------------------------------------------- engines and devices


@pytest.mark.parametrize("levels", [LEVELS, (7, 3, 2, 1), (4, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_roi_pool_engine_pools_what_the_block_max_engine_pools(levels, dtype):
    """roi_pool where its bins are exact (6, 4, 3, 2, 1), the block-max engine for 7 on a map 61
    cells wide (roi_pool is off from 57): both equal the reference, also on float16 maps
    (roi_pool runs on their float32 copy)."""
    rng = np.random.default_rng(sum(levels))
    fmap = relu_map(rng, 16, 23, 61).to(dtype)
    cells = torch.from_numpy(random_cells(rng, 300, 23, 61))
    assert spp.pool_engine(fmap, levels, "roi_pool") == ("blockmax" if 7 in levels else "roi_pool")
    expected = torch.from_numpy(reference_pool(fmap.float().numpy(), cells.numpy(), levels))
    for engine in ("blockmax", "roi_pool", "auto"):
        pooled = spatial_pyramid_pool(fmap, cells, levels, torch.float32, engine=engine)
        assert torch.equal(pooled, expected), engine
    args = pool_windows_case(21, count=60)
    geometry = replace(ZF5_POOL, levels=levels)
    blockmax, _ = pool_windows(*args, geometry, engine="blockmax")
    assert torch.equal(pool_windows(*args, geometry, engine="roi_pool")[0], blockmax)
    with pytest.raises(ValueError, match="engine must be one of"):
        spatial_pyramid_pool(fmap, cells, levels, engine="fast")
    assert spp.pool_engine(fmap.double(), levels, "roi_pool") == "blockmax"  # float32 would round


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("levels", [(6, 3, 2, 1), (8, 4, 2, 1)])
def test_roi_pool_engine_on_the_device_is_exact_for_every_window_size(levels, device):
    """Every window of 1…130 × 1…130 cells, pooled by the roi_pool engine on the device against
    the block-max engine on the CPU: channel 0 rises to the bottom-right, so each bin's max sits
    on its last row and column, and channel 1 falls, so it sits on its first; an edge computed
    one cell off by the device's arithmetic changes a value."""
    side = 130
    ramp = torch.arange(side, dtype=torch.float32)
    rising = ramp[:, None] * side + ramp[None, :]
    fmap = torch.stack([rising, rising.max() - rising])  # (2, H, W)
    heights, widths = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    offsets = (heights * 7 + widths * 3) % (side - torch.maximum(heights, widths))
    cells = torch.stack(
        [offsets.flatten(), offsets.flatten(), (offsets + widths).flatten(),
         (offsets + heights).flatten()], dim=1,
    )  # fmt: skip
    expected = spatial_pyramid_pool(fmap, cells, levels, engine="blockmax")
    pooled = spatial_pyramid_pool(fmap.to(device), cells, levels, engine="roi_pool")
    assert pooled.device.type == device and torch.equal(pooled.cpu(), expected)


def test_only_level_7_leaves_roi_pool_for_the_block_max_engine(monkeypatch):
    """The engine taken per map: roi_pool unless a directly pooled level's bins differ."""
    calls = []
    monkeypatch.setattr(spp, "pool_into", lambda *args: calls.append(args[3]))
    fmap, cells = torch.rand(4, 60, 60), torch.tensor([[0, 0, 59, 59]])
    for levels in (LEVELS, (8, 4, 2, 1), (7, 3, 2, 1)):
        spatial_pyramid_pool(fmap, cells, levels, engine="roi_pool")
    assert calls == [(7, 3, 2, 1)]


@pytest.mark.parametrize("engine", ["blockmax", "roi_pool"])
def test_pooling_never_reads_back_from_the_map_device(engine):
    """The plan is made on the CPU and queued to the maps' device: with maps on the ``meta``
    device, where any read back (``int()``, ``bool()``, ``.cpu()``) raises, pooling still
    runs. On CUDA that means no host synchronisation per image (tests/test_cuda.py checks it
    with torch.cuda.set_sync_debug_mode)."""
    maps, boxes, image_hw, scales, index = pool_windows_case(22, count=80)
    meta_maps = [m.to("meta") for m in maps]
    with pytest.raises(RuntimeError, match="meta"):
        int(meta_maps[0].max())  # what the check relies on
    for keep_order in (True, False):
        pooled, rows = pool_windows(
            meta_maps, boxes, image_hw, scales, index, geometry=ZF5_POOL,
            keep_order=keep_order, engine=engine
        )  # fmt: skip
        assert pooled.device.type == "meta" and pooled.shape == (80, 200)
        assert rows.device.type == "cpu" and sorted(rows.tolist()) == list(range(80))
    cells = torch.from_numpy(random_cells(np.random.default_rng(1), 50, 7, 9))
    assert spatial_pyramid_pool(meta_maps[1], cells, LEVELS, engine=engine).shape == (50, 200)
