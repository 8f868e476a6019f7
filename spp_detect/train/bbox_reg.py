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

Memory: the features may be a read-only ``np.memmap`` (train-bbox spills them to disk). When
R ≥ D + 1 they are only ever read ``rows_per_chunk`` rows at a time, so fitting needs one
(D+1)×(D+1) float64 Gram matrix plus a chunk, whatever R is.
"""

from __future__ import annotations

import logging
import mmap
from collections.abc import Iterator

import numpy as np
import torch
from torchvision.ops import box_iou

from spp_detect.models.linear import NUM_DELTAS, BoxRegressors
from spp_detect.ops.boxes import decode_deltas, encode_deltas, paired_iou

logger = logging.getLogger(__name__)


# Largest float64 chunk of feature rows read at once: 2,621 rows at D = 12,800 (ZF-5 pool5).
CHUNK_BYTES = 256 * 2**20

FeatureRows = np.ndarray | torch.Tensor  # (R, D); a np.memmap is read without mapping it in


def rows_per_chunk(dim: int) -> int:
    """Rows of D features whose float64 copy fits in CHUNK_BYTES (at least one)."""
    return max(1, CHUNK_BYTES // (8 * dim))


def read_rows(features: FeatureRows, start: int, stop: int) -> FeatureRows:
    """Rows ``start`` … ``stop`` − 1 (stop − start, D) of features (R, D), in their dtype.

    A memmap's rows are read from its file into a fresh array rather than sliced: pages a slice
    faults in stay mapped, and count in the process's RSS, until the map is closed, so one pass
    over a class's spill (GBs at VOC scale) would grow RSS by the file's size.
    """
    if (
        isinstance(features, np.memmap)
        and isinstance(features.base, mmap.mmap)  # the map itself, so offset is its file's
        and features.flags.c_contiguous
    ):
        width = features.shape[1]
        return np.fromfile(
            features.filename,
            features.dtype,
            count=(stop - start) * width,
            offset=features.offset + start * width * features.itemsize,
        ).reshape(stop - start, width)
    return features[start:stop]


def row_chunks(features: FeatureRows, chunk_rows: int) -> Iterator[tuple[int, FeatureRows]]:
    """(first row, rows (≤ chunk_rows, D)) of features (R, D), in order."""
    for start in range(0, len(features), chunk_rows):
        yield start, read_rows(features, start, min(start + chunk_rows, len(features)))


def as_float64(rows: FeatureRows, scale: float, device: str | torch.device) -> torch.Tensor:
    """rows (N, D) · scale as a new float64 tensor on ``device`` (the input is left alone)."""
    x = torch.as_tensor(rows).to(device=device, dtype=torch.float64, copy=True)
    return x.mul_(scale)


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
    ((D+1)×(D+1)) and the dual (R×R) form; both give the same β. Everything in memory:
    ``scaled_ridge_solve`` uses it for the dual form only and solves the primal one in chunks.
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


def normal_equations(
    features: FeatureRows,
    targets: torch.Tensor,
    feature_scale: float,
    chunk_rows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """AᵀA ((D+1)×(D+1)) and AᵀY ((D+1)×4), float64 on the targets' device, of the design
    A = [X · feature_scale, 1] (R, D+1) and targets Y (R, 4), from features X (R, D) read
    ``chunk_rows`` rows at a time: the same blocks as ``ridge_solve``'s primal form, summed over
    chunks, so no (R, D) float64 copy of X exists.
    """
    num, dim = features.shape
    device = targets.device
    # Accumulated in place: a fresh D×D per chunk would double the largest allocation.
    gram = torch.zeros((dim + 1, dim + 1), dtype=torch.float64, device=device)
    rhs = torch.zeros((dim + 1, targets.shape[1]), dtype=torch.float64, device=device)
    for start, rows in row_chunks(features, chunk_rows):
        _add_chunk(
            gram, rhs, as_float64(rows, feature_scale, device), targets[start : start + len(rows)]
        )
    gram[dim, dim] = num
    return gram, rhs


def _add_chunk(gram: torch.Tensor, rhs: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
    """Add a chunk's terms to AᵀA ((D+1)×(D+1)) and AᵀY ((D+1)×4): x (N, D), y (N, 4).

    (A function so that the chunk is freed on return, before the next one is read.)
    """
    dim = x.shape[1]
    gram[:dim, :dim].addmm_(x.T, x)
    column_sums = x.sum(0)  # 1ᵀX
    gram[:dim, dim] += column_sums
    gram[dim, :dim] += column_sums
    rhs[:dim].addmm_(x.T, y)
    rhs[dim] += y.sum(0)


def solve_in_place(gram: torch.Tensor, rhs: torch.Tensor, ridge_lambda: float) -> torch.Tensor:
    """β (D+1, 4) = (gram + λI)⁻¹ rhs by Cholesky; gram (D+1, D+1), symmetric, is overwritten
    by its factor so that no second (D+1)² matrix is allocated (1.3 GB at D = 12,800)."""
    gram.diagonal().add_(ridge_lambda)
    # LAPACK factors column-major matrices in place; gram is symmetric, so its transposed view
    # is the same matrix in that layout. cholesky_solve would copy the factor; these do not.
    factor = torch.linalg.cholesky(gram.mT, out=gram.mT)
    half = torch.linalg.solve_triangular(factor, rhs, upper=False)
    return torch.linalg.solve_triangular(factor.mT, half, upper=True)


def scaled_ridge_solve(
    features: FeatureRows,
    targets: torch.Tensor,
    ridge_lambda: float,
    feature_scale: float,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """``ridge_solve`` of (features (R, D) · feature_scale, targets (R, 4)): β (D+1, 4) float64
    on the targets' device. The primal form (R ≥ D + 1) reads the features in chunks of
    ``chunk_rows`` (default ``rows_per_chunk(D)``); the dual form loads them whole, as
    R × D < D² bounds that copy."""
    num, dim = features.shape
    if num < dim + 1:
        x = as_float64(read_rows(features, 0, num), feature_scale, targets.device)
        return ridge_solve(x, targets, ridge_lambda)
    gram, rhs = normal_equations(
        features, targets, feature_scale, chunk_rows or rows_per_chunk(dim)
    )
    return solve_in_place(gram, rhs, ridge_lambda)


def fit_box_regressor(
    features: FeatureRows,
    proposals: np.ndarray,
    gt_boxes: np.ndarray,
    ridge_lambda: float,
    whiten_eps: float,
    feature_scale: float = 1.0,
    device: str | torch.device = "cpu",
    chunk_rows: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One class's regressor, ready to use: (weight (D, 4) float32, bias (4,) float32).

    features (R, D) (an array, a tensor or a memmap of a spill) of the windows ``proposals``
    (R, 4), each assigned to ``gt_boxes`` (R, 4). Features are multiplied by ``feature_scale``
    for training (20 / mean norm, docs/method.md#bounding-box-regression) and the scale is
    folded into the weight, so deltas = raw_features @ weight + bias. ``chunk_rows``: see
    ``scaled_ridge_solve``.
    """
    targets = np.asarray(
        encode_deltas(np.asarray(proposals, np.float64), np.asarray(gt_boxes, np.float64))
    )
    mean, whiten, unwhiten = whitening(targets, whiten_eps)
    white = torch.as_tensor((targets - mean) @ whiten, device=torch.device(device))
    beta = scaled_ridge_solve(features, white, ridge_lambda, feature_scale, chunk_rows)
    beta = beta.cpu().numpy() @ unwhiten  # (D+1, 4)
    weight = beta[:-1] * feature_scale
    return weight.astype(np.float32), (beta[-1] + mean).astype(np.float32)


def fit_box_regressors(
    examples: list[tuple[FeatureRows, np.ndarray, np.ndarray]],
    dim: int,
    ridge_lambda: float,
    whiten_eps: float,
    feature_scale: float = 1.0,
    device: str | torch.device = "cpu",
    chunk_rows: int | None = None,
) -> tuple[BoxRegressors, list[dict]]:
    """K regressors from per-class examples (features (R_k, D), proposals (R_k, 4), gt (R_k, 4));
    features may be memmaps (``fit_box_regressor``).

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
            features, proposals, gt_boxes, ridge_lambda, whiten_eps, feature_scale, device,
            chunk_rows,
        )  # fmt: skip
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
    features: FeatureRows,
    boxes: np.ndarray,
    gt_boxes: np.ndarray,
    chunk_rows: int | None = None,
) -> dict:
    """Mean IoU of a class's training windows (E, 4) with their gt (E, 4), before and after
    regression from their features (E, D) (possibly a memmap), read ``chunk_rows`` rows at a
    time (default ``rows_per_chunk(D)``)."""
    if len(boxes) == 0:
        return {"mean_iou_before": None, "mean_iou_after": None}
    deltas = torch.cat(
        [
            regressors.predict(torch.as_tensor(rows).float(), torch.full((len(rows),), label))
            for _, rows in row_chunks(features, chunk_rows or rows_per_chunk(features.shape[1]))
        ]
    )
    regressed = decode_deltas(torch.from_numpy(boxes), deltas)
    gt = torch.from_numpy(gt_boxes)
    before = paired_iou(torch.from_numpy(boxes), gt).mean()
    after = paired_iou(regressed, gt).mean()
    return {"mean_iou_before": round(float(before), 4), "mean_iou_after": round(float(after), 4)}
