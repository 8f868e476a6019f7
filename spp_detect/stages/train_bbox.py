"""`spp-detect train-bbox`: class-specific box regression on pool5 features
(docs/method.md#bounding-box-regression).

Steps:
1. check the upstream stages and open the features;
2. estimate the pool5 scale that gives mean norm 20;
3. per image, the windows whose best gt IoU is > 0.5, assigned to that gt and its class; their
   pool5 features (float16) are spilled to one file per class (``ExampleSpill``), their boxes
   kept in RAM;
4. fit one whitened ridge regressor per class from its spill, read back as a memmap in chunks
   (bbox_reg.scaled_ridge_solve), folded ready to use;
5. measure the mean IoU of the training windows before and after, delete the spill, save, write
   the manifest.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import numpy as np
import torch

from spp_detect.config import BboxRegConfig
from spp_detect.data.proposals import windows_of
from spp_detect.models.features import FeatureSource
from spp_detect.models.linear import BoxRegressors
from spp_detect.runtime.artifacts import save_json
from spp_detect.stages.builders import estimate_scale, load_proposals, open_split
from spp_detect.stages.context import StageContext, Summary, locked
from spp_detect.stages.manifests import clear_manifest, close_stage
from spp_detect.stages.sharding import per_image
from spp_detect.structures import ImageRecord
from spp_detect.train.bbox_reg import fit_box_regressors, mean_iou_before_after, regression_examples
from spp_detect.train.spill import ExampleSpill

logger = logging.getLogger(__name__)


@locked("train-bbox", sharded=True)
def run_train_bbox(ctx: StageContext, split: str) -> str:
    """The regressors of ``split``. Under torchrun every rank pools the examples of its share
    of the images (``per_image``) and rank 0 spills and fits them in the image order of one
    process, so the regressors are those of one process."""
    config, run_dir, dist = ctx.config, ctx.run_dir, ctx.dist
    summary = Summary("train-bbox")
    # 1. upstream
    records, source = open_split(config, run_dir, split, ctx.limit, ctx.device)
    clear_manifest(run_dir.bbox_dir)
    windows = {
        record.image_id: windows_of(record, load_proposals(config, run_dir, split, record))[0]
        for record in records
    }
    # 2. feature scale (on rank 0)
    cfg = config.bbox_reg
    scale = 1.0
    if (
        dist.is_main
    ):  # 20 / the mean pool5 norm of a sample (docs/method.md#bounding-box-regression)
        counts = [len(windows[r.image_id]) for r in records]
        pool5_of = functools.partial(_pool5_of, source, records, windows)
        scale = estimate_scale(cfg, counts, pool5_of, "pool5")
    # 3. examples, spilled to disk: pool5 of every example is ~13 GB float16 at VOC scale
    examples_of = functools.partial(_examples_of, source, windows, cfg.min_iou)
    found = per_image(dist, records, source, examples_of, desc="bbox examples")
    if not dist.is_main:
        for _ in found:  # pools this rank's images and sends them to rank 0
            pass
        return f"rank {dist.rank}: pool5 of its share of {len(records)} images"
    dim = source.geometry.feature_dim(source.channels)
    with ExampleSpill(run_dir.bbox_dir, len(config.data.classes), dim) as spill:
        for parts in found:
            for part in parts:
                spill.append(*part)
        # 4. fit, 5. report (the spill's memmaps live only in there, and its files go next)
        regressors, report = _fit(
            spill.examples(), dim, cfg, scale, ctx.device, config.data.classes
        )
    regressors.save(run_dir.bbox_path)
    save_json(run_dir.bbox_report_path, {"feature_scale": scale, "classes": report})
    close_stage(
        ctx, "train-bbox", split, len(records),
        extra={"classes": list(config.data.classes)}, files=[run_dir.bbox_path],
    )  # fmt: skip
    summary.items = len(records)
    summary.notes.append(_iou_note(report))
    return summary.line()


def _pool5_of(
    source: FeatureSource, records: list[ImageRecord], windows: dict, image: int, rows: np.ndarray
) -> torch.Tensor:
    """pool5 (r, D) of the windows ``rows`` of image number ``image``."""
    record = records[image]
    return _pool5(source, record, windows[record.image_id][rows])


@torch.inference_mode()
def _pool5(source: FeatureSource, record: ImageRecord, boxes: np.ndarray) -> torch.Tensor:
    pooled, _ = source.pool(record, boxes)
    return pooled.float()


def _examples_of(
    source: FeatureSource, windows: dict[str, np.ndarray], min_iou: float, record: ImageRecord
) -> list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """One image's regression examples per class present: (label, pool5 (E, D) float16,
    windows (E, 4), their assigned gt (E, 4))."""
    boxes = windows[record.image_id]
    keep, assigned = regression_examples(boxes, record.gt_boxes, min_iou)
    if len(keep) == 0:
        return []
    features = _pool5(source, record, boxes[keep]).cpu().numpy().astype(np.float16)
    labels = record.gt_labels[assigned]
    parts = []
    for label in np.unique(labels):
        rows = labels == label
        gt = record.gt_boxes[assigned[rows]]
        parts.append((int(label), features[rows], boxes[keep][rows], gt))
    return parts


def _fit(
    examples: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    dim: int,
    cfg: BboxRegConfig,
    scale: float,
    device: str,
    classes: Sequence[str],
) -> tuple[BoxRegressors, list[dict]]:
    """The regressors and the per-class report (examples, mean IoU before and after) from
    ``ExampleSpill.examples``."""
    regressors, report = fit_box_regressors(
        examples, dim, cfg.ridge_lambda, cfg.whiten_eps, feature_scale=scale, device=device
    )
    for entry, example in zip(report, examples, strict=True):
        entry["class"] = classes[entry["class_index"]]
        entry.update(mean_iou_before_after(regressors, entry["class_index"], *example))
    return regressors, report


def _iou_note(report: list[dict]) -> str:
    trained = [r for r in report if r.get("mean_iou_before") is not None]
    if not trained:
        return "no class had regression examples"
    before = np.mean([r["mean_iou_before"] for r in trained])
    after = np.mean([r["mean_iou_after"] for r in trained])
    return f"training-window IoU {before:.3f} -> {after:.3f}"
