"""Frozen struct-of-arrays records that pass between the library and the stages.

Shapes: G gt boxes in an image, M detections over a split, N images.
Boxes are float32 (·, 4) XYXY in continuous pixel coordinates
(docs/method.md#conventions-and-box-format).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def _check(name: str, array: np.ndarray, dtype: type, shape: tuple[int | None, ...]) -> np.ndarray:
    array = np.asarray(array, dtype=dtype)
    ok = array.ndim == len(shape) and all(
        s is None or s == a for s, a in zip(shape, array.shape, strict=False)
    )
    if not ok:
        raise ValueError(f"{name}: expected shape {shape}, got {array.shape}")
    return array


@dataclass(frozen=True)
class ImageRecord:
    """One annotated image: gt_boxes (G, 4) float32, gt_labels (G,) int64, difficult (G,) bool."""

    image_id: str
    path: Path
    height: int
    width: int
    gt_boxes: np.ndarray
    gt_labels: np.ndarray
    difficult: np.ndarray

    def __post_init__(self) -> None:
        boxes = _check("gt_boxes", self.gt_boxes, np.float32, (None, 4))
        count = len(boxes)
        object.__setattr__(self, "gt_boxes", boxes)
        object.__setattr__(
            self, "gt_labels", _check("gt_labels", self.gt_labels, np.int64, (count,))
        )
        object.__setattr__(self, "difficult", _check("difficult", self.difficult, bool, (count,)))
        object.__setattr__(self, "path", Path(self.path))

    @property
    def image_hw(self) -> tuple[int, int]:
        return (self.height, self.width)


def _check_detection_arrays(found) -> int:
    """Coerce and check ``found``'s boxes (M, 4), scores (M,) and labels (M,); returns M."""
    count = len(np.asarray(found.scores).reshape(-1))
    object.__setattr__(found, "boxes", _check("boxes", found.boxes, np.float32, (count, 4)))
    object.__setattr__(found, "scores", _check("scores", found.scores, np.float32, (count,)))
    object.__setattr__(found, "labels", _check("labels", found.labels, np.int64, (count,)))
    return count


@dataclass(frozen=True)
class ImageDetections:
    """One image's detections: boxes (M, 4) float32, scores (M,) float32, labels (M,) int64
    foreground class indices. Passed by name, never as a positional triple."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        _check_detection_arrays(self)

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def empty(cls) -> ImageDetections:
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))

    def select(self, rows: np.ndarray) -> ImageDetections:
        """The detections at ``rows`` (a boolean mask (M,) or indices)."""
        return ImageDetections(self.boxes[rows], self.scores[rows], self.labels[rows])


@dataclass(frozen=True)
class Detections:
    """Detections over a split (docs/contracts.md#artefacts, `detections/<split>.npz`).

    image_ids (N,) str; image_index (M,) int64 into image_ids; boxes (M, 4) float32;
    scores (M,) float32; labels (M,) int64 foreground class indices.
    """

    image_ids: np.ndarray
    image_index: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_ids", np.asarray(self.image_ids, dtype=str).reshape(-1))
        count = _check_detection_arrays(self)
        object.__setattr__(
            self, "image_index", _check("image_index", self.image_index, np.int64, (count,))
        )

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def from_images(
        cls, image_ids: Sequence[str], per_image: Sequence[ImageDetections]
    ) -> Detections:
        """The split's detections from each image's, in image order."""
        counts = [len(found) for found in per_image]
        return cls(
            image_ids=np.asarray(image_ids, dtype=str),
            image_index=np.repeat(np.arange(len(counts), dtype=np.int64), counts),
            boxes=np.concatenate([f.boxes for f in per_image] or [np.zeros((0, 4))]),
            scores=np.concatenate([f.scores for f in per_image] or [np.zeros(0)]),
            labels=np.concatenate([f.labels for f in per_image] or [np.zeros(0)]),
        )

    def for_image(self, image_id: str) -> ImageDetections:
        """The detections of one image (none when the id is not listed)."""
        matches = np.flatnonzero(self.image_ids == image_id)
        if len(matches) == 0:
            return ImageDetections.empty()
        return ImageDetections(self.boxes, self.scores, self.labels).select(
            self.image_index == matches[0]
        )

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "image_ids": self.image_ids,
            "image_index": self.image_index,
            "boxes": self.boxes,
            "scores": self.scores,
            "labels": self.labels,
        }
