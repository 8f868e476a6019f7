"""Class-specific bounding-box regression: whitened ridge regression on pool5
(docs/method.md#bounding-box-regression).

Shapes: R training windows of a class, M windows to regress, K classes, D pool5 feature dim.

Each class maps features x (D,) to deltas t (4,) (boxes.encode_deltas). Training whitens the
targets, solves ridge regression with an appended constant-1 feature (regularised like the
others, λ = ``ridge_lambda``), and folds the un-whitening and the target mean back into the
weights, so the stored model is simply deltas = x @ W + b
(docs/contracts.md#saved-models-are-ready-to-use).

Note: because the four outputs share one Gram matrix and one λ, ridge regression is equivariant
to the invertible whitening map T, so the folded model equals ridge on the centred targets; the
whitening is kept because the original does it and it costs nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import box_iou

from spp_detect.artifacts import load_npz, save_npz
from spp_detect.boxes import clip_boxes, decode_deltas, encode_deltas, paired_iou
from spp_detect.errors import UserError

logger = logging.getLogger(__name__)

NUM_DELTAS = 4  # (t_x, t_y, t_w, t_h)


def whitening(targets: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean μ (4,), whitening T (4, 4) and its inverse (4, 4) of targets (R, 4)
    (docs/method.md#bounding-box-regression).

    S = tᶜᵀtᶜ/R = V diag(d) Vᵀ; T = V diag(1/√(d+eps)) Vᵀ; T⁻¹ = V diag(√(d+eps)) Vᵀ.
    """
    targets = targets.astype(np.float64)
    mean = targets.mean(axis=0)
    centred = targets - mean
    eigenvalues, vectors = np.linalg.eigh(centred.T @ centred / len(targets))
    root = np.sqrt(np.maximum(eigenvalues, 0.0) + eps)
    return mean, (vectors / root) @ vectors.T, (vectors * root) @ vectors.T


def ridge_solve(features: torch.Tensor, targets: torch.Tensor, ridge_lambda: float) -> torch.Tensor:
    """β (D+1, 4) minimising ‖[X, 1] β − Y‖² + λ‖β‖² (the bias row regularised too), float64.

    features (R, D) and targets (R, 4) float64. Solved by Cholesky in the cheaper of the primal
    ((D+1)×(D+1)) and the dual (R×R) form; both give the same β.
    """
    num, dim = features.shape
    if num < dim + 1:  # dual: β = Aᵀ(AAᵀ + λI)⁻¹Y, with AAᵀ = XXᵀ + 1
        gram = features @ features.T + 1.0
        gram.diagonal().add_(ridge_lambda)
        alpha = torch.cholesky_solve(targets, torch.linalg.cholesky(gram))
        return torch.cat([features.T @ alpha, alpha.sum(0, keepdim=True)])
    # primal: β = (AᵀA + λI)⁻¹AᵀY, AᵀA assembled from blocks so A is never materialised
    column_sums = features.sum(0, keepdim=True)  # 1ᵀX
    gram = features.new_empty((dim + 1, dim + 1))
    gram[:dim, :dim] = features.T @ features
    gram[:dim, dim:] = column_sums.T
    gram[dim:, :dim] = column_sums
    gram[dim, dim] = num
    gram.diagonal().add_(ridge_lambda)
    rhs = torch.cat([features.T @ targets, targets.sum(0, keepdim=True)])
    return torch.cholesky_solve(rhs, torch.linalg.cholesky(gram))


def fit_box_regressor(
    features: np.ndarray | torch.Tensor,
    proposals: np.ndarray,
    gt_boxes: np.ndarray,
    ridge_lambda: float,
    whiten_eps: float,
    feature_scale: float = 1.0,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """One class's regressor, ready to use: (weight (D, 4) float32, bias (4,) float32).

    features (R, D) of the windows ``proposals`` (R, 4), each assigned to ``gt_boxes`` (R, 4).
    Features are multiplied by ``feature_scale`` for training (20 / mean norm,
    docs/method.md#bounding-box-regression) and the scale is folded into the weight, so
    deltas = raw_features @ weight + bias.
    """
    targets = np.asarray(
        encode_deltas(np.asarray(proposals, np.float64), np.asarray(gt_boxes, np.float64))
    )
    mean, whiten, unwhiten = whitening(targets, whiten_eps)
    x = torch.as_tensor(features).to(device=device, dtype=torch.float64, copy=True)
    x.mul_(feature_scale)
    white = torch.as_tensor((targets - mean) @ whiten, device=x.device)
    beta = ridge_solve(x, white, ridge_lambda).cpu().numpy() @ unwhiten  # (D+1, 4)
    weight = beta[:-1] * feature_scale
    return weight.astype(np.float32), (beta[-1] + mean).astype(np.float32)


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


def fit_box_regressors(
    examples: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    dim: int,
    ridge_lambda: float,
    whiten_eps: float,
    feature_scale: float = 1.0,
    device: str | torch.device = "cpu",
) -> tuple[BoxRegressors, list[dict]]:
    """K regressors from per-class examples (features (R_k, D), proposals (R_k, 4), gt (R_k, 4)).

    A class without examples gets the identity regressor (zero weight and bias) and a warning.
    Returns the regressors and a JSON-ready report per class.
    """
    weights = np.zeros((len(examples), dim, NUM_DELTAS), np.float32)
    biases = np.zeros((len(examples), NUM_DELTAS), np.float32)
    report = []
    for label, (features, proposals, gt_boxes) in enumerate(examples):
        report.append(
            {"class_index": label, "examples": len(features), "skipped": not len(features)}
        )
        if len(features) == 0:
            logger.warning(
                "class %d has no regression examples; its boxes are left unchanged", label
            )
            continue
        weights[label], biases[label] = fit_box_regressor(
            features, proposals, gt_boxes, ridge_lambda, whiten_eps, feature_scale, device
        )
    return BoxRegressors(weights, biases), report


def regression_examples(
    boxes: np.ndarray, gt_boxes: np.ndarray, min_iou: float
) -> tuple[np.ndarray, np.ndarray]:
    """The windows (R, 4) of one image that train a regressor
    (docs/method.md#bounding-box-regression).

    A window is an example when its best IoU with a gt box (G, 4) is strictly above
    ``min_iou``; it regresses towards that gt. Returns rows (E,) into ``boxes`` and the
    assigned gt index (E,) of each.
    """
    if len(gt_boxes) == 0 or len(boxes) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    best_iou, best_gt = box_iou(torch.from_numpy(boxes), torch.from_numpy(gt_boxes)).max(dim=1)
    rows = np.flatnonzero((best_iou > min_iou).numpy())
    return rows, best_gt.numpy()[rows]


def mean_iou_before_after(
    regressors: BoxRegressors,
    label: int,
    features: np.ndarray,
    boxes: np.ndarray,
    gt_boxes: np.ndarray,
) -> dict:
    """Mean IoU of a class's training windows (E, 4) with their gt (E, 4), before and after
    regression from their features (E, D)."""
    if len(boxes) == 0:
        return {"mean_iou_before": None, "mean_iou_after": None}
    labels = torch.full((len(boxes),), label)
    deltas = regressors.predict(torch.from_numpy(features).float(), labels)
    regressed = decode_deltas(torch.from_numpy(boxes), deltas)
    gt = torch.from_numpy(gt_boxes)
    before = paired_iou(torch.from_numpy(boxes), gt).mean()
    after = paired_iou(regressed, gt).mean()
    return {"mean_iou_before": round(float(before), 4), "mean_iou_after": round(float(after), 4)}
