"""`spp-detect detect`: a trained run applied to any image files → JSON + drawn PNG per image.

Every image is decoded first (a bad file stops the command before any work); then, per image,
the Python API's ``api.Detector``: windows proposed with the run's settings, conv5 maps
computed on the fly, scored, regressed and NMS'd exactly as `test` does; the detections scoring
at least ``score_thresh`` go to `<stem>.json` and `<stem>.png`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from spp_detect.api import Detector, image_record
from spp_detect.artifacts import save_json
from spp_detect.errors import UserError
from spp_detect.image import read_image
from spp_detect.stages.common import StageContext, Summary
from spp_detect.structures import ImageDetections, ImageRecord
from spp_detect.visualize import draw_detections, save_png


def run_detect(ctx: StageContext, images: list[Path], out_dir: Path, score_thresh: float) -> str:
    config = ctx.config
    summary = Summary("detect")
    if config.propose.method == "mat":
        raise UserError("propose.method: 'mat' cannot propose for new images; "
                        "pass --set propose.method=selective_search")  # fmt: skip
    for path in images:  # every file checked before any work (decoded again below, one at a time)
        read_image(path)
    detector = Detector.from_config(config, ctx.run_dir, ctx.device)
    total = 0
    for path in tqdm(images, desc="detect", unit="img"):
        image = read_image(path)
        found = detector.detect(image)
        found = found.select(found.scores >= score_thresh)
        stem = out_dir / path.stem
        record = image_record(path, image.shape[:2])
        save_json(stem.with_suffix(".json"), _as_json(record, found, config.data.classes))
        picture = draw_detections(image, detections=found, class_names=config.data.classes)
        save_png(stem.with_suffix(".png"), picture)
        summary.items += 1
        total += len(found)
    summary.notes.append(f"{total} detections with score >= {score_thresh:g}, in {out_dir}/")
    return summary.line()


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
