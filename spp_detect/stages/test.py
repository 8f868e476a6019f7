"""`spp-detect test`: detections for every image of a split (SPEC §9).

Steps:
1. check the upstream stages; open the features, the head, the SVMs and the regressors;
2. per image: pool5 of every proposal at its best scale → fc7 → SVM scores (one product for
   all classes) → threshold, NMS, top-k → regression of the kept windows (reusing their pool5)
   → clip and NMS again; written as `detections/<split>/<id>.npz`, so a killed run resumes.
   The next image's cached maps are read in a background thread meanwhile;
3. merge them into `detections/<split>.npz` and write the manifest.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from spp_detect.artifacts import (
    clear_manifest,
    load_npz,
    save_npz,
    stored_fingerprint,
    write_manifest,
)
from spp_detect.bbox_reg import BoxRegressors
from spp_detect.config import Config
from spp_detect.features import FeatureSource, prefetching
from spp_detect.head import Head
from spp_detect.inference import detect_image
from spp_detect.precision import autocast, check_precision
from spp_detect.run_dir import RunDir
from spp_detect.spp import dedup_keys, inverse_permutation
from spp_detect.stages.common import (
    StageContext,
    Summary,
    check_classes,
    fingerprint,
    load_proposals,
    load_trained_head,
    open_split,
    require_upstream,
    stage_dir,
)
from spp_detect.structures import Detections, ImageDetections, ImageRecord
from spp_detect.svm import SvmModel
from spp_detect.window_features import distinct_windows


class Detector:
    """Everything trained, ready to turn an image's conv5 maps and proposals into detections."""

    def __init__(
        self,
        config: Config,
        head: Head,
        svms: SvmModel,
        regressors: BoxRegressors | None,
        device: str,
    ):
        check_precision(config.test.precision, "test.precision")
        self.test = config.test
        self.head = head
        self.svm_weight = torch.as_tensor(svms.weight, device=device).T.contiguous()  # (F, K)
        self.svm_bias = torch.as_tensor(svms.bias, device=device)
        self.regressors = regressors
        self._workspace = torch.empty(0)  # pooled rows, reused across images

    @torch.inference_mode()
    def detect(
        self, source: FeatureSource, record: ImageRecord, proposals: np.ndarray
    ) -> ImageDetections:
        """The detections of one image."""
        if len(proposals) == 0:
            return ImageDetections.empty()
        pooled, fc7, inverse = self.window_features(source, record, proposals)
        scores = (fc7 @ self.svm_weight + self.svm_bias)[inverse]
        boxes = torch.as_tensor(proposals, device=scores.device)

        def regress(window_index: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            features = pooled[inverse[window_index]]
            return self.regressors.apply(boxes[window_index], features, labels, record.image_hw)

        test = self.test
        return detect_image(
            scores, boxes, record.image_hw, test.score_thresh, test.nms_thresh,
            test.max_per_class, regress if self.regressors is not None else None,
        )  # fmt: skip

    def window_features(
        self, source: FeatureSource, record: ImageRecord, proposals: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """pool5 (U, D) and fc7 (U, F) of the U distinct windows, and each window's row (R,).

        Windows with the same conv5 cells at the same scale have the same features (SPEC §4
        dedup), so each distinct window is pooled and passed through fc6/fc7 once. pool5 lives
        in a workspace that the next call overwrites.
        """
        scale_index = source.scale_index(record, proposals)
        g = source.geometry
        keys = dedup_keys(
            proposals, record.image_hw, source.image_scales(record), scale_index,
            g.stride, g.offset0, g.offset,
        )  # fmt: skip
        first, inverse = distinct_windows(keys)
        workspace = self._pooled_workspace(len(first), source.feature_dim)
        pooled, rows = source.pool(
            record, proposals[first.numpy()], scale_index[first], out=workspace, keep_order=False
        )
        chunks = pooled.split(self.test.batch_windows)
        with autocast(pooled.device, self.test.precision):
            fc7 = torch.cat([self.head.features(chunk) for chunk in chunks]).float()
        row_of = inverse_permutation(rows)  # distinct window -> its pooled row
        return pooled, fc7, row_of[inverse].to(pooled.device)

    def _pooled_workspace(self, rows: int, dim: int) -> torch.Tensor:
        """A float32 buffer (≥ rows, dim) kept across images: a fresh one per image would cost
        its page faults every time (~40 ms per 2,000 ZF-5 windows on a CPU)."""
        if len(self._workspace) < rows or self._workspace.shape[1:] != (dim,):
            self._workspace = torch.empty((rows, dim), device=self.svm_weight.device)
        return self._workspace


def load_detector(config: Config, run_dir: RunDir, device: str) -> Detector:
    """The trained head, SVMs and (when ``test.bbox_reg``) regressors of a run directory."""
    head = load_trained_head(config, run_dir, device)
    manifest = require_upstream(config, run_dir, "train-svm", config.data.train_split)
    check_classes(manifest, config.data.classes, run_dir.svm_path, "train-svm")
    svms = SvmModel.load(run_dir.svm_path)
    regressors = None
    if config.test.bbox_reg:
        manifest = require_upstream(config, run_dir, "train-bbox", config.data.train_split)
        check_classes(manifest, config.data.classes, run_dir.bbox_path, "train-bbox")
        regressors = BoxRegressors.load(run_dir.bbox_path)
    return Detector(config, head, svms, regressors, device)


def run_test(ctx: StageContext, split: str) -> str:
    config, run_dir = ctx.config, ctx.run_dir
    summary = Summary("test")
    # 1. upstream
    records, source = open_split(config, run_dir, split, ctx.limit, ctx.device)
    detector = load_detector(config, run_dir, ctx.device)
    parts_dir = stage_dir(run_dir, "test", split)
    clear_manifest(parts_dir)
    test_fingerprint = fingerprint(config, "test")
    # 2. per image
    todo = [
        record
        for record in records
        if ctx.force or stored_fingerprint(_part_path(parts_dir, record)) != test_fingerprint
    ]
    progress = dict(desc=f"test {split}", total=len(todo), unit="img")
    for record in tqdm(prefetching(source, todo), **progress):
        proposals = load_proposals(run_dir, split, record.image_id)
        found = detector.detect(source, record, proposals)
        save_npz(
            _part_path(parts_dir, record), boxes=found.boxes, scores=found.scores,
            labels=found.labels, fingerprint=np.str_(test_fingerprint),
        )  # fmt: skip
        summary.items += 1
    # 3. merge
    detections = _merge(records, parts_dir)
    save_npz(run_dir.detections_path(split), **detections.to_arrays())
    write_manifest(
        parts_dir, "test", split, len(records), test_fingerprint,
        extra={"classes": list(config.data.classes), "detections": len(detections)},
    )  # fmt: skip
    summary.notes.append(f"{len(detections)} detections on {len(records)} images")
    return summary.line()


def _part_path(parts_dir: Path, record: ImageRecord) -> Path:
    return parts_dir / f"{record.image_id}.npz"


def _merge(records: list[ImageRecord], parts_dir: Path) -> Detections:
    per_image = []
    for record in records:
        part = load_npz(_part_path(parts_dir, record))
        per_image.append(
            ImageDetections(boxes=part["boxes"].reshape(-1, 4), scores=part["scores"],
                            labels=part["labels"])
        )  # fmt: skip
    return Detections.from_images([r.image_id for r in records], per_image)
