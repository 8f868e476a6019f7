"""The per-class linear models a trained detector applies: the SVMs that score fc7 and the
ridge regressors that move boxes from pool5, saved ready to use (feature scales folded in).
``spp_detect.train.svm`` and ``spp_detect.train.bbox_reg`` fit them.

Shapes: R windows, M detections, K foreground classes, F fc7 dim, D pool5 dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spp_detect.errors import UserError
from spp_detect.ops.boxes import clip_boxes, decode_deltas
from spp_detect.runtime.artifacts import load_npz, save_npz

NUM_DELTAS = 4  # (t_x, t_y, t_w, t_h)


@dataclass(frozen=True)
class SvmModel:
    """Trained SVMs, ready to use: score (R, K) = features (R, F) @ weight.T + bias.

    weight (K, F) float32 and bias (K,) float32 apply to the *unscaled* features (the feature
    scale is folded in); report holds one JSON-ready dict per class.
    """

    weight: np.ndarray
    bias: np.ndarray
    report: list[dict[str, Any]] = field(default_factory=list)

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Scores (R, K) of features (R, F)."""
        return features @ self.weight.T + self.bias

    def save(self, path: str | Path) -> None:
        save_npz(path, weight=self.weight, bias=self.bias)

    @classmethod
    def load(cls, path: str | Path) -> SvmModel:
        arrays = load_npz(path)
        weight, bias = arrays.get("weight"), arrays.get("bias")
        if weight is None or bias is None or weight.ndim != 2 or bias.shape != weight.shape[:1]:
            raise UserError(
                f"{path}: not an SVM file (need weight (K, F), bias (K,)); rerun train-svm"
            )
        return cls(weight.astype(np.float32), bias.astype(np.float32))


@dataclass(frozen=True)
class BoxRegressors:
    """Per-class regressors: deltas (M, 4) = features (M, D) @ weight[label] + bias[label].

    weight (K, D, 4) float32, bias (K, 4) float32; they take the raw (unscaled) features.
    """

    weight: np.ndarray
    bias: np.ndarray

    def __post_init__(self) -> None:
        weight = np.asarray(self.weight, np.float32)
        bias = np.asarray(self.bias, np.float32)
        if (
            weight.ndim != 3
            or weight.shape[2] != NUM_DELTAS
            or bias.shape != (len(weight), NUM_DELTAS)
        ):
            raise ValueError(
                f"need weight (K, D, 4) and bias (K, 4), got {weight.shape}, {bias.shape}"
            )
        object.__setattr__(self, "weight", weight)
        object.__setattr__(self, "bias", bias)

    @classmethod
    def identity(cls, num_classes: int, dim: int) -> BoxRegressors:
        """Regressors that leave every box unchanged (zero deltas)."""
        return cls(np.zeros((num_classes, dim, NUM_DELTAS)), np.zeros((num_classes, NUM_DELTAS)))

    def fold_feature_scale(self, scale: float) -> BoxRegressors:
        """Regressors for raw features from ones trained on features · scale."""
        return BoxRegressors(self.weight * np.float32(scale), self.bias)

    def predict(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Deltas (M, 4) float32 tensor of features (M, D) with labels (M,) in 0 … K−1.

        Accepts tensors (on any device) or arrays; the result lives on the features' device.
        """
        features = torch.as_tensor(features)
        labels = torch.as_tensor(labels, device=features.device)
        deltas = features.new_zeros((len(features), NUM_DELTAS), dtype=torch.float32)
        for label in labels.unique().tolist():
            rows = labels == label
            weight = torch.as_tensor(self.weight[label], device=features.device)
            bias = torch.as_tensor(self.bias[label], device=features.device)
            deltas[rows] = features[rows].float() @ weight + bias
        return deltas

    def apply(
        self,
        boxes: torch.Tensor,
        features: torch.Tensor,
        labels: torch.Tensor,
        image_hw: tuple[int, int],
    ) -> torch.Tensor:
        """Regressed boxes (M, 4), clipped to the image, of windows ``boxes`` (M, 4)
        (docs/method.md#bounding-box-regression)."""
        deltas = self.predict(features, labels)
        boxes = torch.as_tensor(boxes, device=deltas.device)
        return clip_boxes(decode_deltas(boxes, deltas), image_hw)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"weight": self.weight, "bias": self.bias}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> BoxRegressors:
        return cls(arrays["weight"], arrays["bias"])

    def save(self, path: str | Path) -> None:
        save_npz(path, **self.to_arrays())

    @classmethod
    def load(cls, path: str | Path) -> BoxRegressors:
        arrays = load_npz(path)
        try:
            return cls.from_arrays(arrays)
        except (KeyError, ValueError) as exc:
            raise UserError(f"{path}: not a box-regressor file ({exc}); rerun train-bbox") from None
