"""Box helpers that torchvision.ops does not provide: clip, xywh→xyxy, flip, regression deltas.

Shapes: R boxes. Every function takes and returns float (R, 4) XYXY boxes in continuous pixel
coordinates (docs/method.md#conventions-and-box-format: x2/y2 exclusive, width = x2 − x1), as a
numpy array or a torch tensor; the result is of the same kind, dtype and device as the first
argument.

torch is imported inside the functions: the proposal worker processes clip boxes and the dataset
readers clip gt boxes, and neither should pay for loading it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, TypeVar

import numpy as np

if TYPE_CHECKING:
    import torch

Array = TypeVar("Array", np.ndarray, "torch.Tensor")

# Added to widths and heights before dividing by them (docs/method.md#bounding-box-regression:
# MATLAB `eps`, float64 machine epsilon); it only matters for degenerate zero-size boxes.
DELTA_EPS = float(np.finfo(np.float64).eps)

# Largest log-scale delta decoded, so a wild prediction cannot overflow exp() (torchvision's
# `bbox_xform_clip` = log(1000 / 16)); a 62× growth is never reached by a sane regressor.
MAX_LOG_SCALE = math.log(1000.0 / 16)


def _to_tensor(boxes: np.ndarray | torch.Tensor) -> torch.Tensor:
    import torch

    if isinstance(boxes, np.ndarray):
        boxes = np.ascontiguousarray(boxes)  # torch cannot view negative strides
    tensor = torch.as_tensor(boxes)
    return tensor if tensor.is_floating_point() else tensor.float()


def _like(result: torch.Tensor, reference: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """``result`` as the kind (numpy or torch) of ``reference``."""
    return result.numpy() if isinstance(reference, np.ndarray) else result


def clip_boxes(boxes: Array, image_hw: tuple[int, int]) -> Array:
    """Clip (R, 4) boxes to the image: x in [0, W], y in [0, H].

    In 1-based inclusive coordinates this is the original's clip of x1, y1 to ≥ 1 and x2, y2 to
    ≤ W, H (docs/method.md#bounding-box-regression). Integer boxes come back as float32.
    """
    height, width = image_hw
    if isinstance(boxes, np.ndarray):  # without torch, bit for bit as torch.clamp (NaN, -0.0)
        boxes = boxes if np.issubdtype(boxes.dtype, np.floating) else boxes.astype(np.float32)
        upper = np.array([width, height, width, height], dtype=boxes.dtype)
        clipped = np.where(boxes < 0, boxes.dtype.type(0), boxes)
        return np.where(clipped > upper, upper, clipped)
    import torch

    tensor = _to_tensor(boxes)
    x = tensor[:, 0::2].clamp(0, width)
    y = tensor[:, 1::2].clamp(0, height)
    return _like(torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], dim=1), boxes)


def has_area(boxes: Array) -> Array:
    """(R,) bool: the boxes (R, 4) with positive width and height."""
    return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def paired_iou(first: Array, second: Array) -> Array:
    """IoU (R,) of each box first[r] with second[r], both (R, 4).

    ``torchvision.ops.box_iou`` gives all R × R pairs; this is its diagonal in O(R) memory.
    """
    import torch

    a, b = _to_tensor(first), _to_tensor(second)
    width = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
    height = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp(min=0)
    inter = width * height
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return _like(inter / (area_a + area_b - inter), first)


def flip_boxes(boxes: Array, width: int) -> Array:
    """Mirror (R, 4) boxes of an image ``width`` pixels wide: x1' = W − x2, x2' = W − x1.

    In 1-based inclusive coordinates this is the original's x1' = W + 1 − x2, x2' = W + 1 − x1
    (docs/method.md#conventions-and-box-format).
    """
    import torch

    tensor = _to_tensor(boxes)
    flipped = torch.stack(
        [width - tensor[:, 2], tensor[:, 1], width - tensor[:, 0], tensor[:, 3]], 1
    )
    return _like(flipped, boxes)


def _centre_size(tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Centres and sizes as docs/method.md#bounding-box-regression: p_w = x2 − x1 + eps,
    p_cx = x1 + 0.5·p_w (no +1)."""
    widths = tensor[:, 2] - tensor[:, 0] + DELTA_EPS
    heights = tensor[:, 3] - tensor[:, 1] + DELTA_EPS
    return tensor[:, 0] + 0.5 * widths, tensor[:, 1] + 0.5 * heights, widths, heights


def encode_deltas(proposals: Array, gt_boxes: Array) -> Array:
    """Regression targets (R, 4) = (t_x, t_y, t_w, t_h) that move ``proposals`` onto ``gt_boxes``.

    docs/method.md#bounding-box-regression without the +1: with widths w = x2 − x1 of continuous
    boxes (the natural +1-free width of this format), t_x = (g_cx − p_cx)/p_w, t_y likewise,
    t_w = log(g_w/p_w), t_h likewise.
    """
    import torch

    p_cx, p_cy, p_w, p_h = _centre_size(_to_tensor(proposals))
    g_cx, g_cy, g_w, g_h = _centre_size(_to_tensor(gt_boxes).to(p_cx.dtype))
    deltas = torch.stack(
        [(g_cx - p_cx) / p_w, (g_cy - p_cy) / p_h, torch.log(g_w / p_w), torch.log(g_h / p_h)], 1
    )
    return _like(deltas, proposals)


def decode_deltas(proposals: Array, deltas: Array) -> Array:
    """Apply (R, 4) ``deltas`` to (R, 4) ``proposals``: the inverse of :func:`encode_deltas`.

    Centre p_cx + t_x·p_w, size p_w·exp(t_w), box = centre ± size/2
    (docs/method.md#bounding-box-regression).
    """
    import torch

    p_cx, p_cy, p_w, p_h = _centre_size(_to_tensor(proposals))
    d = _to_tensor(deltas).to(device=p_cx.device, dtype=p_cx.dtype)
    cx, cy = p_cx + d[:, 0] * p_w, p_cy + d[:, 1] * p_h
    half_w = 0.5 * p_w * torch.exp(d[:, 2].clamp(max=MAX_LOG_SCALE))
    half_h = 0.5 * p_h * torch.exp(d[:, 3].clamp(max=MAX_LOG_SCALE))
    return _like(torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], 1), proposals)
