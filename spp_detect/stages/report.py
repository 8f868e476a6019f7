"""`spp-detect report RUN_DIR`: the run's report.html, one page to open in a browser; `run`
writes it at its end.

Steps: 1. provenance from the saved config; 2. the evaluation and PR curves of the test split;
3. the fine-tuning history, stage timings and proposal recall; 4. the test images: most
confident hits, worst misses (the largest objects none found), most confident false
positives; 5. the page, written atomically. Parts a run has not made yet are said to be missing.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from spp_detect._version import __version__
from spp_detect.config import Config
from spp_detect.errors import UserError
from spp_detect.evaluation.report import (
    TILES_PER_KIND,
    ReportInputs,
    Tile,
    draw_missed,
    render,
    shrink,
)
from spp_detect.runtime.artifacts import atomic_write_text
from spp_detect.runtime.run_dir import RunDir
from spp_detect.stages.context import split_records
from spp_detect.stages.manifests import read_manifest
from spp_detect.stages.provenance import trunk_provenance
from spp_detect.structures import Detections, ImageDetections, ImageRecord

HITS, MISSES, FALSE_POSITIVES = (
    "most confident hits",
    "worst misses",
    "most confident false positives",
)


def write_report(config: Config, run_dir: RunDir) -> Path:
    """Write ``run_dir``'s report.html from what its stages left; returns its path."""
    split = config.data.test_split
    evaluation = _read_json(run_dir.eval_path(split))
    manifest = read_manifest(run_dir.stage_dir("test", split))
    detections = _detections(run_dir, split) if manifest is not None else None
    # the images test ran on: the first --limit of the split, as its manifest records
    records = split_records(config, split, manifest.get("limit")) if manifest else []
    trunk = trunk_provenance(config)
    inputs = ReportInputs(
        title=f"spp-detect run {run_dir.root}",
        provenance=_provenance(config, run_dir, trunk),
        trunk_is_random=trunk["random"],
        config_yaml=yaml.safe_dump(config.to_dict(), sort_keys=False),
        ap_rows=_ap_rows(evaluation, config.data.classes),
        metric_line=_metric_line(evaluation, split),
        pr_curves=_pr_curves(config, detections, records),
        history=(_read_json(run_dir.history_path) or {}).get("entries", []),
        stage_rows=_stage_rows(run_dir),
        recall_rows=_recall_rows(run_dir, config),
        tiles=_tiles(config, detections, records),
    )
    atomic_write_text(run_dir.report_path, render(inputs))
    return run_dir.report_path


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None  # a damaged report input is left out, not fatal


def _detections(run_dir: RunDir, split: str) -> Detections:
    with np.load(run_dir.detections_path(split), allow_pickle=False) as arrays:
        return Detections(**{key: arrays[key] for key in arrays.files})


def _provenance(config: Config, run_dir: RunDir, trunk: dict) -> dict[str, str]:
    import cv2
    import torch
    import torchvision

    return {
        "run directory": str(run_dir.root.resolve()),
        "config": config.name,
        "dataset": f"{config.data.root} ({config.data.format}), classes: "
        + ", ".join(config.data.classes),
        "trunk": trunk["backbone"] + (f" to {trunk['last_stage']}" if trunk["last_stage"] else ""),
        "weights": f"{trunk['weights']}: {trunk['source']}",
        "random conv weights": "YES" if trunk["random"] else "no",
        "versions": f"spp-detect {__version__}, torch {torch.__version__}, torchvision "
        f"{torchvision.__version__}, OpenCV {cv2.__version__}, numpy {np.__version__}, "
        f"Python {platform.python_version()}",
        "report written": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


def _ap_rows(evaluation: dict | None, classes: tuple[str, ...]) -> list:
    if not evaluation:
        return []
    ap07, area = evaluation.get("ap_07", evaluation["ap"]), evaluation.get("ap_area", {})
    npos = evaluation.get("npos", {})
    return [(name, ap07.get(name, 0.0), area.get(name, 0.0), npos.get(name, 0)) for name in classes]


def _metric_line(evaluation: dict | None, split: str) -> str:
    if not evaluation:
        return ""
    return (
        f"Split {split}, {evaluation.get('num_images', '?')} images: mAP "
        f"{100 * evaluation['mAP']:.2f} ({evaluation['metric']}), area mAP "
        f"{100 * evaluation.get('mAP_area', float('nan')):.2f}."
    )


def _pr_curves(config: Config, detections: Detections | None, records: list[ImageRecord]) -> list:
    if detections is None:
        return []
    from spp_detect.evaluation.voc_eval import evaluate_all_classes

    try:
        results = evaluate_all_classes(
            detections, records, len(config.data.classes), config.eval.iou_thresh
        )
    except UserError:
        return []  # detections of another --limit: the table above still holds
    return [
        (f"{name} ({100 * result.ap_07:.1f})", result.recall, result.precision)
        for name, result in zip(config.data.classes, results, strict=True)
    ]


def _stage_rows(run_dir: RunDir) -> list:
    timings = _read_json(run_dir.timings_path) or {}
    rows = []
    for key, value in timings.items():
        stage, _, split = key.partition("/")
        rows.append((stage, split, float(value["seconds"]), float(value["peak_rss_mib"])))
    return rows


def _recall_rows(run_dir: RunDir, config: Config) -> list:
    rows = []
    for split in dict.fromkeys((config.data.train_split, config.data.test_split)):
        report = _read_json(run_dir.proposal_report_path(split)) or {}
        for top, figures in report.get("recall", {}).items():
            rows.append((split, top, figures["recall_0.5"], figures["recall_0.7"],
                         figures["average_recall"]))  # fmt: skip
    return rows


def _tiles(
    config: Config, detections: Detections | None, records: list[ImageRecord]
) -> dict[str, list[Tile]]:
    if detections is None or not records:
        return {}
    from spp_detect.evaluation.voc_eval import detection_outcomes

    try:
        outcomes = detection_outcomes(detections, records, config.eval.iou_thresh)
    except UserError:
        return {}
    row_record = _row_records(detections, records)
    by_score = np.argsort(-detections.scores, kind="stable")
    hits = [row for row in by_score if outcomes.true[row]][:TILES_PER_KIND]
    false = [row for row in by_score if outcomes.false[row]][:TILES_PER_KIND]
    missed = sorted(outcomes.missed, key=lambda miss: -_area(miss[2]))[:TILES_PER_KIND]
    classes = config.data.classes
    return {
        HITS: [_detection_tile(detections, row, records[row_record[row]], classes) for row in hits],
        MISSES: [_miss_tile(records[index], label, box, classes) for index, label, box in missed],
        FALSE_POSITIVES: [
            _detection_tile(detections, row, records[row_record[row]], classes) for row in false
        ],
    }


def _row_records(detections: Detections, records: list[ImageRecord]) -> np.ndarray:
    """The index in ``records`` of each detection's image (M,)."""
    position = {record.image_id: i for i, record in enumerate(records)}
    lookup = np.array([position.get(i, -1) for i in detections.image_ids.tolist()], np.int64)
    return lookup[detections.image_index]


def _area(box: np.ndarray) -> float:
    return float((box[2] - box[0]) * (box[3] - box[1]))


def _detection_tile(
    detections: Detections, row: int, record: ImageRecord, classes: tuple[str, ...]
) -> Tile:
    from spp_detect.evaluation.visualize import draw_detections
    from spp_detect.models.features import read_record_image

    small, scale = shrink(read_record_image(record))
    found = ImageDetections(
        boxes=detections.boxes[row : row + 1] * scale,
        scores=detections.scores[row : row + 1],
        labels=detections.labels[row : row + 1],
    )
    drawn = draw_detections(small, detections=found, class_names=classes, score_thresh=-np.inf)
    caption = f"{record.image_id}: {classes[int(found.labels[0])]} {float(found.scores[0]):.2f}"
    return Tile(drawn, caption)


def _miss_tile(record: ImageRecord, label: int, box: np.ndarray, classes: tuple[str, ...]) -> Tile:
    from spp_detect.models.features import read_record_image

    small, scale = shrink(read_record_image(record))
    side = f"{box[2] - box[0]:.0f}×{box[3] - box[1]:.0f} px"
    caption = f"{record.image_id}: {classes[label]} ({side}) not found"
    return Tile(draw_missed(small, box[None] * scale), caption)
