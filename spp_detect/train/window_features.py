"""Feature statistics shared by the SVM and box-regression stages.

Shapes: R windows; D pool5 or F fc7 features, as the caller passes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from spp_detect.ops.spp import inverse_permutation


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


def distinct_windows(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows that pool identical features share a key row (R, k); compute each one once.

    Returns first (U,), the index of the first window of each distinct key in window order, and
    inverse (R,), the position of each window's key in ``first``: ``x[first][inverse]`` equals
    ``x`` for any per-window quantity that is a function of the key.
    """
    _, inverse = torch.unique(keys, dim=0, return_inverse=True)
    count = int(inverse.max()) + 1 if len(inverse) else 0
    position = torch.arange(len(inverse), device=inverse.device)
    first = torch.full((count,), len(inverse), dtype=torch.long, device=inverse.device)
    first.scatter_reduce_(0, inverse, position, reduce="amin")
    order = torch.argsort(first)  # distinct windows in the order they first appear
    return first[order], inverse_permutation(order)[inverse]
