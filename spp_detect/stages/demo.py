"""`spp-detect demo`: the toy dataset and the whole pipeline on it, then the mAP and pictures.

Steps:
1. write the toy dataset (skipped when it is already there with the same arguments);
2. run every stage with the bundled `toy` config (on the GPU when there is one, as every
   command; --device cpu keeps it on the CPU);
3. draw the test detections of a few images to PNG and print their paths.
"""

from __future__ import annotations

from pathlib import Path

from spp_detect.data.image import read_image
from spp_detect.data.toy import make_toy_dataset
from spp_detect.evaluation.visualize import draw_detections, save_png
from spp_detect.runtime.artifacts import load_npz
from spp_detect.stages.context import StageContext, split_records
from spp_detect.stages.run import run_all
from spp_detect.structures import Detections

DEMO_PICTURES = 4  # test images drawn at the end
DEMO_SCORE_THRESH = 0.0  # SVM margin: drawn boxes are the ones the SVM calls positive
SOFTMAX_DEMO_THRESH = 0.5  # softmax scorer: boxes more likely the class than anything else


def run_demo(ctx: StageContext, toy_root: Path) -> str:
    # 1. data
    dataset_line = make_toy_dataset(toy_root)
    # 2. pipeline
    pipeline_text = run_all(ctx)
    # 3. pictures
    pictures = draw_test_pictures(ctx, DEMO_PICTURES)
    listing = "\n".join(f"  {p}" for p in pictures)
    return f"{dataset_line}\n{pipeline_text}\n\ndetections drawn:\n{listing}"


def draw_test_pictures(ctx: StageContext, count: int) -> list[Path]:
    config, run_dir = ctx.config, ctx.run_dir
    split = config.data.test_split
    detections = Detections(**load_npz(run_dir.detections_path(split)))
    records = split_records(config, split, ctx.limit)[:count]
    softmax = config.test.scorer == "softmax"
    paths = []
    for record in records:
        found = detections.for_image(record.image_id)
        picture = draw_detections(
            read_image(record.path), detections=found, class_names=config.data.classes,
            score_thresh=SOFTMAX_DEMO_THRESH if softmax else DEMO_SCORE_THRESH,
        )  # fmt: skip
        path = run_dir.demo_picture_path(record.image_id)
        save_png(path, picture)
        paths.append(path)
    return paths
