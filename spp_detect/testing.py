"""Helpers shared by the tests and the benchmark scripts (like ``torch.testing``).

Shapes: R windows, C channels, H/W a conv5 map's size, D = C·Σn² pooled dim.

* :func:`random_boxes`: proposal-like random boxes inside an image.
* :func:`write_proposal_mat`: an R-CNN-format proposal ``.mat`` of jittered ground truth and
  random boxes, for pipeline runs without selective search (OpenCV without its contrib
  modules, as on the GPU machine: tests/test_cuda.py).
* :func:`reference_pool`: spatial pyramid pooling written as plain loops, slow and obviously
  correct (docs/method.md#spatial-pyramid-pooling); ``spp.spatial_pyramid_pool`` and
  ``spp.pool_windows`` are tested against it. Keep it that way: no vectorisation, no shared code
  with ``spp.py``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from spp_detect.structures import ImageRecord

# Jittered copies of a gt box: centre moved by up to this fraction of its side, each side scaled
# by up to this factor either way; about what selective search returns around an object.
JITTER_SHIFT = 0.1
JITTER_SCALE = 1.15
JITTERED_PER_GT = 10
RANDOM_MIN_SIDE = 20.0  # px: propose.min_size's default, which filters smaller boxes out


def random_boxes(
    rng: np.random.Generator,
    count: int,
    image_hw: tuple[int, int],
    min_size: float = 0.0,
    max_size: float = 1.0,
    *,
    min_side: float = 1.0,
) -> np.ndarray:
    """``count`` proposal-like boxes inside an image of ``image_hw`` (H, W): float32 (R, 4)
    continuous XYXY (docs/method.md#conventions-and-box-format).

    Each box's width is log-uniform between ``min_size``·W and ``max_size``·W (its height
    likewise with H), neither below ``min_side`` px, so small boxes are as common as in a
    proposal list; the box lies anywhere inside the image, uniformly.
    """
    height, width = image_hw
    sides = []
    for length in (width, height):
        low = max(min_size * length, min_side)
        high = max(max_size * length, low)
        sides.append(np.exp(rng.uniform(np.log(low), np.log(high), count)))
    w, h = sides
    x1, y1 = rng.uniform(0, width - w), rng.uniform(0, height - h)
    return np.stack([x1, y1, x1 + w, y1 + h], axis=1).astype(np.float32)


def reference_pool(
    fmap: np.ndarray, cells: Iterable[Sequence[int]], levels: Sequence[int]
) -> np.ndarray:
    """Pooled features (R, D) of the windows ``cells`` (R, 4) on one map ``fmap`` (C, H, W).

    ``cells``: 0-based inclusive conv5 cells (left, top, right, bottom), inside the map. Loops
    over windows, levels, bins and cells: bin j of an n-bin level over a w-cell window covers
    cells [⌊j·w/n⌋, ⌈(j+1)·w/n⌉) from the window's first one (rows the same), its value the
    per-channel max with an accumulator that starts at 0 (the original's; the same on post-ReLU
    maps). Each level channel-major [C][n][n], levels in order
    (docs/method.md#spatial-pyramid-pooling).
    """
    channels = fmap.shape[0]
    rows = []
    for left, top, right, bottom in cells:
        width, height = right - left + 1, bottom - top + 1
        parts = []
        for n in levels:
            level = np.zeros((channels, n, n), dtype=fmap.dtype)
            for i in range(n):
                for j in range(n):
                    y_start = top + (i * height) // n
                    y_end = top + -(-((i + 1) * height) // n)
                    x_start = left + (j * width) // n
                    x_end = left + -(-((j + 1) * width) // n)
                    for y in range(y_start, y_end):
                        for x in range(x_start, x_end):
                            level[:, i, j] = np.maximum(level[:, i, j], fmap[:, y, x])
            parts.append(level.reshape(-1))
        rows.append(np.concatenate(parts))
    dim = channels * sum(n * n for n in levels)
    return np.stack(rows) if rows else np.zeros((0, dim), fmap.dtype)


def jittered_boxes(rng: np.random.Generator, gt_boxes: np.ndarray, count: int) -> np.ndarray:
    """``count`` jittered copies (G·count, 4) float32 of each gt box (G, 4), not clipped."""
    boxes = np.repeat(np.asarray(gt_boxes, np.float64).reshape(-1, 4), count, axis=0)
    sides = boxes[:, 2:] - boxes[:, :2]
    shift = rng.uniform(-JITTER_SHIFT, JITTER_SHIFT, sides.shape) * sides
    centres = boxes[:, :2] + sides / 2 + shift
    sides *= np.exp(rng.uniform(-np.log(JITTER_SCALE), np.log(JITTER_SCALE), sides.shape))
    return np.concatenate([centres - sides / 2, centres + sides / 2], axis=1).astype(np.float32)


def write_proposal_mat(
    path: Path, records: Sequence[ImageRecord], per_image: int, seed: int = 0
) -> Path:
    """Write an R-CNN / SPP-net proposal ``.mat`` for ``records``: per image
    ``JITTERED_PER_GT`` jittered copies of each gt box, clipped to the image, then random boxes
    up to ``per_image`` in all. Boxes are stored ``[y1 x1 y2 x2]`` 1-based, the format that
    ``propose.method: mat`` reads (``proposals.mat_to_boxes`` is the inverse)."""
    import scipy.io

    rng = np.random.default_rng(seed)
    images = np.empty((len(records), 1), dtype=object)
    cells = np.empty((1, len(records)), dtype=object)
    for index, record in enumerate(records):
        height, width = record.image_hw
        near = jittered_boxes(rng, record.gt_boxes, JITTERED_PER_GT)[:per_image]
        near = np.clip(near, 0, [width, height, width, height])
        far = random_boxes(rng, per_image - len(near), record.image_hw, min_side=RANDOM_MIN_SIDE)
        x1, y1, x2, y2 = np.concatenate([near, far]).astype(np.float64).T
        images[index, 0] = record.image_id
        cells[0, index] = np.stack([y1 + 1, x1 + 1, y2, x2], axis=1)
    scipy.io.savemat(path, {"images": images, "boxes": cells})
    return path
