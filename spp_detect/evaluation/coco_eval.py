"""COCO detection metrics through ``pycocotools`` (docs/coco.md#the-coco-metric).

Shapes: M detections over a split, N images, K classes.

The ground truth is built from the same records the VOC evaluation reads (``coco.records_to_coco``:
the same clipped boxes, ``difficult`` as ``iscrowd``), so the two evaluations see the same data
and differ only in their rules. pycocotools is optional (``pip install "spp-detect[coco]"``).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from spp_detect.data.coco import continuous_to_coco, records_to_coco
from spp_detect.errors import UserError
from spp_detect.evaluation.voc_eval import COORD_DECIMALS, SCORE_DECIMALS
from spp_detect.structures import Detections, ImageRecord

logger = logging.getLogger(__name__)

# COCOeval.stats in order (pycocotools cocoeval.py, COCOeval.summarize): AP over IoU .50:.05:.95
# for 100 detections per image and class, at IoU .50 and .75, then by object area
# (small < 32², medium < 96², large), then the average recalls.
STAT_NAMES = (
    "AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
    "AR_1", "AR_10", "AR_100", "AR_small", "AR_medium", "AR_large",
)  # fmt: skip
INSTALL_HINT = 'pip install "spp-detect[coco]" (or pip install pycocotools)'


def require_pycocotools() -> None:
    """A :class:`UserError` with the install command when pycocotools is missing."""
    if importlib.util.find_spec("pycocotools") is None:
        raise UserError(f"eval --metric coco: pycocotools is not installed; {INSTALL_HINT}")


def coco_image_ids(records: Sequence[ImageRecord]) -> list[int | str]:
    """Each record's image id in COCO files: an int when every id is one written plainly (the
    ids read from a COCO file), else the id as it is (e.g. VOC's '000001')."""
    ids = [r.image_id for r in records]
    if all(i.isdigit() and str(int(i)) == i for i in ids):
        return [int(i) for i in ids]
    return ids


def results_json(
    detections: Detections,
    records: Sequence[ImageRecord],
    category_ids: Sequence[Any],
) -> list[dict[str, Any]]:
    """Detections of the images in ``records`` as a COCO results list (``image_id``,
    ``category_id``, ``bbox`` [x, y, w, h], ``score``), boxes through ``continuous_to_coco``."""
    id_of = dict(zip((r.image_id for r in records), coco_image_ids(records), strict=True))
    image_ids = detections.image_ids[detections.image_index].tolist()
    boxes = np.round(continuous_to_coco(detections.boxes), COORD_DECIMALS).tolist()
    scores = np.round(detections.scores.astype(np.float64), SCORE_DECIMALS).tolist()
    return [
        {
            "image_id": id_of[image_id],
            "category_id": category_ids[label],
            "bbox": box,
            "score": score,
        }
        for image_id, label, box, score in zip(
            image_ids, detections.labels.tolist(), boxes, scores, strict=True
        )
        if image_id in id_of
    ]


def evaluate_coco(
    records: Sequence[ImageRecord],
    results: list[dict[str, Any]],
    class_names: Sequence[str],
    category_ids: Sequence[Any],
) -> dict[str, Any]:
    """The COCO figures of ``results`` (from :func:`results_json`) on ``records``: the twelve
    ``STAT_NAMES``, and per class ``ap`` (AP@[.5:.95]) and ``ap50``. A figure without gt (−1 in
    pycocotools) is None."""
    require_pycocotools()
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ground_truth = records_to_coco(records, class_names, category_ids, coco_image_ids(records))
    printed = io.StringIO()  # pycocotools prints progress and its table; keep stdout clean
    with contextlib.redirect_stdout(printed):
        gt = COCO()
        gt.dataset = ground_truth
        gt.createIndex()
        if not results:
            return _no_detections(class_names, ground_truth)
        found = gt.loadRes(copy.deepcopy(results))  # loadRes adds fields to what it is given
        evaluator = COCOeval(gt, found, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    logger.debug("pycocotools:\n%s", printed.getvalue())
    figures: dict[str, Any] = {
        name: _figure(value) for name, value in zip(STAT_NAMES, evaluator.stats, strict=True)
    }
    figures.update(_per_class(evaluator, class_names, category_ids))
    figures["num_detections"] = len(results)
    return figures


def _per_class(evaluator, class_names: Sequence[str], category_ids: Sequence[Any]) -> dict:
    """AP@[.5:.95] and AP50 of each class, from the accumulated precision (T, R, K, A, M): all
    areas (A index 0), 100 detections (M index −1), averaged as summarize() does."""
    precision = evaluator.eval["precision"]
    order = list(evaluator.params.catIds)
    at_50 = int(np.flatnonzero(np.isclose(evaluator.params.iouThrs, 0.5))[0])
    ap, ap50 = {}, {}
    for name, cid in zip(class_names, category_ids, strict=True):
        curves = precision[:, :, order.index(cid), 0, -1]
        ap[name] = _mean_valid(curves)
        ap50[name] = _mean_valid(curves[at_50])
    return {"ap": ap, "ap50": ap50}


def _mean_valid(values: np.ndarray) -> float | None:
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else None


def _figure(value: float) -> float | None:
    return None if value < 0 else float(value)


def _no_detections(class_names: Sequence[str], ground_truth: dict) -> dict[str, Any]:
    """The figures of an empty results list (pycocotools cannot load one): 0 where there is
    gt, None where there is none."""
    has_gt = {a["category_id"] for a in ground_truth["annotations"] if not a["iscrowd"]}
    by_name = {c["name"]: c["id"] in has_gt for c in ground_truth["categories"]}
    figure = 0.0 if any(by_name.values()) else None
    figures: dict[str, Any] = dict.fromkeys(STAT_NAMES, figure)
    per_class = {name: 0.0 if by_name[name] else None for name in class_names}
    return {**figures, "ap": per_class, "ap50": dict(per_class), "num_detections": 0}


def format_coco_line(figures: dict[str, Any]) -> str:
    """One line of the headline COCO figures, in percent ("-" where there is no gt)."""
    names = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")
    parts = [f"{name} {_percent(figures[name])}" for name in names]
    return "COCO (pycocotools): " + ", ".join(parts)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"
