"""Scale selection, window → conv-cell projection and spatial pyramid pooling.

docs/method.md#scale-selection, #projection, #spatial-pyramid-pooling.

Shapes: R windows, C channels, H/W conv map size, S scales, n bins per side of a level,
D = C·Σn² pooled dim.

Boxes are float32 (R, 4) XYXY in continuous pixel coordinates of the original image
(docs/method.md#conventions-and-box-format); cells are int64 (R, 4) 0-based inclusive
(left, top, right, bottom) conv cells.

Pooling (docs/method.md#spatial-pyramid-pooling): bin j of a w-cell window at an n-bin level
spans cells [⌊j·w/n⌋, ⌈(j+1)·w/n⌉) (never empty), computed in exact integer arithmetic. Each
bin is the plain max over its cells; the original's accumulator starts at 0, which is the same
for post-ReLU conv5 maps.
torchvision's ``roi_pool`` computes the edges in float32: they are the same at levels 1–6, 8,
9, 10 and 12 for windows of up to 400 cells, but off by a cell for some windows of 57 cells or
more at level 7 (29 at level 11): :func:`roi_pool_bins_exact` checks a level on a map.

Two engines compute the same values (``engine``, :func:`pool_engine`): the exact block-max
engine (``spp_detect.ops._blockmax``, private), the CPU's; and ``roi_pool`` on a float32 copy of a
float32, float16 or bfloat16 map when every directly pooled level is exact on it, the coarser
levels reduced from a finer one. ``auto`` takes ``roi_pool`` on CUDA: one kernel per map and
almost no planning on the host (docs/method.md#gpu-path). Either way the windows are planned on
the CPU and nothing is read back from the map's device. For finite maps only: ``roi_pool``
skips NaN cells where the block-max engine passes them on.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.ops import roi_pool

from spp_detect.ops._blockmax import bin_edges, check_cells, level_plan, pool_into
from spp_detect.runtime.device import to_device

BoxesLike = Tensor | np.ndarray
POOL_ENGINES = ("auto", "blockmax", "roi_pool")
# maps whose values a float32 copy keeps exactly, for roi_pool (its edges are exact in float32)
ROI_POOL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def pyramid_dim(channels: int, levels: Sequence[int]) -> int:
    """D = C · Σ n² (12,800 for 256 channels and levels (6, 3, 2, 1))."""
    return channels * sum(n * n for n in levels)


@dataclass(frozen=True)
class PoolGeometry:
    """How windows become pooled vectors: the backbone's ``stride`` and ``offset0``
    (docs/method.md#projection), the box shrink ``offset`` (px), pyramid ``levels`` in output
    order, and ``target_size`` (px), the window side scale selection aims at
    (docs/method.md#scale-selection)."""

    stride: int
    offset0: float
    offset: float
    levels: tuple[int, ...]
    target_size: float

    def feature_dim(self, channels: int) -> int:
        """D = C · Σ n²."""
        return pyramid_dim(channels, self.levels)


# ---------------------------------------------------------------- scale selection and projection


def _as_float64(boxes: BoxesLike) -> Tensor:
    return torch.as_tensor(boxes).to(device="cpu", dtype=torch.float64).reshape(-1, 4)


def select_scale(
    boxes: BoxesLike, image_hw: tuple[int, int], scales: Sequence[int], target: float = 224.0
) -> Tensor:
    """Index into ``scales`` (R,) int64 of each box's best scale (docs/method.md#scale-selection).

    e = target · m / √A (m = min(H, W) of the original image, A the box area in pixels); the
    scale nearest to e wins, ties going to the smaller scale.
    """
    boxes64 = _as_float64(boxes)
    area = ((boxes64[:, 2] - boxes64[:, 0]) * (boxes64[:, 3] - boxes64[:, 1])).clamp(min=1e-12)
    expected = target * min(image_hw) / area.sqrt()
    scale_values = torch.as_tensor(list(scales), dtype=torch.float64)
    order = torch.argsort(scale_values, stable=True)  # ascending: argmin's first hit is smaller
    distance = (scale_values[order][None, :] - expected[:, None]).abs()
    return order[distance.argmin(dim=1)]


def _edges(
    boxes64: Tensor, short: int, scale: Tensor, stride: int, offset0: float, offset: float
) -> Tensor:
    """1-based (L, T, R, B) of docs/method.md#projection steps 1–3, before the collapse fix and
    the clamp.

    ``scale`` (R,) float64 is each box's target shorter side S_k.
    """
    # step 1: continuous (x1, y1, x2, y2) → 1-based inclusive (x1+1, y1+1, x2, y2)
    one_based = boxes64 + torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    # x' = (x − 1)(S_k − 1)/(m − 1) + 1, evaluated left to right as the original's MATLAB
    scaled = (one_based - 1.0) * (scale - 1.0)[:, None] / max(short - 1, 1) + 1.0
    start = torch.floor((scaled[:, :2] - offset0 + offset) / stride + 0.5) + 1
    end = torch.ceil((scaled[:, 2:] - offset0 - offset) / stride - 0.5) + 1
    return torch.cat([start, end], dim=1).long()


def _fix_and_clamp(edges: Tensor, fmap_h: Tensor, fmap_w: Tensor) -> Tensor:
    """docs/method.md#projection steps 4–6 on 1-based edges; returns 0-based inclusive cells."""
    left, top, right, bottom = edges.unbind(dim=1)
    left, right = _collapse(left, right)
    top, bottom = _collapse(top, bottom)
    one = torch.ones_like(left)
    left, right = left.clamp(one, fmap_w), right.clamp(one, fmap_w)
    top, bottom = top.clamp(one, fmap_h), bottom.clamp(one, fmap_h)
    return torch.stack([left, top, right, bottom], dim=1) - 1


def _collapse(start: Tensor, end: Tensor) -> tuple[Tensor, Tensor]:
    """start > end → both (start + end)/2 truncated toward zero (C integer division)."""
    middle = torch.div(start + end, 2, rounding_mode="trunc")
    empty = start > end
    return torch.where(empty, middle, start), torch.where(empty, middle, end)


def project_boxes(
    boxes: BoxesLike,
    image_hw: tuple[int, int],
    scale: int,
    fmap_hw: tuple[int, int],
    stride: int,
    offset0: float,
    offset: float,
) -> Tensor:
    """0-based inclusive (left, top, right, bottom) cells (R, 4) int64 of each box at ``scale``.

    docs/method.md#projection steps 1–6: the box (in the original H×W image) is scaled by
    (S−1)/(m−1) about pixel 1, shrunk by ``offset`` px per side, its edges snapped to the nearest
    cell centre (``stride``·(J−1) + ``offset0``, 1-based), a collapsed window is set to its
    middle, and the result is clamped to the map (``fmap_hw``). Never empty.
    """
    boxes64 = _as_float64(boxes)
    count = len(boxes64)
    scale_per_box = torch.full((count,), float(scale), dtype=torch.float64)
    edges = _edges(boxes64, min(image_hw), scale_per_box, stride, offset0, offset)
    fmap_h = torch.full((count,), int(fmap_hw[0]), dtype=torch.long)
    fmap_w = torch.full((count,), int(fmap_hw[1]), dtype=torch.long)
    return _fix_and_clamp(edges, fmap_h, fmap_w)


def window_cells(
    boxes: BoxesLike,
    image_hw: tuple[int, int],
    scales: Sequence[int],
    scale_index: Tensor,
    fmap_hws: Sequence[tuple[int, int]],
    geometry: PoolGeometry,
) -> Tensor:
    """Cells (R, 4) of each window r at its own scale k = ``scale_index[r]``, projected with
    ``geometry``'s stride, offset0 and offset (:func:`project_boxes`)."""
    boxes64 = _as_float64(boxes)
    index = torch.as_tensor(scale_index, dtype=torch.long, device="cpu").reshape(-1)
    if len(index) != len(boxes64):
        raise ValueError(f"scale_index has {len(index)} entries for {len(boxes64)} boxes")
    scale_values = torch.as_tensor(list(scales), dtype=torch.float64)[index]
    hws = torch.as_tensor([list(hw) for hw in fmap_hws], dtype=torch.long).reshape(-1, 2)[index]
    g = geometry
    edges = _edges(boxes64, min(image_hw), scale_values, g.stride, g.offset0, g.offset)
    return _fix_and_clamp(edges, hws[:, 0], hws[:, 1])


def dedup_keys(
    boxes: BoxesLike,
    image_hw: tuple[int, int],
    scales: Sequence[int],
    scale_index: Tensor,
    geometry: PoolGeometry,
) -> Tensor:
    """(R, 5) int64 keys (L, T, R, B, scale index): step-3 edges before the fix and the clamp.

    Two windows with equal keys pool identical features; the original deduplicates SVM negative
    candidates by this key, keeping the first (docs/method.md#deduplication-of-windows).
    """
    boxes64 = _as_float64(boxes)
    index = torch.as_tensor(scale_index, dtype=torch.long, device="cpu").reshape(-1)
    scale_values = torch.as_tensor(list(scales), dtype=torch.float64)[index]
    g = geometry
    edges = _edges(boxes64, min(image_hw), scale_values, g.stride, g.offset0, g.offset)
    return torch.cat([edges, index[:, None]], dim=1)


# ---------------------------------------------------------------- pooling


def spatial_pyramid_pool(
    fmap: Tensor,
    cells: Tensor,
    levels: Sequence[int],
    out_dtype: torch.dtype | None = None,
    engine: str = "auto",
) -> Tensor:
    """Pooled features (R, C·Σn²) of the windows ``cells`` (R, 4) on ``fmap`` (C, H, W).

    Levels in the given order; each level channel-major [C][n][n] (index c·n² + i·n + j, i the
    bin row); bins as in the module docstring (docs/method.md#spatial-pyramid-pooling). On
    ``fmap``'s device, in ``out_dtype`` (default ``fmap``'s; a max is exact in any dtype, so
    float16 maps may give float32 output). ``engine``: one of POOL_ENGINES (module docstring).
    """
    cells = torch.as_tensor(cells, dtype=torch.long).to("cpu").reshape(-1, 4)
    out = fmap.new_empty((len(cells), pyramid_dim(fmap.shape[0], levels)), dtype=out_dtype)
    order = pool_map(out, fmap, cells, levels, engine)
    if order is None:
        return out
    (inverse,) = to_device([inverse_permutation(order)], out.device)
    return out.index_select(0, inverse)


def pool_engine(fmap: Tensor, levels: Sequence[int], engine: str = "auto") -> str:
    """The engine that pools ``levels`` from ``fmap`` (C, H, W) when ``engine`` is asked for:
    "blockmax" or "roi_pool" (module docstring)."""
    if engine not in POOL_ENGINES:
        raise ValueError(f"engine must be one of {POOL_ENGINES}, got {engine!r}")
    if engine == "auto":
        engine = "roi_pool" if fmap.device.type == "cuda" else "blockmax"
    if engine == "blockmax" or fmap.dtype not in ROI_POOL_DTYPES:
        return "blockmax"
    largest = max(int(fmap.shape[1]), int(fmap.shape[2]))
    direct = [n for n, source in level_plan(levels).items() if source is None]
    return "roi_pool" if all(roi_pool_bins_exact(n, largest) for n in direct) else "blockmax"


def pool_map(
    out: Tensor, fmap: Tensor, cells: Tensor, levels: Sequence[int], engine: str = "auto"
) -> Tensor | None:
    """Write the pooled windows ``cells`` (R, 4) int64 of ``fmap`` (C, H, W) into ``out``
    (R, D) on its device, by ``engine`` (module docstring). Returns the rows' order as
    ``_blockmax.pool_into`` does: row i is window ``order[i]`` (``order`` (R,) on the CPU), or
    None for their own order. Cells elsewhere than on the CPU are fetched first (a wait)."""
    cells = cells.cpu()
    if pool_engine(fmap, levels, engine) == "blockmax":
        return pool_into(out, fmap, cells, levels)
    if len(cells) == 0:
        return None
    check_cells(cells, tuple(fmap.shape[1:]))
    (rois,) = to_device([_rois(cells, torch.float32)], fmap.device)
    # roi_pool computes its bin edges in the map's dtype: they are the exact ones in float32
    fmap32 = fmap.float()
    pooled = _reduced_levels(lambda n: roi_pool(fmap32[None], rois, (n, n), 1.0), levels)
    column = 0
    for n in levels:
        width = fmap.shape[0] * n * n
        out[:, column : column + width].copy_(pooled[n].reshape(len(cells), -1))
        column += width
    return None


def _rois(cells: Tensor, dtype: torch.dtype) -> Tensor:
    """roi_pool's boxes (R, 5) in the map's ``dtype``: (image 0, x1, y1, x2, y2) in cells, its
    width x2 − x1 + 1 as ours."""
    return torch.cat([cells.new_zeros((len(cells), 1)), cells], dim=1).to(dtype)


def _reduced_levels(
    pool_level: Callable[[int], Tensor], levels: Sequence[int]
) -> dict[int, Tensor]:
    """Bins (R, C, n, n) of every level: ``pool_level(n)`` for a level pooled directly, or, for
    a level dividing a finer one, the max over groups of the finer level's bins (exact:
    docs/method.md#spatial-pyramid-pooling)."""
    pooled: dict[int, Tensor] = {}
    for n, source in level_plan(levels).items():  # finest first: a source is always ready
        if source is None:
            pooled[n] = pool_level(n)
        else:
            count, channels, ratio = *pooled[source].shape[:2], source // n
            pooled[n] = pooled[source].view(count, channels, n, ratio, n, ratio).amax((3, 5))
    return pooled


def trainable_pyramid_pool(fmap: Tensor, cells: Tensor, levels: Sequence[int]) -> Tensor:
    """:func:`spatial_pyramid_pool` with gradients to ``fmap`` (C, H, W), for end-to-end
    fine-tuning (docs/method.md#conv-fine-tuning): the same (R, C·Σn²) values, and each
    bin's gradient goes to the cell holding its max, as in max pooling.

    A level that divides a finer one is the max over groups of its bins (exact, as in the
    block-max engine). A directly pooled level uses torchvision's ``roi_pool`` (compiled forward
    and backward) when its float32 bin edges equal the exact integer rule for every window size
    the map allows (:func:`roi_pool_bins_exact`: levels 1–6 and 8, not 7), else a gather over
    padded bins, exact but about 10× slower (docs/benchmarks-history.md). ``fmap`` in float32.
    """
    cells = torch.as_tensor(cells, dtype=torch.long).to("cpu").reshape(-1, 4)
    count, channels = len(cells), int(fmap.shape[0])
    if count == 0:
        return fmap.new_zeros((0, pyramid_dim(channels, levels)))
    largest = max(int(fmap.shape[1]), int(fmap.shape[2]))
    (rois,) = to_device([_rois(cells, fmap.dtype)], fmap.device)

    def pool_level(n: int) -> Tensor:
        if roi_pool_bins_exact(n, largest):
            return roi_pool(fmap[None], rois, (n, n), 1.0)
        return _gathered_level(fmap, cells, n)

    pooled = _reduced_levels(pool_level, levels)
    return torch.cat([pooled[n].reshape(count, -1) for n in levels], dim=1)


@functools.lru_cache(maxsize=64)
def roi_pool_bins_exact(n: int, largest: int) -> bool:
    """Whether ``roi_pool``'s float32 bin edges ⌊j·(w/n)⌋, ⌈(j+1)·(w/n)⌉ equal the integer
    rule ⌊j·w/n⌋, ⌈(j+1)·w/n⌉ for every window width w ≤ ``largest`` cells."""
    widths = np.arange(1, largest + 1, dtype=np.int64)[:, None]
    j = np.arange(n, dtype=np.int64)[None, :]
    bin_size = widths.astype(np.float32) / np.float32(n)
    starts = np.floor(j.astype(np.float32) * bin_size).astype(np.int64)
    ends = np.ceil((j + 1).astype(np.float32) * bin_size).astype(np.int64)
    return bool((starts == j * widths // n).all() and (ends == -(-(j + 1) * widths // n)).all())


def _gathered_level(fmap: Tensor, cells: Tensor, n: int) -> Tensor:
    """(R, C, n, n) maxima of one level of the CPU ``cells``: every bin padded to the largest
    bin by repeating its last row and column (a repeat leaves a max unchanged), gathered, and
    reduced."""
    channels, _, width = fmap.shape
    left, top, right, bottom = cells.unbind(dim=1)
    y0, y1 = bin_edges(top, bottom - top + 1, n)  # (R, n) each
    x0, x1 = bin_edges(left, right - left + 1, n)
    rows = _padded(y0, y1)  # (R, n, h)
    cols = _padded(x0, x1)  # (R, n, w)
    flat = rows[:, :, None, :, None] * width + cols[:, None, :, None, :]  # (R, n, n, h, w)
    (flat,) = to_device([flat.reshape(-1)], fmap.device)
    values = fmap.reshape(channels, -1)[:, flat]
    values = values.view(channels, len(cells), n, n, -1).amax(dim=-1)
    return values.permute(1, 0, 2, 3)


def _padded(first: Tensor, end: Tensor) -> Tensor:
    """Cell indices (R, n, L) of bins [first, end), each repeated at its last cell up to the
    longest bin's length L."""
    length = int((end - first).max())
    steps = torch.arange(length, device=first.device)
    return torch.minimum(first[:, :, None] + steps, end[:, :, None] - 1)


def inverse_permutation(order: Tensor) -> Tensor:
    """``inverse`` (R,) with ``inverse[order[i]] = i``: where each item of a permutation went."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=order.device)
    return inverse


def distinct_windows(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows that pool identical features share a key row (R, k); compute each one once.

    Returns first (U,), the index of the first window of each distinct key in window order, and
    inverse (R,), the position of each window's key in ``first``: ``x[first][inverse]`` equals
    ``x`` for any per-window quantity that is a function of the key.
    """
    _, inverse = torch.unique(keys, dim=0, return_inverse=True)
    count = int(inverse.max()) + 1 if len(inverse) else 0
    position = torch.arange(len(inverse), device=inverse.device)
    first = torch.full((count,), len(inverse), dtype=torch.long, device=inverse.device)
    first.scatter_reduce_(0, inverse, position, reduce="amin")
    order = torch.argsort(first)  # distinct windows in the order they first appear
    return first[order], inverse_permutation(order)[inverse]


class SpatialPyramidPool(nn.Module):
    """``spatial_pyramid_pool`` as a module: forward(fmap (C, H, W), cells (R, 4)) → (R, D)."""

    def __init__(self, levels: Sequence[int] = (6, 3, 2, 1)) -> None:
        super().__init__()
        self.levels = tuple(levels)

    def forward(self, fmap: Tensor, cells: Tensor) -> Tensor:
        return spatial_pyramid_pool(fmap, cells, self.levels)

    def extra_repr(self) -> str:
        return f"levels={self.levels}"


def pool_windows(
    fmaps: Sequence[Tensor | None],
    boxes: BoxesLike,
    image_hw: tuple[int, int],
    scales: Sequence[int],
    scale_index: Tensor,
    geometry: PoolGeometry,
    *,
    out_dtype: torch.dtype | None = None,
    out: Tensor | None = None,
    keep_order: bool = True,
    engine: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Pooled features of R windows spread over S scales: pooled (R, D) and rows (R,) int64 on
    the CPU, row i of pooled being window ``rows[i]`` (``docs/method.md``, "Projection" and
    "Spatial pyramid pooling").

    ``fmaps[k]`` (C, H_k, W_k) is the map at ``scales[k]``; ``scale_index`` (R,) picks each
    window's scale; ``geometry`` gives the projection and the pyramid's levels. A map no window
    uses may be None. One vectorised pooling call per used scale.
    ``out_dtype`` as in :func:`spatial_pyramid_pool`.

    ``keep_order``: True gives pooled in input order and rows = arange(R); False skips that final
    reorder (one gather of the whole output) and gives the rows in pooling order. ``engine``:
    one of POOL_ENGINES (module docstring).

    ``out``: a buffer (≥ R, D) kept across calls, which saves the page faults of a fresh output
    (docs/benchmarks-history.md); ``out_dtype`` is then its dtype and pooled is its first R
    rows, in either order mode. With ``keep_order`` the windows are pooled into a fresh scratch
    buffer and reordered into ``out``, so the saving needs ``keep_order=False``.
    """
    index = torch.as_tensor(scale_index, dtype=torch.long, device="cpu").reshape(-1)
    used = sorted(set(index.tolist()))
    present = [m for m in fmaps if m is not None]
    if not present:
        raise ValueError("pool_windows needs at least one map")
    reference = fmaps[used[0]] if used else present[0]
    fmap_hws = [tuple(m.shape[1:]) if m is not None else (1, 1) for m in fmaps]
    for k in used:
        if fmaps[k] is None:
            raise ValueError(f"windows use scale index {k} but its map is None")
    levels = geometry.levels
    cells = window_cells(boxes, image_hw, scales, index, fmap_hws, geometry)
    dim = pyramid_dim(reference.shape[0], levels)
    if out is None:
        target = None
    elif out.shape[0] >= len(index) and out.shape[1:] == (dim,):
        target = out[: len(index)]
    else:
        raise ValueError(f"out {tuple(out.shape)} cannot hold {len(index)} rows of {dim}")
    if target is None or keep_order:
        like = reference if target is None else target
        dtype = out_dtype if target is None else target.dtype
        buffer = like.new_empty((len(index), dim), dtype=dtype)
    else:
        buffer = target
    source_rows, start = [], 0
    for k in used or [None]:
        rows = torch.arange(len(index)) if k is None else (index == k).nonzero().squeeze(1)
        block = buffer[start : start + len(rows)]
        fmap = reference if k is None else fmaps[k]
        order = pool_map(block, fmap, cells[rows], levels, engine)
        source_rows.append(rows if order is None else rows[order])
        start += len(rows)
    rows = torch.cat(source_rows)
    if not keep_order:
        return buffer, rows
    (inverse,) = to_device([inverse_permutation(rows)], buffer.device)
    if target is None:
        return buffer.index_select(0, inverse), torch.arange(len(index))
    torch.index_select(buffer, 0, inverse, out=target)
    return target, torch.arange(len(index))
