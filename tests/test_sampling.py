"""Window labels by IoU and window-centric minibatches (docs/method.md#fine-tuning-and-sampling)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from spp_detect.structures import ImageRecord
from spp_detect.train.sampling import (
    IGNORE,
    build_window_pool,
    class_overlaps,
    group_by_entry,
    minibatch_split,
    sample_block,
    sample_eval_windows,
    warn_missing_classes,
    window_labels,
)


def _record(image_id: str, boxes, labels, width: int = 200, height: int = 100) -> ImageRecord:
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    return ImageRecord(
        image_id=image_id,
        path=Path(f"{image_id}.jpg"),
        height=height,
        width=width,
        gt_boxes=boxes,
        gt_labels=np.asarray(labels, dtype=np.int64),
        difficult=np.zeros(len(boxes), dtype=bool),
    )


def _box_with_iou(iou: float) -> list[float]:
    """A box [0, 0, w, 10] whose IoU with [0, 0, 10, 10] is ``iou`` (w = 10·iou)."""
    return [0.0, 0.0, 10.0 * iou, 10.0]


def test_class_overlaps_hand_case():
    gt = np.array([[0, 0, 10, 10], [20, 0, 30, 10], [0, 0, 5, 10]], dtype=np.float32)
    gt_labels = np.array([1, 1, 0])
    boxes = np.array([[0, 0, 10, 10], [25, 0, 35, 10], [50, 50, 60, 60]], dtype=np.float32)
    overlaps = class_overlaps(boxes, gt, gt_labels, num_classes=3)
    expected = np.array([[0.5, 1.0, 0.0], [0.0, 5 / 15, 0.0], [0.0, 0.0, 0.0]], np.float32)
    np.testing.assert_allclose(overlaps, expected, rtol=1e-6)
    assert class_overlaps(boxes, np.zeros((0, 4), np.float32), np.zeros(0), 3).shape == (3, 3)


def test_window_label_thresholds():
    gt = np.array([[0, 0, 10, 10]], dtype=np.float32)
    ious = [1.0, 0.5, 0.49, 0.1, 0.09, 0.0]
    boxes = np.array([_box_with_iou(v) if v else [50, 50, 60, 60] for v in ious], np.float32)
    overlaps = class_overlaps(boxes, gt, np.array([2]), num_classes=3)
    labels = window_labels(overlaps, fg_thresh=0.5, bg_thresh_lo=0.1, bg_thresh_hi=0.5)
    assert labels.tolist() == [2, 2, 3, 3, IGNORE, IGNORE]
    # bg_thresh_lo = 0 turns windows touching nothing into background
    labels = window_labels(overlaps, fg_thresh=0.5, bg_thresh_lo=0.0, bg_thresh_hi=0.5)
    assert labels.tolist() == [2, 2, 3, 3, 3, 3]


def test_window_label_is_argmax_class():
    gt = np.array([[0, 0, 10, 10], [0, 0, 8, 10]], dtype=np.float32)
    overlaps = class_overlaps(
        np.array([[0, 0, 9, 10], [0, 0, 7, 10]], np.float32), gt, np.array([0, 1]), 2
    )
    labels = window_labels(overlaps, 0.5, 0.1, 0.5)
    # [0, 0, 9, 10]: class 0 IoU 0.9 beats class 1's 0.889; [0, 0, 7, 10]: 0.7 loses to 0.875
    assert labels.tolist() == [0, 1]


def test_pool_gt_first_flip_and_empty_image():
    records = [
        _record("a", [[10, 10, 60, 60]], [0], width=200),
        _record("empty", np.zeros((0, 4)), [], width=120),
    ]
    proposals = [
        np.array([[12, 10, 60, 60], [40, 10, 90, 60], [150, 80, 190, 99]], np.float32),
        np.array([[0, 0, 50, 50]], np.float32),
    ]
    pool = build_window_pool(records, proposals, 2, 0.5, 0.1, 0.5, flip=True)
    # image a: gt (fg), proposal 1 (fg, IoU 0.96), proposal 2 (IoU 0.25, bg), proposal 3 unused
    assert pool.labels.tolist() == [0, 0, 2, 0, 0, 2]
    assert pool.entry_image.tolist() == [0, 0, 1, 1]
    assert pool.entry_flipped.tolist() == [False, True, False, True]
    assert pool.window_entry.tolist() == [0, 0, 0, 1, 1, 1]
    np.testing.assert_array_equal(pool.boxes[0], [10, 10, 60, 60])
    np.testing.assert_array_equal(pool.boxes[3], [140, 10, 190, 60])  # x' = W − x
    assert pool.fg_index.tolist() == [0, 1, 3, 4]
    assert pool.bg_index.tolist() == [2, 5]
    assert pool.class_counts().tolist() == [4, 0, 2]


def test_warn_missing_class(caplog):
    pool = build_window_pool(
        [_record("a", [[10, 10, 60, 60]], [0])], [np.zeros((0, 4), np.float32)], 2, 0.5, 0.1, 0.5
    )
    with caplog.at_level(logging.WARNING, logger="spp_detect"):
        missing = warn_missing_classes(pool, ["cat", "dog"])
    assert missing == ["dog"]
    assert "'dog' has no foreground" in caplog.text
    assert "no background windows" in caplog.text


def _big_pool(num_images: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    records, proposals = [], []
    for i in range(num_images):
        gt = np.array([[20, 20, 80, 80], [100, 10, 180, 90]], np.float32)
        records.append(_record(f"im{i}", gt, [0, 1]))
        props = np.repeat(gt, 100, axis=0) + rng.uniform(-30, 30, size=(200, 4))
        props[:, 2:] = np.maximum(props[:, 2:], props[:, :2] + 4)
        proposals.append(props.astype(np.float32))
    return build_window_pool(records, proposals, 2, 0.5, 0.1, 0.5, flip=True)


def test_block_fraction_order_and_reproducibility():
    pool = _big_pool()
    assert minibatch_split(128, 0.25, pool) == (32, 96)
    block = sample_block(pool, 3, 10, 128, 0.25, num_scales=5, seed=7)
    assert block.window_index.shape == (10, 128) == block.scale_index.shape
    labels = pool.labels[block.window_index]
    assert (labels[:, :32] < 2).all() and (labels[:, 32:] == 2).all()
    again = sample_block(pool, 3, 10, 128, 0.25, num_scales=5, seed=7)
    other = sample_block(pool, 4, 10, 128, 0.25, num_scales=5, seed=7)
    assert np.array_equal(block.window_index, again.window_index)
    assert np.array_equal(block.scale_index, again.scale_index)
    assert not np.array_equal(block.window_index, other.window_index)
    # scales uniform over 0..4
    counts = np.bincount(block.scale_index.ravel(), minlength=5)
    assert counts.sum() == 1280 and counts.min() > 200
    # drawn without replacement while the pool lasts: a block needing fewer fg than exist
    fg = block.window_index[:, :32].ravel()
    assert len(pool.fg_index) >= fg.size
    assert len(np.unique(fg)) == fg.size


def test_block_cycles_small_pools_evenly():
    pool = _big_pool(num_images=1)
    num_fg = len(pool.fg_index)
    block = sample_block(pool, 0, 50, 128, 0.25, num_scales=1, seed=0)
    counts = np.bincount(block.window_index[:, :32].ravel(), minlength=len(pool.labels))
    used = counts[pool.fg_index]
    assert num_fg < 50 * 32  # the pool is smaller than the block's need
    assert used.max() - used.min() <= 1


def test_block_without_foreground_is_all_background():
    records = [_record("a", [[0, 0, 100, 100]], [0])]
    proposals = [np.array([[0, 0, 30, 100], [60, 0, 100, 100]], np.float32)]
    pool = build_window_pool(
        records, proposals, 1, fg_thresh=1.1, bg_thresh_lo=0.1, bg_thresh_hi=1.1
    )
    assert len(pool.fg_index) == 0
    block = sample_block(pool, 0, 4, 8, 0.25, num_scales=2, seed=0)
    assert (pool.labels[block.window_index] == 1).all()


def test_eval_windows_keep_fraction():
    pool = _big_pool()
    chosen = sample_eval_windows(pool, num_batches=3, batch_size=128, fg_fraction=0.25, seed=0)
    labels = pool.labels[chosen]
    assert len(chosen) == 384 and len(np.unique(chosen)) == 384
    assert (labels < 2).sum() == 96
    tiny = sample_eval_windows(pool, num_batches=500, batch_size=128, fg_fraction=0.25, seed=0)
    count = len(tiny) // 128
    assert len(tiny) == count * 128 and (pool.labels[tiny] < 2).sum() == count * 32


def test_group_by_entry_covers_every_position_once():
    pool = _big_pool()
    block = sample_block(pool, 0, 5, 128, 0.25, num_scales=3, seed=1)
    groups = group_by_entry(block.window_index, pool)
    positions = np.concatenate([p for _, p in groups])
    assert np.array_equal(np.sort(positions), np.arange(640))
    flat = block.window_index.ravel()
    for entry, part in groups:
        assert (pool.window_entry[flat[part]] == entry).all()
    assert len({entry for entry, _ in groups}) == len(groups)


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_minibatch_split_extremes(fraction):
    pool = _big_pool(num_images=1)
    num_fg, num_bg = minibatch_split(16, fraction, pool)
    assert num_fg + num_bg == 16 and num_fg == round(16 * fraction)


def test_box_targets_lead_foreground_windows_to_their_gt_also_when_flipped():
    from spp_detect.ops.boxes import decode_deltas, flip_boxes

    record = _record("a", [[10, 10, 50, 60], [60, 20, 90, 80]], [0, 1], width=100, height=100)
    proposals = np.array([[12, 8, 52, 58], [58, 22, 92, 78], [0, 0, 100, 100]], np.float32)
    pool = build_window_pool([record], [proposals], 2, 0.5, 0.1, 0.5, flip=True)
    for entry in (0, 1):
        rows = np.flatnonzero(pool.window_entry == entry)
        fg = rows[pool.labels[rows] < 2]
        gt = record.gt_boxes if entry == 0 else flip_boxes(record.gt_boxes, record.width)
        decoded = decode_deltas(pool.boxes[fg], pool.box_targets[fg])
        np.testing.assert_allclose(decoded, gt[pool.labels[fg]], atol=1e-4)
    background = pool.labels == 2
    assert background.any() and (pool.box_targets[background] == 0).all()
