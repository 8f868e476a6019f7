"""`spp-detect train-bbox`: class-specific box regression on pool5 features
(docs/method.md#bounding-box-regression).

Steps:
1. check the upstream stages and open the features;
2. estimate the pool5 scale that gives mean norm 20;
3. per image, the windows whose best gt IoU is > 0.5, assigned to that gt and its class; their
   pool5 features are kept (float16) per class;
4. fit one whitened ridge regressor per class, folded ready to use;
5. measure the mean IoU of the training windows before and after, save, write the manifest.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from tqdm import tqdm

from spp_detect.artifacts import clear_manifest, save_json
from spp_detect.bbox_reg import fit_box_regressors, mean_iou_before_after, regression_examples
from spp_detect.features import FeatureSource, prefetching
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
    # 3. examples
    num_classes = len(config.data.classes)
    examples = _examples(source, records, windows, num_classes, cfg.min_iou)
    # 4. fit
    regressors, report = fit_box_regressors(
        examples, source.geometry.feature_dim(source.channels), cfg.ridge_lambda,
        cfg.whiten_eps, feature_scale=scale, device=ctx.device,
    )  # fmt: skip
    # 5. report and outputs
    for entry, example in zip(report, examples, strict=True):
        entry["class"] = config.data.classes[entry["class_index"]]
        entry.update(mean_iou_before_after(regressors, entry["class_index"], *example))
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


def _examples(
    source: FeatureSource,
    records: list[ImageRecord],
    windows: list[np.ndarray],
    num_classes: int,
    min_iou: float,
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per class (pool5 (R_k, D) float16, windows (R_k, 4), assigned gt (R_k, 4))."""
    parts: list[list[tuple]] = [[] for _ in range(num_classes)]
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
            parts[label].append((features[rows], boxes[keep][rows], gt))
    dim = source.geometry.feature_dim(source.channels)
    return [_stack(p, dim) for p in parts]


def _stack(parts: list[tuple], dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not parts:
        empty = np.zeros((0, 4), np.float32)
        return np.zeros((0, dim), np.float16), empty, empty
    return tuple(np.concatenate(column) for column in zip(*parts, strict=True))


def _iou_note(report: list[dict]) -> str:
    trained = [r for r in report if r.get("mean_iou_before") is not None]
    if not trained:
        return "no class had regression examples"
    before = np.mean([r["mean_iou_before"] for r in trained])
    after = np.mean([r["mean_iou_after"] for r in trained])
    return f"training-window IoU {before:.3f} -> {after:.3f}"
