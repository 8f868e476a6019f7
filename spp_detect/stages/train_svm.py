"""`spp-detect train-svm`: per-class linear SVMs on fine-tuned fc7, one hard-negative pass.

Steps (docs/method.md#svm-training):
1. check the upstream stages and open the features and the fine-tuned head;
2. estimate the fc7 scale that gives mean norm 20;
3. collect every class's positives (its gt windows, difficult included);
4. stream the images once: each class's candidate negatives (IoU < 0.3, deduplicated by conv5
   window and scale) go to the hard-negative miner, which retrains and evicts as it goes;
5. save the SVMs with the scale folded in, the report, and the manifest.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator

import numpy as np
import torch

from spp_detect.data.proposals import windows_of
from spp_detect.models.features import FeatureSource
from spp_detect.models.head import Head
from spp_detect.ops.spp import dedup_keys
from spp_detect.runtime.artifacts import save_json
from spp_detect.runtime.distributed import Dist
from spp_detect.stages.builders import estimate_scale, load_proposals, load_trained_head, open_split
from spp_detect.stages.context import StageContext, Summary, locked
from spp_detect.stages.manifests import clear_manifest, close_stage
from spp_detect.stages.sharding import per_image
from spp_detect.structures import ImageRecord
from spp_detect.train.svm import SvmParams, mine_and_train, negative_candidates

logger = logging.getLogger(__name__)


class WindowFeatures:
    """fc7 features (R, F) of an image's windows (gt first) at their best scale."""

    def __init__(self, ctx: StageContext, split: str, source: FeatureSource, head: Head):
        self.config, self.run_dir, self.split = ctx.config, ctx.run_dir, split
        self.source, self.head = source, head

    def windows(self, record: ImageRecord) -> tuple[np.ndarray, np.ndarray]:
        return windows_of(record, load_proposals(self.config, self.run_dir, self.split, record))

    def scale_index(self, record: ImageRecord, boxes: np.ndarray) -> torch.Tensor:
        return self.source.scale_index(record, boxes)

    @torch.inference_mode()
    def fc7(self, record: ImageRecord, boxes: np.ndarray, scale_index: torch.Tensor) -> np.ndarray:
        pooled, _ = self.source.pool(record, boxes, scale_index)
        return self.head.features(pooled).float().cpu().numpy()


@locked("train-svm", sharded=True)
def run_train_svm(ctx: StageContext, split: str) -> str:
    """The SVMs of ``split``. Under torchrun every rank computes the fc7 features of its share
    of the images (``distributed.map_in_order``) and rank 0 mines and solves on them in the
    image order of one process, so the SVMs are those of one process."""
    config, run_dir, dist = ctx.config, ctx.run_dir, ctx.dist
    summary = Summary("train-svm")
    # 1. upstream
    records, source = open_split(config, run_dir, split, ctx.limit, ctx.device)
    windows = WindowFeatures(ctx, split, source, load_trained_head(config, run_dir, ctx.device))
    clear_manifest(run_dir.svm_dir)
    # 2. feature scale (on rank 0: a sample of svm.norm_images images)
    scale = 1.0
    if dist.is_main:
        counts = [len(windows.windows(r)[0]) for r in records]
        fc7_of = functools.partial(_fc7_of, records, windows)
        scale = estimate_scale(config.svm, counts, fc7_of, "fc7")
    # 3.-4. positives, then one mining pass
    num_classes = len(config.data.classes)
    positives = _positives(records, windows, num_classes, dist)
    negatives = _negatives(records, windows, num_classes, config.svm.neg_iou, dist)
    if not dist.is_main:
        for _ in negatives:  # computes this rank's images and sends them to rank 0
            pass
        return f"rank {dist.rank}: fc7 of its share of {len(records)} images"
    model = mine_and_train(positives, negatives, _params(config.svm), feature_scale=scale)
    # 5. outputs
    model.save(run_dir.svm_path)
    report = _report(model.report, config.data.classes, scale)
    save_json(run_dir.svm_report_path, report)
    close_stage(
        ctx, "train-svm", split, len(records),
        extra={"classes": list(config.data.classes)}, files=[run_dir.svm_path],
    )  # fmt: skip
    summary.items = len(records)
    trained = sum(not c["skipped"] for c in report["classes"])
    summary.notes.append(f"{trained}/{num_classes} classes trained")
    return summary.line()


def _params(svm) -> SvmParams:
    return SvmParams(
        C=svm.C, pos_weight=svm.pos_weight, intercept_scaling=svm.intercept_scaling,
        tol=svm.tol, hard_thresh=svm.hard_thresh, evict_thresh=svm.evict_thresh,
        retrain_limit=svm.retrain_limit, cache_gib=svm.cache_gib,
    )  # fmt: skip


def _fc7_of(
    records: list[ImageRecord], windows: WindowFeatures, image: int, rows: np.ndarray
) -> torch.Tensor:
    """fc7 (r, F) of the windows ``rows`` of image number ``image``."""
    record = records[image]
    boxes = windows.windows(record)[0][rows]
    return torch.from_numpy(windows.fc7(record, boxes, windows.scale_index(record, boxes)))


def _positives(
    records: list[ImageRecord], windows: WindowFeatures, num_classes: int, dist: Dist
) -> list:
    """K arrays (P_k, F): fc7 of every gt box, difficult included
    (docs/method.md#conventions-and-box-format, docs/method.md#svm-training); empty on the
    ranks other than 0."""
    per_class: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
    with_gt = [record for record in records if len(record.gt_boxes)]

    def gt_fc7(record: ImageRecord) -> tuple[np.ndarray, np.ndarray]:
        gt = record.gt_boxes
        return windows.fc7(record, gt, windows.scale_index(record, gt)), record.gt_labels

    found = per_image(dist, with_gt, windows.source, gt_fc7, desc="svm positives", leave=False)
    for fc7, labels in found:
        for label in range(num_classes):
            per_class[label].append(fc7[labels == label])
    dim = windows.head.fc7.out_features
    return [np.concatenate(p) if p else np.zeros((0, dim), np.float32) for p in per_class]


def _negatives(
    records: list[ImageRecord],
    windows: WindowFeatures,
    num_classes: int,
    neg_iou: float,
    dist: Dist,
) -> Iterator[list[tuple[np.ndarray, np.ndarray]]]:
    """Per image, per class: (fc7 (Q_k, F), window keys (Q_k,)) of its candidate negatives
    (on rank 0 only under torchrun)."""
    geometry = windows.source.geometry

    def candidates_of(record: ImageRecord) -> list[tuple[np.ndarray, np.ndarray]]:
        boxes, _ = windows.windows(record)
        scale_index = windows.scale_index(record, boxes)
        keys = dedup_keys(
            boxes, record.image_hw, windows.source.image_scales(record), scale_index, geometry
        )
        candidates, is_negative = negative_candidates(
            boxes, keys, record.gt_boxes, record.gt_labels, num_classes, neg_iou
        )
        fc7 = windows.fc7(record, boxes[candidates], scale_index[candidates])
        # a class absent from the image has every candidate as a negative: share fc7 rather
        # than copy it per class (20 copies of (2,000, 4,096) floats at VOC's size)
        return [
            (fc7, candidates) if mask.all() else (fc7[mask], candidates[mask])
            for mask in is_negative.T
        ]

    return per_image(dist, records, windows.source, candidates_of, desc="hard-negative mining")


def _report(per_class: list[dict], classes: tuple[str, ...], scale: float) -> dict:
    for entry in per_class:
        entry["class"] = classes[entry["class_index"]]
    return {"feature_scale": scale, "classes": per_class}
