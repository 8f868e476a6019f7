"""Fine-tuning windows: labels by IoU and window-centric minibatches
(docs/method.md#fine-tuning-and-sampling).

Shapes: R windows (of an image, or of the split in a ``WindowPool``), G gt boxes, K foreground
classes, N images (a flipped copy counts as one), I iterations of a block, B windows per
minibatch, S scales.
Labels: foreground classes 0 … K−1, background K, ``IGNORE`` for windows that are not used.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import box_iou

from spp_detect.ops.boxes import encode_deltas, flip_boxes
from spp_detect.structures import ImageRecord

logger = logging.getLogger(__name__)

IGNORE = -1  # overlap below bg_thresh_lo: never sampled (docs/method.md#fine-tuning-and-sampling)


def class_overlaps(
    boxes: np.ndarray, gt_boxes: np.ndarray, gt_labels: np.ndarray, num_classes: int
) -> np.ndarray:
    """(R, K) float32: IoU of each window with the best gt box of each class (0 without one)."""
    overlaps = np.zeros((num_classes, len(boxes)), dtype=np.float32)
    if len(boxes) and len(gt_boxes):
        iou = box_iou(torch.as_tensor(gt_boxes), torch.as_tensor(boxes)).numpy()  # (G, R)
        np.maximum.at(overlaps, np.asarray(gt_labels, dtype=np.int64), iou)
    return overlaps.T


def window_labels(
    overlaps: np.ndarray, fg_thresh: float, bg_thresh_lo: float, bg_thresh_hi: float
) -> np.ndarray:
    """(R,) int64 training labels of windows with class overlaps (R, K)
    (docs/method.md#fine-tuning-and-sampling).

    The window's overlap is its best class overlap and its class the argmax: foreground when the
    overlap is ≥ ``fg_thresh``, background K when in [``bg_thresh_lo``, ``bg_thresh_hi``),
    ``IGNORE`` otherwise.
    """
    num_windows, num_classes = overlaps.shape
    labels = np.full(num_windows, IGNORE, dtype=np.int64)
    if num_windows == 0:
        return labels
    best = overlaps.max(axis=1) if num_classes else np.zeros(num_windows, np.float32)
    labels[(best >= bg_thresh_lo) & (best < bg_thresh_hi)] = num_classes
    foreground = best >= fg_thresh
    labels[foreground] = overlaps[foreground].argmax(axis=1)
    return labels


@dataclass(frozen=True)
class WindowPool:
    """The labelled training windows of a split (fg and bg only).

    ``entry_image`` (N,) int64 indexes the split's records, ``entry_flipped`` (N,) bool marks
    flipped copies; ``window_entry`` (R,) int64, ``boxes`` (R, 4) float32 in the entry's own
    (possibly flipped) image and ``labels`` (R,) int64 describe the R windows of the split;
    ``box_targets`` (R, 4) are a foreground window's regression targets
    (``boxes.encode_deltas`` to its class's best-overlapping gt box), zeros for background.
    """

    entry_image: np.ndarray
    entry_flipped: np.ndarray
    window_entry: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    num_classes: int
    box_targets: np.ndarray  # (R, 4) float32 deltas to the assigned gt (fg), zeros (bg)

    @property
    def fg_index(self) -> np.ndarray:
        return np.flatnonzero(self.labels < self.num_classes)

    @property
    def bg_index(self) -> np.ndarray:
        return np.flatnonzero(self.labels == self.num_classes)

    def class_counts(self) -> np.ndarray:
        """(K + 1,) windows per label, background last."""
        return np.bincount(self.labels, minlength=self.num_classes + 1)


def build_window_pool(
    records: Sequence[ImageRecord],
    proposals: Sequence[np.ndarray],
    num_classes: int,
    fg_thresh: float,
    bg_thresh_lo: float,
    bg_thresh_hi: float,
    flip: bool = False,
) -> WindowPool:
    """Label every window (gt boxes first, then proposals) of every image; keep fg and bg.

    With ``flip`` each image also appears flipped horizontally, its windows flipped with it
    (IoU, hence the labels, are unchanged by the flip).
    """
    entry_image, entry_flipped, window_entry, all_boxes, all_labels = [], [], [], [], []
    all_targets = []
    for index, (record, image_proposals) in enumerate(zip(records, proposals, strict=True)):
        boxes = np.concatenate([record.gt_boxes, image_proposals]).astype(np.float32, copy=False)
        overlaps = class_overlaps(boxes, record.gt_boxes, record.gt_labels, num_classes)
        labels = window_labels(overlaps, fg_thresh, bg_thresh_lo, bg_thresh_hi)
        used = labels != IGNORE
        gt_of = _assigned_gt(boxes[used], record.gt_boxes, record.gt_labels, labels[used])
        copies = [(boxes[used], record.gt_boxes, False)]
        if flip:
            flipped_gt = flip_boxes(record.gt_boxes, record.width)
            copies.append((flip_boxes(boxes[used], record.width), flipped_gt, True))
        for copy_boxes, copy_gt, flipped in copies:
            window_entry.append(np.full(int(used.sum()), len(entry_image), dtype=np.int64))
            entry_image.append(index)
            entry_flipped.append(flipped)
            all_boxes.append(np.asarray(copy_boxes, dtype=np.float32).reshape(-1, 4))
            all_labels.append(labels[used])
            all_targets.append(_box_targets(all_boxes[-1], copy_gt, gt_of))
    return WindowPool(
        entry_image=np.asarray(entry_image, dtype=np.int64),
        entry_flipped=np.asarray(entry_flipped, dtype=bool),
        window_entry=_concat(window_entry, np.int64, (0,)),
        boxes=_concat(all_boxes, np.float32, (0, 4)),
        labels=_concat(all_labels, np.int64, (0,)),
        num_classes=num_classes,
        box_targets=_concat(all_targets, np.float32, (0, 4)),
    )


def _assigned_gt(
    boxes: np.ndarray, gt_boxes: np.ndarray, gt_labels: np.ndarray, labels: np.ndarray
) -> np.ndarray:
    """(R,) int64: the gt box of each window's own class it overlaps most (−1 for background or
    a class without gt)."""
    assigned = np.full(len(boxes), -1, dtype=np.int64)
    if len(boxes) == 0 or len(gt_boxes) == 0:
        return assigned
    iou = box_iou(torch.as_tensor(boxes), torch.as_tensor(gt_boxes)).numpy()  # (R, G)
    same_class = np.asarray(gt_labels)[None, :] == labels[:, None]
    iou = np.where(same_class, iou, -1.0)
    has_gt = same_class.any(axis=1)
    assigned[has_gt] = iou[has_gt].argmax(axis=1)
    return assigned


def _box_targets(boxes: np.ndarray, gt_boxes: np.ndarray, gt_of: np.ndarray) -> np.ndarray:
    """(R, 4) float32 deltas from each window to its assigned gt box, zeros where none."""
    targets = np.zeros((len(boxes), 4), dtype=np.float32)
    rows = np.flatnonzero(gt_of >= 0)
    if len(rows):
        targets[rows] = encode_deltas(boxes[rows], gt_boxes[gt_of[rows]])
    return targets


def _concat(parts: list[np.ndarray], dtype: type, empty_shape: tuple[int, ...]) -> np.ndarray:
    return (
        np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(empty_shape, dtype)
    )


def minibatch_split(batch_size: int, fg_fraction: float, pool: WindowPool) -> tuple[int, int]:
    """(fg, bg) windows per minibatch: round(fraction · size) fg (32 of 128,
    docs/method.md#fine-tuning-and-sampling).

    A pool without foreground (or background) fills whole minibatches with the other kind.
    """
    num_fg = round(fg_fraction * batch_size)
    if len(pool.fg_index) == 0:
        num_fg = 0
    elif len(pool.bg_index) == 0:
        num_fg = batch_size
    return num_fg, batch_size - num_fg


def warn_missing_classes(pool: WindowPool, class_names: Sequence[str]) -> list[str]:
    """Log a warning for each class without foreground windows; return their names."""
    counts = pool.class_counts()
    missing = [name for name, count in zip(class_names, counts[:-1], strict=True) if count == 0]
    for name in missing:
        logger.warning("class %r has no foreground windows in the training split", name)
    if counts[-1] == 0:
        logger.warning("no background windows: every minibatch is foreground only")
    return missing


@dataclass(frozen=True)
class Block:
    """The minibatches of I consecutive iterations, B windows each.

    ``window_index`` (I, B) int64 indexes the pool, each row [fg | bg]; ``scale_index``
    (I, B) int64 is the scale each window is pooled at.
    """

    window_index: np.ndarray
    scale_index: np.ndarray

    def __len__(self) -> int:
        return len(self.window_index)


def block_rng(seed: int, block: int) -> np.random.Generator:
    """The RNG of one block, a pure function of (seed, block), so a resumed run redraws it."""
    return np.random.default_rng([seed, block])


def sample_block(
    pool: WindowPool,
    block: int,
    block_iterations: int,
    batch_size: int,
    fg_fraction: float,
    num_scales: int,
    seed: int,
) -> Block:
    """Window-centric minibatches for iterations [block·I, (block+1)·I)
    (docs/method.md#fine-tuning-and-sampling), I = ``block_iterations``.

    Draws I·fg foreground and I·bg background windows uniformly over the whole split without
    replacement (cycling through fresh permutations when the pool is smaller), each at a
    uniformly random scale, then cuts them into I minibatches of [fg | bg].
    """
    num_fg, num_bg = minibatch_split(batch_size, fg_fraction, pool)
    rng = block_rng(seed, block)
    fg = _draw(rng, pool.fg_index, block_iterations * num_fg).reshape(block_iterations, num_fg)
    bg = _draw(rng, pool.bg_index, block_iterations * num_bg).reshape(block_iterations, num_bg)
    window_index = np.concatenate([fg, bg], axis=1)
    scale_index = rng.integers(0, num_scales, size=window_index.shape, dtype=np.int64)
    return Block(window_index=window_index, scale_index=scale_index)


def _draw(rng: np.random.Generator, candidates: np.ndarray, count: int) -> np.ndarray:
    """``count`` candidates, uniformly without replacement, repeating permutations if short."""
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    if len(candidates) == 0:
        raise ValueError("no candidate windows to draw from")
    rounds = -(-count // len(candidates))
    order = np.concatenate([rng.permutation(len(candidates)) for _ in range(rounds)])[:count]
    return candidates[order]


def sample_eval_windows(
    pool: WindowPool, num_batches: int, batch_size: int, fg_fraction: float, seed: int
) -> np.ndarray:
    """Window indices for a held-out accuracy: up to ``num_batches`` minibatches' worth drawn
    the training way (docs/method.md#fine-tuning-and-sampling: 500 minibatches, best scale),
    without replacement.

    When the pool is too small for one minibatch at the training fraction, all its windows.
    """
    num_fg, num_bg = minibatch_split(batch_size, fg_fraction, pool)
    fg, bg = pool.fg_index, pool.bg_index
    limits = [num_batches]
    limits += [len(fg) // num_fg] if num_fg else []
    limits += [len(bg) // num_bg] if num_bg else []
    count = min(limits)
    if count == 0:
        return np.sort(np.concatenate([fg, bg]))
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(fg, count * num_fg, replace=False)] if num_fg else []
    chosen += [rng.choice(bg, count * num_bg, replace=False)] if num_bg else []
    return np.sort(np.concatenate(chosen))


def group_by_entry(window_index: np.ndarray, pool: WindowPool) -> list[tuple[int, np.ndarray]]:
    """(entry, positions) pairs: the positions in ``window_index`` (flat) of each entry's windows,
    so each image's feature maps are read once per block."""
    flat = window_index.reshape(-1)
    entries = pool.window_entry[flat]
    order = np.argsort(entries, kind="stable")
    bounds = np.flatnonzero(np.diff(entries[order])) + 1
    return [(int(entries[part[0]]), part) for part in np.split(order, bounds) if len(part)]
