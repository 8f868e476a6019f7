"""Detections of one image from per-window class scores (docs/method.md#test-time-detection).

Shapes: R windows of the image, K foreground classes, M detections.

Per class: keep windows scoring above the threshold (strict), greedy NMS, the top
``max_per_class``; then optionally regress the kept boxes, clip them to the image and run NMS
again (the original's second NMS in the result writer). torchvision's NMS drops boxes with IoU
> threshold, as the original's `nms.m`; its IoU without +1 on continuous boxes equals the
original's +1 IoU (docs/method.md#conventions-and-box-format).

Pass only proposal windows (not the gt rows that training uses): the original scores gt rows
but masks them out at test time (docs/method.md#test-time-detection).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision.ops import batched_nms

from spp_detect.ops.boxes import clip_boxes
from spp_detect.structures import ImageDetections

# regress(window_index (M,), labels (M,)) -> regressed boxes (M, 4), for the windows kept.
RegressFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def by_class(labels: torch.Tensor, scores: torch.Tensor, max_per_class: int | None) -> torch.Tensor:
    """Indices (M',) ordered by class, then by descending score (ties by index); at most
    ``max_per_class`` each. Two stable sorts instead of a loop over classes, so the device is
    waited for once here, not once per class."""
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[torch.argsort(labels[order], stable=True)]
    if max_per_class is None:
        return order
    sorted_labels = labels[order]
    rank = torch.arange(len(order), device=order.device)
    rank -= torch.searchsorted(sorted_labels, sorted_labels)  # minus its class's first position
    return order[rank < max_per_class]


def select_detections(
    scores: torch.Tensor,
    boxes: torch.Tensor,
    score_thresh: float,
    nms_thresh: float,
    max_per_class: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class threshold → NMS → top-k on scores (R, K) of windows boxes (R, 4)
    (docs/method.md#test-time-detection).

    Returns window_index (M,) int64 into the R windows, labels (M,) int64 and scores (M,),
    ordered by class, then by descending score.
    """
    boxes = torch.as_tensor(boxes, device=scores.device)
    windows, labels = torch.nonzero(scores > score_thresh, as_tuple=True)
    kept_scores = scores[windows, labels]
    keep = batched_nms(boxes[windows].float(), kept_scores.float(), labels, nms_thresh)
    keep = keep[by_class(labels[keep], kept_scores[keep], max_per_class)]
    return windows[keep], labels[keep], kept_scores[keep]


def finalize_detections(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    image_hw: tuple[int, int],
    nms_thresh: float,
) -> ImageDetections:
    """Clip boxes (M, 4) to the image and run per-class NMS again
    (docs/method.md#test-time-detection).

    Returns the detections (M' ≤ M) on the CPU, ordered by class, then by descending score.
    """
    boxes = clip_boxes(torch.as_tensor(boxes), image_hw)
    keep = batched_nms(boxes.float(), scores.float(), labels, nms_thresh)
    keep = keep[by_class(labels[keep], scores[keep], None)]
    return ImageDetections(
        boxes=boxes[keep].cpu().numpy(),
        scores=scores[keep].cpu().numpy(),
        labels=labels[keep].cpu().numpy(),
    )


def detect_image(
    scores: torch.Tensor,
    boxes: torch.Tensor,
    image_hw: tuple[int, int],
    score_thresh: float,
    nms_thresh: float,
    max_per_class: int,
    regress: RegressFn | None = None,
) -> ImageDetections:
    """One image's detections from window scores (R, K) and proposal boxes (R, 4).

    1. :func:`select_detections`; 2. ``regress(window_index, labels)`` → new boxes (M, 4) when
    given, else the windows' own boxes; 3. :func:`finalize_detections`.
    """
    boxes = torch.as_tensor(boxes, device=scores.device)
    window_index, labels, kept_scores = select_detections(
        scores, boxes, score_thresh, nms_thresh, max_per_class
    )
    kept_boxes = boxes[window_index] if regress is None else regress(window_index, labels)
    return finalize_detections(kept_boxes, kept_scores, labels, image_hw, nms_thresh)
