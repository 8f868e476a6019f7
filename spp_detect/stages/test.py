"""`spp-detect test`: detections for every image of a split (docs/method.md#test-time-detection).

Steps:
1. check the upstream stages; build the ``detector.TrainedDetector`` from the trained run;
2. per image: ``Detector.detect``, written as `detections/<split>/<id>.npz`, so a killed run
   resumes. The next image's cached maps are read in a background thread meanwhile. A CUDA
   error stops the stage with one line naming the image, the files written so far kept;
3. merge them into `detections/<split>.npz` and write the manifest.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
from tqdm import tqdm

from spp_detect.config import Config
from spp_detect.models.features import prefetching
from spp_detect.runtime.artifacts import file_identity, load_npz, save_npz
from spp_detect.runtime.device import device_errors
from spp_detect.runtime.run_dir import RunDir
from spp_detect.stages.builders import build_detector, load_proposals, open_split
from spp_detect.stages.context import StageContext, Summary, locked
from spp_detect.stages.manifests import check_item, clear_manifest, close_stage
from spp_detect.stages.provenance import items_to_do, model_digest
from spp_detect.stages.sharding import split_todo, wait_for_shares
from spp_detect.structures import Detections, ImageDetections, ImageRecord


@locked("test", sharded=True)
def run_test(ctx: StageContext, split: str) -> str:
    config, run_dir = ctx.config, ctx.run_dir
    summary = Summary("test")
    # 1. upstream
    records, source = open_split(config, run_dir, split, ctx.limit, ctx.device)
    detector = build_detector(config, run_dir, ctx.device)
    clear_manifest(run_dir.stage_dir("test", split))
    # 2. per image
    todo, fingerprints = items_to_do(
        config, "test", records, functools.partial(run_dir.detection_part_path, split), ctx.force,
        model=_inputs_of(config, run_dir, split),
    )  # fmt: skip
    _, mine = split_todo(ctx.dist, records, todo)  # this rank's share (all of it alone)
    progress = dict(desc=f"test {split}", total=len(mine), unit="img")
    done_before = len(records) - len(todo)
    for record in tqdm(prefetching(source, mine), **progress):
        proposals = load_proposals(config, run_dir, split, record)
        done = done_before + summary.items
        with device_errors(str(record.path), "testing", done, _lower_memory(config)):
            found = detector.detect(source, record, proposals)
        save_npz(
            run_dir.detection_part_path(split, record.image_id),
            boxes=found.boxes, scores=found.scores, labels=found.labels,
            fingerprint=np.str_(fingerprints[record.image_id]),
        )  # fmt: skip
        summary.items += 1
    if ctx.dist.active:  # every rank's parts are written before rank 0 merges them
        summary.items, _ = wait_for_shares(ctx.dist, summary.items)
        summary.notes.append(f"{ctx.dist.world} ranks")
    if not ctx.dist.is_main:
        return f"rank {ctx.dist.rank}: {len(mine)} images tested"
    # 3. merge
    detections = _merge(records, run_dir, split, fingerprints)
    save_npz(run_dir.detections_path(split), **detections.to_arrays())
    close_stage(
        ctx, "test", split, len(records),
        extra={"classes": list(config.data.classes), "detections": len(detections)},
        files=[run_dir.detections_path(split)],
    )  # fmt: skip
    summary.notes.append(f"{len(detections)} detections on {len(records)} images")
    return summary.line()


def _lower_memory(config: Config) -> str:
    """The settings that lower the GPU memory of ``test``, for its out-of-memory line."""
    if config.extract.cache == "none":  # the trunk runs here too
        return (
            "a smaller test.batch_windows (e.g. 1024), test.precision=bf16, smaller "
            "extract.scales or extract.max_long_side (e.g. 1000)"
        )
    return "a smaller test.batch_windows (e.g. 1024) or test.precision=bf16"


def _inputs_of(config: Config, run_dir: RunDir, split: str) -> Callable[[ImageRecord], str]:
    """What one image's detections come from besides the config: the trained models, and that
    image's proposal and cached conv5 files (a rerun upstream recomputes its detections)."""
    models = model_digest(config, run_dir)
    cached = config.extract.cache == "disk"

    def inputs(record: ImageRecord) -> str:
        proposals = file_identity(run_dir.proposal_path(split, record.image_id))
        maps = file_identity(run_dir.feature_path(split, record.image_id)) if cached else ""
        return f"{models}|{proposals}|{maps}"

    return inputs


def _merge(
    records: list[ImageRecord], run_dir: RunDir, split: str, fingerprints: dict[str, str]
) -> Detections:
    """The per-image files, each checked to be made from the current inputs and models."""
    per_image = []
    for record in records:
        path = run_dir.detection_part_path(split, record.image_id)
        part = load_npz(path)
        rerun = f"run `spp-detect test --split {split}`"
        check_item(path, part, fingerprints[record.image_id], rerun)
        per_image.append(
            ImageDetections(boxes=part["boxes"].reshape(-1, 4), scores=part["scores"],
                            labels=part["labels"])
        )  # fmt: skip
    return Detections.from_images([r.image_id for r in records], per_image)
