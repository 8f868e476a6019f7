"""Feature statistics shared by the SVM and box-regression stages.

Shapes: R windows; D pool5 or F fc7 features, as the caller passes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch


def sample_for_norm(
    window_counts: Sequence[int], max_images: int, max_windows: int, seed: int
) -> list[tuple[int, np.ndarray]]:
    """Which windows estimate the mean feature norm (docs/method.md#svm-training,
    ``spp_feature_stats.m``).

    Up to ``max_images`` random images, up to ``max_windows`` random windows of each.
    Returns (image number, window indices (r,)) pairs in image order.
    """
    rng = np.random.default_rng(seed)
    images = np.sort(rng.permutation(len(window_counts))[:max_images])
    picks = []
    for image in images.tolist():
        count = window_counts[image]
        picks.append((image, np.sort(rng.permutation(count)[:max_windows])))
    return picks


def feature_scale(
    features_of: Callable[[int, np.ndarray], torch.Tensor],
    picks: Sequence[tuple[int, np.ndarray]],
    target_norm: float,
) -> float:
    """``target_norm`` / mean L2 norm of the picked windows' features (R, D) or (R, F)
    (docs/method.md#svm-training).

    ``features_of(image number, window indices)`` computes one image's features.
    """
    total, count = 0.0, 0
    for image, windows in picks:
        if len(windows):
            norms = torch.linalg.vector_norm(features_of(image, windows).double(), dim=1)
            total += float(norms.sum())
            count += len(windows)
    mean_norm = total / max(count, 1)
    return target_norm / mean_norm if mean_norm > 0 else 1.0


def estimate_feature_scale(
    window_counts: Sequence[int],
    features_of: Callable[[int, np.ndarray], torch.Tensor],
    max_images: int,
    max_windows: int,
    seed: int,
    target_norm: float,
) -> float:
    """``target_norm`` / the mean feature norm of a random sample of the windows
    (:func:`sample_for_norm` of the images' ``window_counts``, then :func:`feature_scale`):
    the SVMs' fc7 and the regressors' pool5 scale (docs/method.md#svm-training)."""
    picks = sample_for_norm(window_counts, max_images, max_windows, seed)
    return feature_scale(features_of, picks, target_norm)
