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

import logging
from collections.abc import Sequence

import numpy as np
import torch
from tqdm import tqdm

from spp_detect.artifacts import clear_manifest, save_json
from spp_detect.bbox_reg import (
    BoxRegressors,
    fit_box_regressors,
    mean_iou_before_after,
    regression_examples,
)
from spp_detect.config import BboxRegConfig
from spp_detect.features import FeatureSource, prefetching
from spp_detect.spill import ExampleSpill
from spp_detect.stages.common import (
    StageContext,
    Summary,
    close_stage,
    load_proposals,
    locked,
    open_split,
    windows_of,
)
from spp_detect.structures import ImageRecord
from spp_detect.window_features import feature_scale, sample_for_norm

logger = logging.getLogger(__name__)


@locked("train-bbox")
def run_train_bbox(ctx: StageContext, split: str) -> str:
    config, run_dir = ctx.config, ctx.run_dir
    summary = Summary("train-bbox")
    # 1. upstream
    records, source = open_split(config, run_dir, split, ctx.limit, ctx.device)
    clear_manifest(run_dir.bbox_dir)
    windows = [windows_of(r, load_proposals(config, run_dir, split, r))[0] for r in records]
    # 2. feature scale
    cfg = config.bbox_reg
    picks = sample_for_norm([len(w) for w in windows], cfg.norm_images, cfg.norm_windows, cfg.seed)
    scale = feature_scale(
        lambda i, rows: _pool5(source, records[i], windows[i][rows]), picks, cfg.target_norm
    )
    logger.info("pool5 feature scale %.4f (mean norm -> %g)", scale, cfg.target_norm)
    # 3. examples, spilled to disk: pool5 of every example is ~13 GB float16 at VOC scale
    dim = source.geometry.feature_dim(source.channels)
    with ExampleSpill(run_dir.bbox_dir, len(config.data.classes), dim) as spill:
        _spill_examples(source, records, windows, cfg.min_iou, spill)
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


@torch.inference_mode()
def _pool5(source: FeatureSource, record: ImageRecord, boxes: np.ndarray) -> torch.Tensor:
    pooled, _ = source.pool(record, boxes)
    return pooled.float()


def _spill_examples(
    source: FeatureSource,
    records: list[ImageRecord],
    windows: list[np.ndarray],
    min_iou: float,
    spill: ExampleSpill,
) -> None:
    """Append every image's regression examples to ``spill``, under their gt's class."""
    pairs = zip(prefetching(source, records), windows, strict=True)
    for record, boxes in tqdm(pairs, desc="bbox examples", total=len(records), unit="img"):
        keep, assigned = regression_examples(boxes, record.gt_boxes, min_iou)
        if len(keep) == 0:
            continue
        features = _pool5(source, record, boxes[keep]).cpu().numpy().astype(np.float16)
        labels = record.gt_labels[assigned]
        for label in np.unique(labels):
            rows = labels == label
            gt = record.gt_boxes[assigned[rows]]
            spill.append(int(label), features[rows], boxes[keep][rows], gt)


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
