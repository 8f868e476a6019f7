"""The trained detector: one image's conv5 maps and proposals → detections
(docs/method.md#test-time-detection).

Shapes: R proposals of the image, U distinct conv5 windows among them, D pooled dim, F fc7 dim,
K foreground classes.

Per image: pool5 of every distinct window at its best scale → fc7 → SVM scores (one product for
all classes) or the head's softmax → threshold, NMS, top-k → regression of the kept windows
(reusing their pool5, or the head's box branch on their fc7) → clip and NMS again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from spp_detect.errors import UserError
from spp_detect.models.features import FeatureSource
from spp_detect.models.head import Head, compressed_features
from spp_detect.models.inference import detect_image
from spp_detect.models.linear import BoxRegressors, SvmModel
from spp_detect.ops.boxes import clip_boxes, decode_deltas
from spp_detect.ops.spp import dedup_keys, distinct_windows, inverse_permutation
from spp_detect.runtime.device import autocast, check_precision, to_device
from spp_detect.structures import ImageDetections, ImageRecord


@dataclass(frozen=True)
class DetectionSettings:
    """Test-time settings (docs/method.md#test-time-detection): windows are scored by the
    per-class SVMs or the head's own ``softmax`` (``scorer``); keep windows scoring above
    ``score_thresh``, per-class NMS at ``nms_thresh`` IoU (before and after regression), at most
    ``max_per_class`` per class and image; fc6/fc7 on ``batch_windows`` windows at a time in
    ``precision`` (fp32 | bf16 | fp16), ``fc_compression`` none | svd (to ``svd_ranks`` of fc6
    and fc7) | int8 (``head.compressed_features``)."""

    score_thresh: float
    nms_thresh: float
    max_per_class: int
    batch_windows: int
    precision: str
    scorer: str = "svm"  # svm | softmax
    head_boxes: bool = False  # regress with the head's box branch (the regressors must be None)
    fc_compression: str = "none"
    svd_ranks: tuple[int, int] = (1024, 256)  # fc6, fc7 (Fast R-CNN §3.1)


class TrainedDetector:
    """Everything trained, ready to turn an image's conv5 maps and proposals into detections.

    ``head`` the fine-tuned fc6/fc7 and classifier (eval mode, on ``device``), ``svms`` the
    per-class SVMs (weight (K, F), bias (K,); None with the softmax scorer), ``regressors`` the
    box regressors or None (no regression).
    """

    def __init__(
        self,
        head: Head,
        svms: SvmModel | None,
        regressors: BoxRegressors | None,
        settings: DetectionSettings,
        device: str | torch.device,
    ):
        check_precision(settings.precision, "test.precision")
        self.settings = settings
        self.head = head
        self._fc = self._fc_layers(head, settings, torch.device(device))
        if (svms is None) != (settings.scorer == "softmax"):
            raise ValueError("give svms exactly when the scorer is svm")
        if settings.head_boxes and (regressors is not None or head.bbox is None):
            raise ValueError("head_boxes needs a head with a box branch and no regressors")
        self.svm_weight = self.svm_bias = None
        if svms is not None:
            self.svm_weight = torch.as_tensor(svms.weight, device=device).T.contiguous()  # (F, K)
            self.svm_bias = torch.as_tensor(svms.bias, device=device)
        self.regressors = regressors
        self._workspace = torch.empty(0)  # pooled rows, reused across images

    @staticmethod
    def _fc_layers(head: Head, settings: DetectionSettings, device: torch.device):
        """fc6/fc7 as used at test time: the head's own, or compressed."""
        compression = settings.fc_compression
        if compression == "none":
            return head.features
        if compression == "int8" and device.type != "cpu":
            raise UserError(
                f"test.fc_compression=int8 runs on the CPU only, not {device}; use svd or none"
            )
        return compressed_features(head, compression, settings.svd_ranks)

    @torch.inference_mode()
    def detect(
        self, source: FeatureSource, record: ImageRecord, proposals: np.ndarray
    ) -> ImageDetections:
        """The detections of one image."""
        if len(proposals) == 0:
            return ImageDetections.empty()
        pooled, fc7, inverse = self.window_features(source, record, proposals)
        scores = self.class_scores(fc7)[inverse]
        boxes = torch.as_tensor(proposals, device=scores.device)

        def regress(window_index: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            rows = inverse[window_index]
            if self.settings.head_boxes:
                deltas = self.head.box_deltas(fc7[rows], labels)
                return clip_boxes(decode_deltas(boxes[window_index], deltas), record.image_hw)
            return self.regressors.apply(boxes[window_index], pooled[rows], labels, record.image_hw)

        settings = self.settings
        regresses = self.regressors is not None or settings.head_boxes
        return detect_image(
            scores, boxes, record.image_hw, settings.score_thresh, settings.nms_thresh,
            settings.max_per_class, regress if regresses else None,
        )  # fmt: skip

    def class_scores(self, fc7: torch.Tensor) -> torch.Tensor:
        """Scores (U, K) of windows' fc7 (U, F): SVM margins, or the head's softmax
        probabilities of the K foreground classes (Fast R-CNN)."""
        if self.svm_weight is None:
            return torch.softmax(self.head.cls(fc7), dim=1)[:, :-1]
        return fc7 @ self.svm_weight + self.svm_bias

    def window_features(
        self, source: FeatureSource, record: ImageRecord, proposals: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """pool5 (U, D) and fc7 (U, F) of the U distinct windows, and each window's row (R,).

        Windows with the same conv5 cells at the same scale have the same features
        (docs/method.md#deduplication-of-windows), so each distinct window is pooled and passed
        through fc6/fc7 once. pool5 lives in a workspace that the next call overwrites.
        Everything is planned on the CPU and queued to the device, which is never waited for
        (docs/method.md#gpu-path).
        """
        scale_index = source.scale_index(record, proposals)
        scales = source.image_scales(record)
        keys = dedup_keys(proposals, record.image_hw, scales, scale_index, source.geometry)
        first, inverse = distinct_windows(keys)
        workspace = self._pooled_workspace(len(first), source.feature_dim)
        pooled, rows = source.pool(
            record, proposals[first.numpy()], scale_index[first], out=workspace, keep_order=False
        )
        chunks = pooled.split(self.settings.batch_windows)
        with autocast(pooled.device, self.settings.precision):
            fc7 = torch.cat([self.fc7_features(chunk) for chunk in chunks]).float()
        row_of = inverse_permutation(rows)  # distinct window -> its pooled row
        (window_rows,) = to_device([row_of[inverse]], pooled.device)
        return pooled, fc7, window_rows

    def fc7_features(self, pooled: torch.Tensor) -> torch.Tensor:
        """fc7 (R, F) of pooled windows (R, D), through fc6/fc7 as ``fc_compression`` says."""
        return self._fc(pooled)

    def _pooled_workspace(self, rows: int, dim: int) -> torch.Tensor:
        """A float32 buffer (≥ rows, dim) kept across images: a fresh one per image would pay
        its page faults every time (docs/benchmarks-history.md)."""
        if len(self._workspace) < rows or self._workspace.shape[1:] != (dim,):
            self._workspace = torch.empty((rows, dim), device=self.head.fc6.weight.device)
        return self._workspace
