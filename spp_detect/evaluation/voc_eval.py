"""PASCAL VOC detection evaluation with the devkit's rules (docs/method.md#evaluation-rules), and
devkit result files.

Shapes: M detections of a class, G gt boxes of an image, N images.

Matching follows the MATLAB devkit `VOCevaldet.m`: detections in descending score order, each
matched to the same-image gt of its class with the largest IoU; IoU ≥ ``iou_thresh`` on a
difficult gt → ignored, on an unmatched gt → TP, on an already matched gt → FP (no fallback);
otherwise FP. IoU is computed without +1 on continuous boxes, which equals the devkit's +1 IoU on
1-based inclusive boxes (docs/method.md#conventions-and-box-format).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_iou

from spp_detect.errors import UserError
from spp_detect.runtime.artifacts import atomic_write_text
from spp_detect.structures import Detections, ImageRecord

logger = logging.getLogger(__name__)

# VOC07 11-point AP: recall thresholds 0, 0.1, …, 1.0 (devkit `VOCevaldet.m`, `0:0.1:1`).
VOC07_RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 11)

# Decimals written to devkit files: scores as the original's `%f`; coordinates with 3 decimals so
# regressed (non-integer) boxes survive a write/read round trip to 1e-3
# (docs/method.md#evaluation-rules).
SCORE_DECIMALS = 6
COORD_DECIMALS = 3


@dataclass(frozen=True)
class ClassResult:
    """Evaluation of one class: APs, the PR curve (M,) in score order, and counts."""

    ap_07: float
    ap_area: float
    recall: np.ndarray
    precision: np.ndarray
    npos: int
    num_detections: int
    num_tp: int


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool) -> float:
    """Average precision of a PR curve (M,) in score order.

    11-point (VOC07): mean over t in 0, 0.1, …, 1 of max{precision : recall ≥ t}, 0 if none.
    Area (VOC2010+ `VOCevaldet.m`): area under the monotone (right-to-left max) precision envelope.
    """
    recall, precision = np.asarray(recall, np.float64), np.asarray(precision, np.float64)
    if use_07_metric:
        points = [precision[recall >= t].max(initial=0.0) for t in VOC07_RECALL_THRESHOLDS]
        return float(np.mean(points))
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def _match_image(
    boxes: np.ndarray, gt_boxes: np.ndarray, difficult: np.ndarray, iou_thresh: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TP and FP flags (m,) of one image's detections (m, 4), already in descending score
    order, and which gt boxes (G,) a detection matched."""
    tp, fp = np.zeros(len(boxes), bool), np.ones(len(boxes), bool)
    matched = np.zeros(len(gt_boxes), bool)
    if len(gt_boxes) == 0:
        return tp, fp, matched
    iou = box_iou(
        torch.from_numpy(boxes.astype(np.float64)), torch.from_numpy(gt_boxes.astype(np.float64))
    )
    best_gt = iou.numpy().argmax(axis=1)  # the first maximum, as MATLAB's max
    best_iou = iou.numpy()[np.arange(len(boxes)), best_gt]
    for i in np.flatnonzero(best_iou >= iou_thresh):  # only matches are order-dependent
        gt = best_gt[i]
        if difficult[gt]:
            fp[i] = False  # ignored: neither TP nor FP
        elif not matched[gt]:
            tp[i], fp[i], matched[gt] = True, False, True
    return tp, fp, matched


def evaluate_class(
    image_index: np.ndarray,
    scores: np.ndarray,
    boxes: np.ndarray,
    gt_per_image: Sequence[tuple[np.ndarray, np.ndarray]],
    iou_thresh: float,
) -> ClassResult:
    """Evaluate one class's detections over N images.

    image_index (M,) into ``gt_per_image``; scores (M,); boxes (M, 4). gt_per_image: per image,
    this class's gt boxes (G, 4) and difficult flags (G,). A class with no non-difficult gt
    (npos = 0) has recall 0 everywhere and AP 0.
    """
    image_index = np.asarray(image_index, np.int64)
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")  # MATLAB sort is stable
    image_index, boxes = image_index[order], np.asarray(boxes)[order]
    tp, fp = np.zeros(len(order), bool), np.zeros(len(order), bool)
    by_image = np.argsort(image_index, kind="stable")  # keeps score order within an image
    images, starts = np.unique(image_index[by_image], return_index=True)
    groups = np.split(by_image, starts[1:]) if len(images) else []
    for image, rows in zip(images, groups, strict=True):
        gt_boxes, difficult = gt_per_image[image]
        flags = _match_image(boxes[rows], gt_boxes, np.asarray(difficult, bool), iou_thresh)
        tp[rows], fp[rows] = flags[:2]
    npos = int(sum(int((~np.asarray(d, bool)).sum()) for _, d in gt_per_image))
    cum_tp, cum_fp = np.cumsum(tp, dtype=np.float64), np.cumsum(fp, dtype=np.float64)
    recall = cum_tp / max(npos, 1)
    precision = cum_tp / np.maximum(cum_tp + cum_fp, np.finfo(np.float64).eps)
    return ClassResult(
        ap_07=voc_ap(recall, precision, True) if npos else 0.0,
        ap_area=voc_ap(recall, precision, False) if npos else 0.0,
        recall=recall,
        precision=precision,
        npos=npos,
        num_detections=len(order),
        num_tp=int(tp.sum()),
    )


def _record_index(detections: Detections, records: Sequence[ImageRecord]) -> np.ndarray:
    """For each detection, the index of its image in ``records`` (−1 if that image is not there)."""
    position = {record.image_id: i for i, record in enumerate(records)}
    tested = set(detections.image_ids.tolist())
    untested = [r.image_id for r in records if r.image_id not in tested]
    if untested:
        raise UserError(
            f"detections: {len(untested)} images of the split were not tested "
            f"(e.g. {untested[0]}); "
            "rerun `spp-detect test` with the same --split and --limit"
        )
    lookup = np.array([position.get(i, -1) for i in detections.image_ids.tolist()], np.int64)
    return lookup[detections.image_index]


@dataclass(frozen=True)
class Outcomes:
    """What each detection was under the devkit's rules, and the objects none found.

    ``true`` and ``false`` (M,) bool, in the detections' order (a detection of a difficult
    object is neither); ``missed``: (record index, label, box (4,)) of each non-difficult gt
    box that no detection matched.
    """

    true: np.ndarray
    false: np.ndarray
    missed: list[tuple[int, int, np.ndarray]]


def detection_outcomes(
    detections: Detections, records: Sequence[ImageRecord], iou_thresh: float
) -> Outcomes:
    """Match each image's detections of each class in descending score order, as
    ``evaluate_class`` does (the match is the same: it depends only on the image's own order)."""
    index = _record_index(detections, records)
    true, false = np.zeros(len(detections), bool), np.zeros(len(detections), bool)
    missed = []
    for position, record in enumerate(records):
        in_image = np.flatnonzero(index == position)
        labels = set(detections.labels[in_image].tolist()) | set(record.gt_labels.tolist())
        for label in sorted(labels):
            rows = in_image[detections.labels[in_image] == label]
            rows = rows[np.argsort(-detections.scores[rows], kind="stable")]
            gt = record.gt_labels == label
            tp, fp, matched = _match_image(
                detections.boxes[rows], record.gt_boxes[gt], record.difficult[gt], iou_thresh
            )
            true[rows], false[rows] = tp, fp
            unfound = ~(matched | record.difficult[gt])
            missed += [(position, label, box) for box in record.gt_boxes[gt][unfound]]
    return Outcomes(true=true, false=false, missed=missed)


def evaluate_all_classes(
    detections: Detections,
    records: Sequence[ImageRecord],
    num_classes: int,
    iou_thresh: float,
) -> list[ClassResult]:
    """One :class:`ClassResult` per class 0 … K−1, detections mapped to records by image id.

    Detections of images that are not in ``records`` are dropped with a warning; a record
    missing from ``detections.image_ids`` is a :class:`UserError` (test did not run on it).
    """
    index = _record_index(detections, records)
    if (index < 0).any():
        logger.warning("ignoring %d detections of images outside the split", int((index < 0).sum()))
    results = []
    for label in range(num_classes):
        rows = np.flatnonzero((detections.labels == label) & (index >= 0))
        gt = [
            (r.gt_boxes[r.gt_labels == label], r.difficult[r.gt_labels == label]) for r in records
        ]
        results.append(
            evaluate_class(
                index[rows], detections.scores[rows], detections.boxes[rows], gt, iou_thresh
            )
        )
    return results


def summarize(
    results: Sequence[ClassResult],
    class_names: Sequence[str],
    use_07_metric: bool,
    iou_thresh: float,
    num_images: int,
) -> dict[str, Any]:
    """The JSON-ready eval report (docs/contracts.md#artefacts): headline ``ap``/``mAP`` per the
    metric, plus ``ap_07``/``mAP_07``, ``ap_area``/``mAP_area``, ``npos`` and ``num_detections``
    per class.
    mAP is the mean over all classes (a class without gt counts as 0,
    docs/method.md#evaluation-rules).
    """
    ap_07 = {name: r.ap_07 for name, r in zip(class_names, results, strict=True)}
    ap_area = {name: r.ap_area for name, r in zip(class_names, results, strict=True)}
    for name, result in zip(class_names, results, strict=True):
        if result.npos == 0:
            logger.warning("class %s has no non-difficult gt in this split; its AP is 0", name)
    headline = ap_07 if use_07_metric else ap_area
    return {
        "metric": "voc07_11point" if use_07_metric else "area",
        "iou_thresh": iou_thresh,
        "num_images": num_images,
        "ap": headline,
        "mAP": _mean(headline),
        "ap_07": ap_07,
        "mAP_07": _mean(ap_07),
        "ap_area": ap_area,
        "mAP_area": _mean(ap_area),
        "npos": {name: r.npos for name, r in zip(class_names, results, strict=True)},
        "num_detections": {
            name: r.num_detections for name, r in zip(class_names, results, strict=True)
        },
    }


def _mean(values: Mapping[str, float]) -> float:
    return float(np.mean(list(values.values()))) if values else 0.0


def evaluate_detections(
    detections: Detections,
    records: Sequence[ImageRecord],
    class_names: Sequence[str],
    iou_thresh: float,
    use_07_metric: bool,
) -> dict[str, Any]:
    """Evaluate a split's detections: :func:`evaluate_all_classes` then :func:`summarize`."""
    results = evaluate_all_classes(detections, records, len(class_names), iou_thresh)
    return summarize(results, class_names, use_07_metric, iou_thresh, len(records))


def format_ap_table(result: Mapping[str, Any]) -> str:
    """A per-class table of a :func:`summarize` report, APs in percent."""
    names = list(result["ap"])
    width = max([len("class"), len("mean"), *map(len, names)])
    lines = [f"{'class':<{width}}  AP07(%)  AParea(%)   npos"]
    for name in names:
        lines.append(
            f"{name:<{width}}  {100 * result['ap_07'][name]:7.2f}  "
            f"{100 * result['ap_area'][name]:9.2f}  {result['npos'][name]:5d}"
        )
    lines.append(
        f"{'mean':<{width}}  {100 * result['mAP_07']:7.2f}  {100 * result['mAP_area']:9.2f}"
    )
    return "\n".join(lines)


def write_devkit_files(
    detections: Detections, class_names: Sequence[str], paths: Sequence[Path]
) -> None:
    """One devkit result file per class at ``paths`` (in class order; even when empty), each
    written atomically (names: ``RunDir.devkit_paths``).

    Lines ``<image_id> <score> <x1+1> <y1+1> <x2> <y2>``: the 1-based devkit coordinates of the
    continuous boxes (docs/method.md#conventions-and-box-format).
    """
    if len(paths) != len(class_names):
        raise ValueError(f"{len(paths)} paths for {len(class_names)} classes")
    for label, path in enumerate(paths):
        rows = np.flatnonzero(detections.labels == label)
        lines = [
            _devkit_line(
                detections.image_ids[detections.image_index[i]],
                detections.scores[i],
                detections.boxes[i],
            )
            for i in rows
        ]
        atomic_write_text(path, "".join(lines))


def _devkit_line(image_id: str, score: float, box: np.ndarray) -> str:
    x1, y1, x2, y2 = (float(v) for v in box)
    coords = " ".join(f"{v:.{COORD_DECIMALS}f}" for v in (x1 + 1, y1 + 1, x2, y2))
    return f"{image_id} {float(score):.{SCORE_DECIMALS}f} {coords}\n"


def read_devkit_files(paths: Sequence[Path], image_ids: Sequence[str]) -> Detections:
    """Detections read back from one devkit result file per class (the inverse of
    :func:`write_devkit_files`)."""
    position = {image_id: i for i, image_id in enumerate(image_ids)}
    index, scores, boxes, labels = [], [], [], []
    for label, path in enumerate(map(Path, paths)):
        if not path.is_file():
            raise UserError(f"{path}: devkit result file not found; run `spp-detect eval` first")
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 6 or fields[0] not in position:
                raise UserError(
                    f"{path}:{number}: expected '<known image id> <score> <x1> <y1> <x2> <y2>'"
                )
            values = [float(v) for v in fields[1:]]
            index.append(position[fields[0]])
            scores.append(values[0])
            boxes.append([values[1] - 1, values[2] - 1, values[3], values[4]])
            labels.append(label)
    return Detections(
        image_ids=np.asarray(list(image_ids), dtype=str),
        image_index=np.asarray(index, np.int64),
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
        scores=np.asarray(scores, np.float32),
        labels=np.asarray(labels, np.int64),
    )


def plot_pr_curves(
    results: Sequence[ClassResult], class_names: Sequence[str], path: str | Path
) -> bool:
    """Draw the PR curves to ``path`` (PNG) if matplotlib is installed; True if it was written."""
    if importlib.util.find_spec("matplotlib") is None:
        logger.info("matplotlib is not installed; skipping the PR-curve plot")
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spp_detect.runtime.artifacts import atomic_path

    figure, axes = plt.subplots(figsize=(6, 5))
    for name, result in zip(class_names, results, strict=True):
        axes.plot(result.recall, result.precision, label=f"{name} ({100 * result.ap_07:.1f})")
    axes.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.01))
    axes.legend(fontsize="small", loc="lower left")
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)
    return True
