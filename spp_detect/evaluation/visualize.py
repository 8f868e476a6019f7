"""Draw detections on an image and save it as PNG.

Shapes: M detections; images are uint8 (H, W, 3) RGB; boxes (M, 4) continuous XYXY.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from spp_detect.errors import UserError
from spp_detect.runtime.artifacts import atomic_path
from spp_detect.structures import ImageDetections

# Boxes scoring below this are not drawn (the original demo `spp_demo.m` shows ≥ −0.5;
# docs/method.md#test-time-detection).
DEMO_SCORE_THRESH = -0.5

# Hue step between consecutive classes: the golden-ratio conjugate spreads any number of hues
# evenly around the colour wheel, so every class gets a distinct, deterministic colour.
GOLDEN_RATIO_CONJUGATE = 0.618033988749895

FONT = cv2.FONT_HERSHEY_SIMPLEX
FONT_SCALE = 0.5
TEXT_PADDING = 2  # pixels around the label text


def class_colour(label: int) -> tuple[int, int, int]:
    """A distinct RGB colour for class ``label``, the same on every call."""
    hue = (label * GOLDEN_RATIO_CONJUGATE) % 1.0
    red, green, blue = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(255 * red), int(255 * green), int(255 * blue)


def _draw_label(image: np.ndarray, text: str, corner: tuple[int, int], colour: tuple) -> None:
    """Text on a filled box of the class colour, above the box corner (below it at the top edge)."""
    (text_w, text_h), baseline = cv2.getTextSize(text, FONT, FONT_SCALE, 1)
    height = text_h + baseline + 2 * TEXT_PADDING
    left = corner[0]
    top = corner[1] - height if corner[1] >= height else corner[1]
    cv2.rectangle(image, (left, top), (left + text_w + 2 * TEXT_PADDING, top + height), colour, -1)
    luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    ink = (0, 0, 0) if luminance > 128 else (255, 255, 255)
    origin = (left + TEXT_PADDING, top + TEXT_PADDING + text_h)
    cv2.putText(image, text, origin, FONT, FONT_SCALE, ink, 1, cv2.LINE_AA)


def draw_detections(
    image_rgb: np.ndarray,
    *,
    detections: ImageDetections,
    class_names: Sequence[str],
    score_thresh: float = DEMO_SCORE_THRESH,
    thickness: int = 2,
) -> np.ndarray:
    """A copy of ``image_rgb`` (H, W, 3) uint8 with the detections scoring ≥ ``score_thresh``
    drawn, each labelled "<class> <score>"; higher scores are drawn last (on top)."""
    canvas = np.ascontiguousarray(image_rgb, dtype=np.uint8).copy()
    found = detections
    for i in np.argsort(found.scores, kind="stable"):
        if found.scores[i] < score_thresh:
            continue
        label = int(found.labels[i])
        colour = class_colour(label)
        x1, y1, x2, y2 = (round(float(v)) for v in found.boxes[i])
        # continuous x2/y2 are exclusive; OpenCV's corners are inclusive pixels
        cv2.rectangle(canvas, (x1, y1), (max(x1, x2 - 1), max(y1, y2 - 1)), colour, thickness)
        _draw_label(canvas, f"{class_names[label]} {found.scores[i]:.2f}", (x1, y1), colour)
    return canvas


def save_png(path: str | Path, image_rgb: np.ndarray) -> None:
    """Write an RGB uint8 image (H, W, 3) to ``path`` as PNG, atomically."""
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise UserError(f"{path}: could not encode the image as PNG")
    with atomic_path(path) as tmp:
        tmp.write_bytes(encoded.tobytes())
