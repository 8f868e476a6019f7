"""Window dedup, the norm-estimate sampling and the feature scale."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spp_detect.config import Config
from spp_detect.data.voc import read_split
from spp_detect.models.detector import DetectionSettings, TrainedDetector
from spp_detect.models.features import FeatureSource
from spp_detect.models.head import Head
from spp_detect.models.linear import SvmModel
from spp_detect.models.weights import build_backbone
from spp_detect.ops.spp import PoolGeometry, distinct_windows
from spp_detect.structures import ImageRecord
from spp_detect.testing import random_boxes
from spp_detect.train.window_features import feature_scale, sample_for_norm

TOY_CLASSES = ("circle", "square", "triangle")


def test_distinct_windows_first_occurrences_in_order():
    keys = torch.tensor([[3, 1], [1, 2], [3, 1], [0, 0], [1, 2], [3, 1]])
    first, inverse = distinct_windows(keys)
    assert first.tolist() == [0, 1, 3]
    assert inverse.tolist() == [0, 1, 0, 2, 1, 0]
    assert torch.equal(keys[first][inverse], keys)


def test_distinct_windows_random_round_trip():
    generator = torch.Generator().manual_seed(0)
    keys = torch.randint(0, 4, (500, 5), generator=generator)
    first, inverse = distinct_windows(keys)
    assert torch.equal(keys[first][inverse], keys)
    assert len(torch.unique(keys, dim=0)) == len(first)
    assert torch.all(first[1:] > first[:-1])


def test_distinct_windows_empty():
    first, inverse = distinct_windows(torch.zeros((0, 5), dtype=torch.long))
    assert len(first) == 0 and len(inverse) == 0


def test_sample_for_norm_caps_and_is_seeded():
    counts = [5, 300, 0, 50]
    picks = sample_for_norm(counts, max_images=3, max_windows=200, seed=3)
    assert len(picks) == 3
    assert [i for i, _ in picks] == sorted(i for i, _ in picks)
    for image, rows in picks:
        assert len(rows) == min(counts[image], 200)
        assert len(set(rows.tolist())) == len(rows)
    again = sample_for_norm(counts, max_images=3, max_windows=200, seed=3)
    assert all(
        a[0] == b[0] and np.array_equal(a[1], b[1]) for a, b in zip(picks, again, strict=True)
    )


def test_feature_scale_reaches_the_target_mean_norm():
    rng = np.random.default_rng(0)
    features = [torch.from_numpy(rng.normal(size=(40, 16))) for _ in range(3)]
    picks = [(i, np.arange(40)) for i in range(3)]
    scale = feature_scale(lambda i, rows: features[i][rows], picks, 20.0)
    norms = torch.cat([torch.linalg.vector_norm(f * scale, dim=1) for f in features])
    assert float(norms.mean()) == pytest.approx(20.0, rel=1e-6)


def toy_source(toy_root) -> tuple[FeatureSource, ImageRecord]:
    """A live ZF-5 source at two scales and the first toy test image."""
    record = read_split(toy_root, "test", TOY_CLASSES)[0]
    backbone = build_backbone("zf5", "none")
    geometry = PoolGeometry(backbone.stride, backbone.offset0, 6.5, (6, 3, 2, 1), 224.0)
    source = FeatureSource((160, 240), geometry, backbone.channels, "cpu", backbone=backbone)
    return source, record


def test_source_pool_order_modes_and_buffer(toy_root):
    """keep_order=False gives the same rows in pooling order; ``out`` in both modes."""
    source, record = toy_source(toy_root)
    rng = np.random.default_rng(2)
    boxes = random_boxes(rng, 40, record.image_hw, 0.1, 0.4)
    index = torch.arange(40) % 2  # both scales, interleaved
    ordered, rows = source.pool(record, boxes, index)
    assert ordered.dtype == torch.float32 and torch.equal(rows, torch.arange(40))
    pooled, rows = source.pool(record, boxes, index, keep_order=False)
    assert sorted(rows.tolist()) == list(range(40)) and torch.equal(pooled, ordered[rows])
    buffer = torch.full((45, source.feature_dim), -1.0)
    into, into_rows = source.pool(record, boxes, index, out=buffer, keep_order=False)
    assert into.data_ptr() == buffer.data_ptr() and torch.equal(into_rows, rows)
    assert torch.equal(into, pooled) and bool((buffer[40:] == -1).all())
    into, into_rows = source.pool(record, boxes, index, out=buffer)
    assert into.data_ptr() == buffer.data_ptr() and torch.equal(into_rows, torch.arange(40))
    assert torch.equal(into, ordered)


def test_dedup_gives_the_same_scores_as_every_window(toy_root):
    """The fast test path (distinct windows once) against pooling every window."""
    source, record = toy_source(toy_root)
    torch.manual_seed(0)
    head = Head(source.feature_dim, 64, len(TOY_CLASSES)).eval()
    svms = SvmModel(np.random.default_rng(0).normal(size=(3, 64)).astype(np.float32), np.zeros(3))
    rng = np.random.default_rng(1)
    boxes = random_boxes(rng, 300, record.image_hw, 0.1, 0.4)
    boxes = np.concatenate([boxes, boxes[:50] + 0.5])  # near-duplicates share conv5 cells

    test = Config().test
    settings = DetectionSettings(
        test.score_thresh, test.nms_thresh, test.max_per_class, test.batch_windows, "fp32"
    )
    detector = TrainedDetector(head, svms, None, settings, "cpu")
    with torch.inference_mode():
        pooled, fc7, inverse = detector.window_features(source, record, boxes)
        fast = (fc7 @ detector.svm_weight + detector.svm_bias)[inverse]
        every, _ = source.pool(record, boxes)
        slow = head.features(every) @ detector.svm_weight + detector.svm_bias
    assert len(pooled) < len(boxes)
    torch.testing.assert_close(pooled[inverse], every)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)
