"""`spp-detect propose`: region proposals for every image of a split
(docs/method.md#proposals).

Steps: 1. the split's records and the method's inputs; 2. one atomic
``proposals/<split>/<id>.npz`` per image (``boxes`` float32 (R, 4), ``seconds``, ``fingerprint``
of the propose config), computed in worker processes; a file made with the same propose config
is kept (resume); 3. failures are listed and end the stage with exit code 2 and no manifest, so a
rerun redoes only them; 4. the manifest; 5. the recall report (``report.json`` and a table).

Images run in ``workers.run_jobs``' crash-tolerant worker processes: an image on which OpenCV
crashes its process costs only that image.
"""

from __future__ import annotations

import functools
import logging
import math
import multiprocessing
import time
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from spp_detect.config import Config, ProposeConfig
from spp_detect.data import proposals
from spp_detect.data.image import read_image
from spp_detect.errors import UserError
from spp_detect.ops.boxes import clip_boxes
from spp_detect.runtime.artifacts import load_npz, save_json, save_npz
from spp_detect.runtime.run_dir import RunDir
from spp_detect.runtime.workers import MP_START_METHOD, run_jobs
from spp_detect.stages.builders import proposal_params
from spp_detect.stages.context import StageContext, Summary, dir_bytes, locked, split_records
from spp_detect.stages.manifests import clear_manifest, close_stage
from spp_detect.stages.provenance import items_to_do
from spp_detect.stages.sharding import split_todo, wait_for_shares
from spp_detect.structures import ImageRecord

logger = logging.getLogger(__name__)

MAX_LISTED_FAILURES = 10  # failures named in the error line; all of them are logged
# Selective search's time grows with the pixels and worse with long thin images (a 30,000 x 200
# image made no progress in 400 s, issue 27): above this longer side, propose.max_side is hinted.
LARGE_SIDE_HINT = 4000  # px


@dataclass(frozen=True)
class ProposalJob:
    """One image: where to read it, where its ``.npz`` goes, the ``propose_image`` kwargs."""

    image_id: str
    image_path: str
    out_path: str
    params: Mapping[str, Any] = field(default_factory=dict)
    fingerprint: str = ""  # the item fingerprint (provenance.item_fingerprint), stored with it


def compute_proposals(job: ProposalJob) -> int:
    """Worker body: read the image, propose, write its ``.npz``; returns R."""
    image = read_image(job.image_path)
    started = time.perf_counter()
    boxes = proposals.propose_image(image, **job.params)
    save_proposals(job.out_path, boxes, job.fingerprint, time.perf_counter() - started)
    return len(boxes)


def save_proposals(
    path: str | Path, boxes: np.ndarray, propose_fingerprint: str, seconds: float | None = None
) -> None:
    """One image's file: ``boxes`` (R, 4) float32, ``fingerprint``, ``seconds`` when measured."""
    extra = {} if seconds is None else {"seconds": np.float64(seconds)}
    save_npz(
        path, boxes=boxes.astype(np.float32), fingerprint=np.str_(propose_fingerprint), **extra
    )


def hint_max_side(records: list[ImageRecord], max_side: int) -> None:
    """One WARNING naming the images proposed on with a longer side above LARGE_SIDE_HINT
    (``propose.max_side`` 0 or above it): proposing on them may take many minutes."""
    cap = max_side or math.inf  # 0: never downscaled
    large = [r for r in records if min(max(r.image_hw), cap) > LARGE_SIDE_HINT]
    if large:
        first = large[0]
        logger.warning(
            "%d image(s) with a side over %d px (e.g. %s, %dx%d): proposals on them may take "
            "many minutes; set propose.max_side (e.g. 1000) to propose on a downscaled copy",
            len(large), LARGE_SIDE_HINT, first.path, first.width, first.height,
        )  # fmt: skip


@locked("propose", sharded=True)
def run_propose(ctx: StageContext, split: str, report_only: bool = False) -> str:
    """Proposals for ``split`` (``ctx``: the CLI's StageContext); returns report + summary."""
    config, run_dir = ctx.config, ctx.run_dir
    out_dir = run_dir.proposals_dir(split)
    summary = Summary("propose")
    # 1. records and method inputs
    records = split_records(config, split, ctx.limit)
    dist = ctx.dist
    if report_only:  # reads every image's file: rank 0's job under torchrun
        return _report(config, run_dir, records, split, summary) if dist.is_main else "idle"
    proposals.require_ximgproc(config.propose.method)
    _check_edge_model_setting(config.propose)
    clear_manifest(out_dir)
    todo, fingerprints = items_to_do(
        config, "propose", records, functools.partial(run_dir.proposal_path, split), ctx.force
    )
    todo, mine = split_todo(dist, records, todo)  # mine: this rank's share (all of it alone)
    if len(todo) < len(records):
        summary.notes.append(f"{len(records) - len(todo)} already done")
    # 2. proposals per image
    paths = [run_dir.proposal_path(split, r.image_id) for r in mine]
    if config.propose.method == "mat":
        failures = _import_mat(config.propose, mine, paths, fingerprints)
    else:
        hint_max_side(mine, config.propose.max_side)
        params = proposal_params(config.propose)
        jobs = [
            ProposalJob(r.image_id, str(r.path), str(p), params, fingerprints[r.image_id])
            for r, p in zip(mine, paths, strict=True)
        ]
        failures = run_jobs(jobs, ctx.workers, compute_proposals, desc=f"propose {split}")
    summary.items = len(mine) - len(failures)
    summary.bytes_written = dir_bytes(paths)
    if dist.active:  # every rank's files are written before rank 0 closes the stage
        summary.items, failures = wait_for_shares(dist, summary.items, failures)
        summary.notes.append(f"{dist.world} ranks")
    # 3. failures: no manifest, exit code 2
    if failures and not dist.is_main:
        raise UserError(
            f"propose --split {split}: {len(failures)} images failed; rank 0 names them"
        )
    if failures:
        _raise_failures(failures, len(records), split)
    if not dist.is_main:
        return f"rank {dist.rank}: {len(mine)} images proposed"
    if dist.active:
        summary.bytes_written = dir_bytes([run_dir.proposal_path(split, r.image_id) for r in todo])
    # 4. manifest
    close_stage(ctx, "propose", split, len(records))
    # 5. recall report
    return _report(config, run_dir, records, split, summary)


def _check_edge_model_setting(propose: ProposeConfig) -> None:
    """The EdgeBoxes model file, loaded once (the names were checked when the config loaded)."""
    if propose.method == "edge_boxes":
        if propose.edge_model:
            _check_edge_model(propose.edge_model)
        else:
            logger.warning(
                "propose.edge_model is empty: EdgeBoxes runs on a gradient edge map, which gives "
                "lower recall than the structured-edge model (see README)"
            )


def _check_edge_model(model_path: str) -> None:
    """Load the structured-edge model once in a throwaway process: a foreign file crashes OpenCV."""
    context = multiprocessing.get_context(MP_START_METHOD)
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        try:
            pool.submit(proposals.check_edge_model, model_path).result()
        except BrokenProcessPool:
            raise UserError(
                f"{model_path}: not a structured-edge model (OpenCV crashed loading it); use the "
                "model.yml.gz from opencv_extra (see README)"
            ) from None


def _import_mat(
    propose: ProposeConfig,
    records: list[ImageRecord],
    paths: list[Path],
    fingerprints: Mapping[str, str],
) -> dict[str, str]:
    """Method ``mat``: the precomputed boxes of each image, clipped and filtered like the others."""
    boxes_by_id = proposals.load_mat_proposals(propose.mat_file, [r.image_id for r in records])
    for record, path in zip(tqdm(records, desc="import .mat", unit="img"), paths, strict=True):
        boxes = clip_boxes(boxes_by_id[record.image_id], record.image_hw)
        boxes = proposals.filter_boxes(boxes, propose.min_size, propose.max_per_image)
        save_proposals(path, boxes, fingerprints[record.image_id])
    return {}


def _raise_failures(failures: Mapping[str, str], num_images: int, split: str) -> None:
    listed = "; ".join(
        f"{image_id} ({reason})"
        for image_id, reason in list(failures.items())[:MAX_LISTED_FAILURES]
    )
    more = (
        f"; and {len(failures) - MAX_LISTED_FAILURES} more (see the log)"
        if len(failures) > MAX_LISTED_FAILURES
        else ""
    )
    raise UserError(
        f"propose --split {split}: {len(failures)} of {num_images} images failed: {listed}{more}; "
        "the others are saved: fix or drop these images and rerun to redo only them"
    )


# --- recall report -----------------------------------------------------------------------------


def _report(
    config: Config, run_dir: RunDir, records: list[ImageRecord], split: str, summary: Summary
) -> str:
    """Recall table and ``report.json`` over the split's non-difficult gt, then the summary line."""
    out_dir = run_dir.proposals_dir(split)
    missing = [
        r.image_id for r in records if not run_dir.proposal_path(split, r.image_id).is_file()
    ]
    if missing:
        raise UserError(
            f"{out_dir}: no proposals for {len(missing)} of {len(records)} images "
            f"(e.g. {missing[0]}); run `spp-detect propose --split {split}` first"
        )
    gt_boxes = [r.gt_boxes[~r.difficult] for r in records]
    if sum(len(g) for g in gt_boxes) == 0:
        logger.info("%s: no annotated boxes, no recall report", split)
        return summary.line()
    boxes, seconds = [], []
    for record in tqdm(records, desc="recall", unit="img", leave=False):
        arrays = load_npz(run_dir.proposal_path(split, record.image_id))
        boxes.append(arrays["boxes"].astype(np.float32, copy=False))
        if "seconds" in arrays:
            seconds.append(float(arrays["seconds"]))
    recall = proposals.proposal_recall(gt_boxes, boxes)
    report = {
        "split": split,
        "method": config.propose.method,
        "mode": config.propose.mode if config.propose.method == "selective_search" else None,
        "num_images": len(records),
        "num_gt": int(sum(len(g) for g in gt_boxes)),
        "gt": "non-difficult",
        "mean_boxes_per_image": float(np.mean([len(b) for b in boxes])),
        "seconds_per_image": float(np.mean(seconds)) if seconds else None,
        "recall": recall,
    }
    save_json(run_dir.proposal_report_path(split), report)
    seconds_text = f"{report['seconds_per_image']:.2f} s/image" if seconds else "time unknown"
    head = (
        f"{split}: {len(records)} images, {report['num_gt']} non-difficult gt boxes, "
        f"{report['mean_boxes_per_image']:.0f} boxes/image, {seconds_text}"
    )
    return "\n".join([head, proposals.format_recall_table(recall), summary.line()])
