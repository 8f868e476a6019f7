"""`spp-detect detect`: a trained run applied to any image files → JSON + drawn PNG per image.

Steps per image: read it, propose windows with the run's proposal settings, compute the conv5
maps on the fly, score, regress and NMS exactly as `test` does, keep the detections scoring at
least ``score_thresh``, write `<stem>.json` and `<stem>.png`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from spp_detect.artifacts import save_json
from spp_detect.errors import UserError
from spp_detect.image import read_image
from spp_detect.proposals import propose_image
from spp_detect.stages.common import (
    StageContext,
    Summary,
    build_detector,
    live_feature_source,
    proposal_params,
)
from spp_detect.structures import ImageDetections, ImageRecord
from spp_detect.visualize import draw_detections, save_png


def run_detect(ctx: StageContext, images: list[Path], out_dir: Path, score_thresh: float) -> str:
    config = ctx.config
    summary = Summary("detect")
    if config.propose.method == "mat":
        raise UserError("propose.method: 'mat' cannot propose for new images; "
                        "pass --set propose.method=selective_search")  # fmt: skip
    records = [_record(path) for path in images]  # every file checked before any work
    detector = build_detector(config, ctx.run_dir, ctx.device)
    source = live_feature_source(config, ctx.run_dir, ctx.device)
    params = proposal_params(config.propose)
    total = 0
    for record in tqdm(records, desc="detect", unit="img"):
        image = read_image(record.path)
        proposals = propose_image(image, **params)
        found = detector.detect(source, record, proposals)
        found = found.select(found.scores >= score_thresh)
        stem = out_dir / record.image_id
        save_json(stem.with_suffix(".json"), _as_json(record, found, config.data.classes))
        picture = draw_detections(image, detections=found, class_names=config.data.classes)
        save_png(stem.with_suffix(".png"), picture)
        summary.items += 1
        total += len(found)
    summary.notes.append(f"{total} detections with score >= {score_thresh:g}, in {out_dir}/")
    return summary.line()


def _record(path: Path) -> ImageRecord:
    """An unannotated record; the image is decoded here so a bad file fails before any work."""
    height, width = read_image(path).shape[:2]
    empty = np.zeros((0, 4), np.float32)
    return ImageRecord(path.stem, path, height, width, empty, np.zeros(0), np.zeros(0, bool))


def _as_json(record: ImageRecord, found: ImageDetections, classes: tuple[str, ...]) -> dict:
    """Boxes as continuous pixel XYXY (x2, y2 exclusive), best first."""
    order = np.argsort(-found.scores, kind="stable")
    return {
        "image": str(record.path),
        "height": record.height,
        "width": record.width,
        "box_format": "xyxy continuous pixels, x2/y2 exclusive",
        "detections": [
            {
                "class": classes[int(found.labels[i])],
                "score": round(float(found.scores[i]), 4),
                "box": [round(float(v), 1) for v in found.boxes[i]],
            }
            for i in order
        ],
    }
