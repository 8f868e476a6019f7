"""Per-class linear SVMs trained with one pass of hard-negative mining
(docs/method.md#svm-training).

Shapes: K classes, F fc7 feature dim, P positives of a class, Q negatives of a class.

The solver is liblinear's dual L1-loss SVC through scikit-learn, with the bias as an extra
feature of value B = ``intercept_scaling`` (so the bias is regularised, as in the original). The
mining loop follows R-CNN/SPP-net ``*_train.m``: a per-class cache of negatives, filled with every
negative of the first image, then with the "hard" negatives of later images; a class is retrained
when its cache grew by more than ``retrain_limit`` and at the last image, and easy negatives are
evicted after each retrain. Only the caches and one image's candidates are held in memory.

Ours, not the original's: the caches of all classes together get a memory budget
(``cache_gib``), i.e. at most :func:`cache_cap` rows per class; a class whose cache outgrows it
is retrained at once and keeps only its hardest negatives.
"""

from __future__ import annotations

import logging
import math
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch

from spp_detect.errors import UserError
from spp_detect.models.linear import SvmModel
from spp_detect.ops.spp import distinct_windows
from spp_detect.train.sampling import class_overlaps

logger = logging.getLogger(__name__)

# Bias given to a class that could not be trained (no positives or no negatives): with a zero
# weight its every score is this, far below any sensible test threshold (−1.5 in
# docs/method.md#test-time-detection), so the class yields no detections and evaluates to AP 0.
# Finite, so arithmetic stays well defined.
SKIPPED_CLASS_BIAS = -1000.0

# liblinear 1.93's iteration cap for the dual solvers (`solve_l2r_l1l2_svc`, max_iter = 1000).
LIBLINEAR_MAX_ITER = 1000

# A cached negative's key packs (image number, window key) into one int64:
# image << WINDOW_BITS | window.
WINDOW_BITS = 32

T = TypeVar("T")


@dataclass(frozen=True)
class SvmParams:
    """Solver and mining settings (the config's `svm` section; defaults and sources live there)."""

    C: float
    pos_weight: float
    intercept_scaling: float
    tol: float
    hard_thresh: float
    evict_thresh: float
    retrain_limit: int
    max_iter: int = LIBLINEAR_MAX_ITER
    cache_gib: float = 3.0  # the config's svm.cache_gib: all classes' negative caches, GiB


def cache_cap(cache_gib: float, num_classes: int, dim: int) -> int:
    """Rows each class's negative cache may hold: ⌊cache_gib · 2³⁰ / (K · F · 4 B)⌋ for K
    classes of float32 features (F,); ``sys.maxsize`` (no cap) for an infinite budget."""
    rows = cache_gib * 2**30 / (num_classes * dim * np.dtype(np.float32).itemsize)
    return sys.maxsize if rows >= sys.maxsize else math.floor(rows)


def pack_keys(image_number: int, windows: np.ndarray) -> np.ndarray:
    """(Q,) int64 keys of an image's windows (Q,): image_number << 32 | window."""
    windows = np.asarray(windows, np.int64).reshape(-1)
    in_range = len(windows) == 0 or (windows.min() >= 0 and windows.max() < 2**WINDOW_BITS)
    if not (in_range and 0 <= image_number < 2 ** (63 - WINDOW_BITS)):
        raise ValueError(f"image {image_number} or window keys out of range for packing")
    return (np.int64(image_number) << WINDOW_BITS) | windows


def unpack_keys(packed: np.ndarray) -> np.ndarray:
    """(Q, 2) (image number, window) rows of packed keys (Q,)."""
    return np.stack([packed >> WINDOW_BITS, packed & (2**WINDOW_BITS - 1)], axis=1)


def fold_feature_scale(
    weight: np.ndarray, bias: np.ndarray, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """A model trained on ``features · scale`` as one that takes the raw features.

    w·(s·x) + b = (s·w)·x + b, so the stored model needs no feature scaling at test time
    (py-faster-rcnn stores SVM weights × feature scale the same way). Any weight shape.
    """
    return (weight * np.float32(scale)).astype(np.float32), np.asarray(bias, dtype=np.float32)


def svm_objective(
    weight: np.ndarray, bias: float, pos: np.ndarray, neg: np.ndarray, params: SvmParams
) -> float:
    """liblinear's primal objective ½‖w‖² + ½(b/B)² + C Σ cost·max(0, 1 − y(w·x + b))
    (docs/method.md#svm-training)."""
    w64 = weight.astype(np.float64)
    pos_hinge = np.maximum(0.0, 1.0 - (pos.astype(np.float64) @ w64 + bias)).sum()
    neg_hinge = np.maximum(0.0, 1.0 + (neg.astype(np.float64) @ w64 + bias)).sum()
    regulariser = 0.5 * (w64 @ w64) + 0.5 * (bias / params.intercept_scaling) ** 2
    return float(regulariser + params.C * (params.pos_weight * pos_hinge + neg_hinge))


def train_linear_svm(
    pos: np.ndarray, neg: np.ndarray, params: SvmParams
) -> tuple[np.ndarray, float, float]:
    """One binary SVM: pos (P, F) and neg (Q, F) float32 → (weight (F,) float32, bias, objective).

    liblinear ``-s 3 -c C -w1 pos_weight -B intercept_scaling -e tol``
    (docs/method.md#svm-training). Both P and Q must be positive (a one-class problem has no SVM).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC

    if len(pos) == 0 or len(neg) == 0:
        raise ValueError(
            f"train_linear_svm needs positives and negatives, got {len(pos)}, {len(neg)}"
        )
    # positives first, as the original; float64 because liblinear takes doubles (scikit-learn
    # would copy float32 into float64, keeping both alive during the solve)
    features = np.concatenate([pos, neg], dtype=np.float64)
    targets = np.concatenate([np.ones(len(pos), np.int64), np.zeros(len(neg), np.int64)])
    svc = LinearSVC(
        loss="hinge",
        dual=True,
        C=params.C,
        class_weight={1: params.pos_weight, 0: 1.0},
        intercept_scaling=params.intercept_scaling,
        tol=params.tol,
        max_iter=params.max_iter,
        random_state=0,  # liblinear shuffles its coordinates; fixed for reproducible runs
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        svc.fit(features, targets)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        logger.debug("liblinear stopped at max_iter=%d before tol=%g", params.max_iter, params.tol)
    weight = svc.coef_[0].astype(np.float32)
    bias = float(svc.intercept_[0])
    return weight, bias, svm_objective(weight, bias, pos, neg, params)


@dataclass
class _ClassCache:
    """One class's training state: its positives, the cached negatives and the current model."""

    positives: np.ndarray  # (P, F) float32
    weight: np.ndarray  # (F,) float32; zero until the first successful training
    bias: float = 0.0
    chunks: list[np.ndarray] = field(default_factory=list)  # cached negatives, (Q_i, F) each
    key_chunks: list[np.ndarray] = field(default_factory=list)  # (Q_i,) their packed keys
    # every cached key, sorted (Q,) int64: the membership test, 8 B a negative
    sorted_keys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    num_added: int = 0  # negatives added since the last retrain
    retrains: int = 0
    capped: int = 0  # negatives dropped by the cache cap
    objective: float = float("nan")
    seconds: float = 0.0

    @property
    def size(self) -> int:
        """Number of cached negatives."""
        return len(self.sorted_keys)

    def negatives(self) -> tuple[np.ndarray, np.ndarray]:
        """All cached negatives (Q, F) and their packed keys (Q,), merged into one chunk."""
        if len(self.chunks) != 1:
            dim = self.positives.shape[1]
            self.chunks = [
                np.concatenate(self.chunks) if self.chunks else np.zeros((0, dim), np.float32)
            ]
            self.key_chunks = [
                np.concatenate(self.key_chunks) if self.key_chunks else np.zeros(0, np.int64)
            ]
        return self.chunks[0], self.key_chunks[0]

    def add(self, features: np.ndarray, keys: np.ndarray) -> None:
        """Cache negatives (Q, F) with packed keys (Q,) that are not cached yet (the first of
        repeats), in their order."""
        unique, first = np.unique(keys, return_index=True)  # sorted keys, first occurrences
        if len(self.sorted_keys):
            at = np.searchsorted(self.sorted_keys, unique)
            cached = self.sorted_keys[np.minimum(at, len(self.sorted_keys) - 1)] == unique
            unique, first = unique[~cached], first[~cached]
        if len(first) == 0:
            return
        fresh = np.sort(first)
        self.chunks.append(features[fresh])
        self.key_chunks.append(keys[fresh])
        self.num_added += len(fresh)
        if len(self.sorted_keys) and unique[0] < self.sorted_keys[-1]:
            self.sorted_keys = np.sort(np.concatenate([self.sorted_keys, unique]))
        else:  # the usual case: a new image's keys follow every cached one
            self.sorted_keys = np.concatenate([self.sorted_keys, unique])

    def retrain(self, params: SvmParams, cap: int = sys.maxsize) -> int:
        """Train on the positives and the cache, evict the easy negatives and, if more than
        ``cap`` are left, keep the hardest ``cap − min(retrain_limit, cap // 2)``
        (docs/method.md#svm-training). Returns the number dropped by the cap."""
        negatives, keys = self.negatives()
        self.num_added = 0
        if len(negatives) == 0:
            return 0  # nothing to train against yet; scores stay 0, so every negative is mined
        start = time.perf_counter()
        self.weight, self.bias, self.objective = train_linear_svm(self.positives, negatives, params)
        self.seconds += time.perf_counter() - start
        self.retrains += 1
        scores = negatives @ self.weight + self.bias
        keep = scores >= params.evict_thresh
        dropped = 0
        if keep.sum() > cap:
            # Room for the next retrain_limit negatives, so that a capped class is not retrained
            # at every image (each solve takes seconds at F = 4,096).
            kept = cap - min(params.retrain_limit, cap // 2)
            hardest = np.argsort(-scores, kind="stable")[:kept]  # ties: the earlier cached
            dropped = int(keep.sum()) - kept
            keep = np.zeros(len(scores), bool)
            keep[hardest] = True
        self.capped += dropped
        self.chunks, self.key_chunks = [negatives[keep]], [keys[keep]]
        self.sorted_keys = np.sort(keys[keep])
        return dropped


def _with_last(items: Iterable[T]) -> Iterator[tuple[T, bool]]:
    """Each item with a flag that is True for the last one (one item of look-ahead)."""
    iterator = iter(items)
    try:
        current = next(iterator)
    except StopIteration:
        return
    for following in iterator:
        yield current, False
        current = following
    yield current, True


class HardNegativeMiner:
    """K per-class caches fed one image at a time; :meth:`model` gives the trained SVMs
    (docs/method.md#svm-training).

    positives: K arrays (P_k, F), the gt features of each class.
    feature_scale: every feature is multiplied by it before training (20 / mean norm,
        docs/method.md#svm-training);
        :meth:`model` folds it in, so the result scores the raw features.
    Each class's cache holds at most ``cap`` = :func:`cache_cap` rows after a retrain, and at
    most one image's negatives more between retrains.
    """

    def __init__(
        self, positives: Sequence[np.ndarray], params: SvmParams, feature_scale: float = 1.0
    ):
        self.params = params
        self.feature_scale = feature_scale
        self.num_images = 0
        dim = positives[0].shape[1]
        self.cap = cache_cap(params.cache_gib, len(positives), dim)
        if self.cap < 1:
            raise UserError(
                f"svm.cache_gib = {params.cache_gib:g} GiB holds less than one negative per class "
                f"({len(positives)} classes × {dim} float32 features); raise it"
            )
        scale = np.float32(feature_scale)
        self.caches = [
            _ClassCache(
                positives=np.asarray(p, np.float32) * scale, weight=np.zeros(dim, np.float32)
            )
            for p in positives
        ]
        for label, cache in enumerate(self.caches):
            if len(cache.positives) == 0:
                logger.warning("class %d has no positives; it is not trained (AP 0)", label)

    def add_image(self, negatives: Sequence[tuple[np.ndarray, np.ndarray]], is_last: bool) -> None:
        """Mine one image: K pairs (features (Q_k, F), window keys (Q_k,) int) of candidates.

        A class is (re)trained after its first image with negatives (the original trains every
        class after the first image), whenever more than ``retrain_limit`` negatives were added
        since its last retrain or its cache holds more than ``cap`` (ours), and at the last
        image.
        """
        if len(negatives) != len(self.caches):
            raise ValueError(f"negatives for {len(negatives)} classes, need {len(self.caches)}")
        scale = np.float32(self.feature_scale)
        for label, (cache, (features, keys)) in enumerate(zip(self.caches, negatives, strict=True)):
            if len(cache.positives) == 0:
                continue
            _mine_image(
                cache, self.num_images, np.asarray(features, np.float32) * scale, keys, self.params
            )
            untrained = cache.retrains == 0
            grown = cache.num_added > self.params.retrain_limit or cache.size > self.cap
            if untrained or is_last or grown:
                first_bite = cache.capped == 0
                if cache.retrain(self.params, self.cap) and first_bite:
                    logger.info(
                        "class %d: negative cache over its cap of %d (svm.cache_gib = %g GiB over "
                        "%d classes) at image %d; keeping the hardest",
                        label, self.cap, self.params.cache_gib, len(self.caches), self.num_images,
                    )  # fmt: skip
        self.num_images += 1

    def cached_keys(self, label: int) -> np.ndarray:
        """(image number, window key) rows (Q, 2) of class ``label``'s cached negatives."""
        return unpack_keys(self.caches[label].negatives()[1])

    def model(self) -> SvmModel:
        """The current SVMs with the feature scale folded in, and the per-class report.

        A class without positives, or that never saw a negative, is not trained: zero weight,
        bias ``SKIPPED_CLASS_BIAS`` and ``"skipped": true`` in the report.
        """
        weights, biases, report = [], [], []
        for label, cache in enumerate(self.caches):
            skipped = cache.retrains == 0
            if skipped and len(cache.positives):
                logger.warning("class %d saw no negatives; it is not trained (AP 0)", label)
            weights.append(np.zeros_like(cache.weight) if skipped else cache.weight)
            biases.append(SKIPPED_CLASS_BIAS if skipped else cache.bias)
            report.append(
                {
                    "class_index": label,
                    "positives": len(cache.positives),
                    "negatives": len(cache.negatives()[0]),
                    "retrains": cache.retrains,
                    "capped": cache.capped,
                    "objective": None if skipped else cache.objective,
                    "seconds": round(cache.seconds, 3),
                    "skipped": skipped,
                }
            )
        weight, bias = fold_feature_scale(np.stack(weights), np.array(biases), self.feature_scale)
        return SvmModel(weight=weight, bias=bias, report=report)


def _mine_image(
    cache: _ClassCache, image_number: int, features: np.ndarray, keys: np.ndarray, params: SvmParams
) -> None:
    """Cache one image's negatives of a class: all while untrained, else those > hard_thresh.

    The original adds all negatives of the first image; before any training the model is zero
    with bias 0 > hard_thresh, so "all" and "hard" coincide until the class is first trained.
    """
    if len(features) == 0:
        return
    hard = features @ cache.weight + cache.bias > params.hard_thresh
    cache.add(features[hard], pack_keys(image_number, keys)[hard])


def mine_and_train(
    positives: Sequence[np.ndarray],
    negatives_per_image: Iterable[Sequence[tuple[np.ndarray, np.ndarray]]],
    params: SvmParams,
    feature_scale: float = 1.0,
) -> SvmModel:
    """Train K SVMs with one pass of hard-negative mining over the images
    (docs/method.md#svm-training).

    positives: K arrays (P_k, F). negatives_per_image: per image, in image-list order, K pairs
    (features (Q_k, F), window keys (Q_k,) int) of that class's candidate negatives (IoU <
    neg_iou, deduplicated); keys identify a window inside its image. Consumed lazily, one image
    ahead (to know which image is the last). See :class:`HardNegativeMiner`.
    """
    miner = HardNegativeMiner(positives, params, feature_scale)
    for negatives, is_last in _with_last(negatives_per_image):
        miner.add_image(negatives, is_last)
    return miner.model()


def negative_candidates(
    boxes: np.ndarray,
    window_keys: torch.Tensor,
    gt_boxes: np.ndarray,
    gt_labels: np.ndarray,
    num_classes: int,
    neg_iou: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Candidate negatives of one image's windows (R, 4) (docs/method.md#svm-training).

    Windows with equal conv5 keys (R, k) (``spp.dedup_keys``) pool identical features, so only
    the first of each is a candidate; it is a negative of class k when its IoU with every gt of
    that class is below ``neg_iou``. Returns candidates (U,) window indices that are a negative
    of at least one class, and is_negative (U, K) bool.
    """
    first = distinct_windows(window_keys)[0].numpy()
    overlaps = class_overlaps(boxes[first], gt_boxes, gt_labels, num_classes)
    is_negative = overlaps < neg_iou
    useful = is_negative.any(axis=1)
    return first[useful], is_negative[useful]
