"""What the VOC and COCO readers share: class-name matching, the one builder of an
``ImageRecord`` from an image's ground truth, and the problems of a split logged as one line
each.

Shapes: G gt boxes of one image.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from spp_detect.ops.boxes import clip_boxes, has_area
from spp_detect.structures import ImageRecord

MAX_EXAMPLES = 3  # files or image ids named in one aggregated warning line
CLIPPED = "boxes outside the image (clipped)"
NO_AREA = "boxes with no area (dropped)"


def label_lookup(classes: Sequence[str]) -> dict[str, int]:
    """{name: label} with the exact (stripped) names first, then lower-case ones, so that
    'Raccoon ' finds 'raccoon'."""
    lookup: dict[str, int] = {}
    for label, name in enumerate(classes):
        lookup.setdefault(name.strip().lower(), label)
    for label, name in enumerate(classes):
        lookup[name.strip()] = label
    return lookup


@dataclass
class SplitLog:
    """Problems found over a split, logged as one line each instead of one per ``unit`` (the
    file or image they were found in); ``skipped`` counts the items of other classes."""

    unit: str
    skipped: Counter[str] = field(default_factory=Counter)
    problems: dict[str, list[str]] = field(default_factory=dict)

    def note(self, problem: str, where: str | Path) -> None:
        self.problems.setdefault(problem, []).append(str(where))

    def emit(self, where: str, log: logging.Logger) -> None:
        for problem, places in self.problems.items():
            examples = ", ".join(places[:MAX_EXAMPLES]) + (
                ", …" if len(places) > MAX_EXAMPLES else ""
            )
            log.warning("%s: %s in %d %s(s): %s", where, problem, len(places), self.unit, examples)


def gt_record(
    image_id: str,
    path: Path,
    image_hw: tuple[int, int],
    boxes: np.ndarray,
    labels: np.ndarray,
    difficult: np.ndarray,
    log: SplitLog,
    where: str | Path,
) -> ImageRecord:
    """The record of one image: its gt ``boxes`` (G, 4) continuous XYXY clipped to the image,
    and those left without area dropped with their ``labels`` and ``difficult`` flags (G,);
    each change noted in ``log`` against ``where`` (the annotation file or image id)."""
    clipped = clip_boxes(boxes, image_hw)
    if not np.array_equal(clipped, boxes):
        log.note(CLIPPED, where)
    keep = has_area(clipped)
    if not keep.all():
        log.note(NO_AREA, where)
    height, width = image_hw
    return ImageRecord(
        image_id=image_id,
        path=path,
        height=height,
        width=width,
        gt_boxes=clipped[keep],
        gt_labels=labels[keep],
        difficult=difficult[keep],
    )


def log_split_summary(
    where: str,
    records: Sequence[ImageRecord],
    skipped: Counter[str],
    flagged: str,
    dropped: str,
    log: logging.Logger,
) -> None:
    """One INFO line on a split read: images, boxes, ``flagged`` ones (difficult, crowd) and the
    ``dropped`` items of other classes counted in ``skipped`` (each reader on its own ``log``)."""
    num_boxes = sum(len(r.gt_boxes) for r in records)
    num_flagged = sum(int(r.difficult.sum()) for r in records)
    others = ""
    if skipped:
        counts = ", ".join(f"{name} {count}" for name, count in skipped.most_common())
        others = f"; skipped {sum(skipped.values())} {dropped} of other classes ({counts})"
    log.info(
        "%s: %d images, %d boxes (%d %s)%s",
        where, len(records), num_boxes, num_flagged, flagged, others,
    )  # fmt: skip
