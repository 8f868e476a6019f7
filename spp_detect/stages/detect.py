"""`spp-detect detect`: a trained run applied to any image files → JSON + drawn PNG per image.

Every image is decoded first, and its output names checked (a bad file, two inputs of one stem,
or an output that would replace an input or a file detect did not write stops the command
before any work); then, per image,
the Python API's ``api.Detector``: windows proposed with the run's settings, conv5 maps
computed on the fly, scored, regressed and NMS'd exactly as `test` does; the detections scoring
at least ``score_thresh`` go to `<stem>.json` and `<stem>.png`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from tqdm import tqdm

from spp_detect.api import Detector, image_record
from spp_detect.data.image import read_image
from spp_detect.errors import UserError
from spp_detect.evaluation.visualize import draw_detections, save_png
from spp_detect.runtime.artifacts import save_json
from spp_detect.stages.context import StageContext, Summary
from spp_detect.structures import ImageDetections, ImageRecord


def run_detect(ctx: StageContext, images: list[Path], out_dir: Path, score_thresh: float) -> str:
    config = ctx.config
    summary = Summary("detect")
    if not math.isfinite(score_thresh):  # NaN would keep no detection, without a word
        raise UserError(f"--score-thresh {score_thresh}: give a finite score, e.g. 0")
    if config.propose.method == "mat":
        raise UserError("propose.method: 'mat' cannot propose for new images; "
                        "pass --set propose.method=selective_search")  # fmt: skip
    for path in images:  # every file checked before any work (decoded again below, one at a time)
        read_image(path, fix=INPUT_FIX)
    check_output_names(images, out_dir)
    detector = Detector.from_config(config, ctx.run_dir, ctx.device)
    total = 0
    for path in tqdm(images, desc="detect", unit="img"):
        image = read_image(path, fix=INPUT_FIX)
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


INPUT_FIX = "pass an image file (JPEG, PNG, ...)"
OUTPUT_SUFFIXES = (".json", ".png")  # <out>/<stem>.json and <stem>.png per input
BOX_FORMAT = "xyxy continuous pixels, x2/y2 exclusive"  # the JSON's box_format, which marks it


def check_output_names(images: list[Path], out_dir: Path) -> None:
    """Refuse, before any work, inputs whose outputs ``<out_dir>/<stem>.json`` and ``.png``
    would overwrite one another (``a/img.jpg`` and ``b/img.jpg``, ``img.jpg`` and ``img.png``),
    an input (``--out`` set to the images' folder), or a file that detect did not write."""
    inputs: dict[str, Path] = {}
    for path in images:
        first = inputs.setdefault(path.stem, path)
        if first != path:
            raise UserError(
                f"{first} and {path}: both would write {out_dir / path.stem}.json and .png; "
                "rename one, or run them with different --out"
            )
        for output in (out_dir / f"{path.stem}{suffix}" for suffix in OUTPUT_SUFFIXES):
            if output.exists() and not _written_by_detect(output):
                raise UserError(
                    f"{output}: exists and is not an output of detect (e.g. an input image); "
                    "it would be overwritten, so pass another --out"
                )


def _written_by_detect(output: Path) -> bool:
    """Whether ``output`` is a result of an earlier detect call: its JSON (by its box_format),
    or a PNG beside such a JSON of the same image."""
    try:
        found = json.loads(output.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(found, dict) or found.get("box_format") != BOX_FORMAT:
        return False
    return output.suffix == ".json" or Path(found.get("image", "")).resolve() != output.resolve()


def _as_json(record: ImageRecord, found: ImageDetections, classes: tuple[str, ...]) -> dict:
    """Boxes as continuous pixel XYXY (x2, y2 exclusive), best first."""
    order = np.argsort(-found.scores, kind="stable")
    return {
        "image": str(record.path),
        "height": record.height,
        "width": record.width,
        "box_format": BOX_FORMAT,
        "detections": [
            {
                "class": classes[int(found.labels[i])],
                "score": round(float(found.scores[i]), 4),
                "box": [round(float(v), 1) for v in found.boxes[i]],
            }
            for i in order
        ],
    }
