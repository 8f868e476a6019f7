"""Proposal library: conversions at the two edges, .mat import, filters, determinism, recall."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import scipy.io

from spp_detect.data import proposals
from spp_detect.errors import UserError
from spp_detect.ops.boxes import clip_boxes
from spp_detect.testing import uniform_boxes


def _scene(height: int = 180, width: int = 240) -> tuple[np.ndarray, np.ndarray]:
    """A noisy grey image with two flat coloured rectangles, and their boxes (2, 4)."""
    rng = np.random.default_rng(0)
    image = rng.normal(128, 6, (height, width, 3)).clip(0, 255).astype(np.uint8)
    boxes = np.array([[30, 40, 110, 140], [140, 20, 220, 80]], dtype=np.float32)
    for (x1, y1, x2, y2), colour in zip(
        boxes.astype(int), [(220, 40, 40), (30, 60, 200)], strict=True
    ):
        image[y1:y2, x1:x2] = colour
    return image, boxes


def _iou_reference(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two continuous XYXY boxes, written out by hand."""
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# --- conversions ------------------------------------------------------------------------------


def test_opencv_rects_hand_case():
    rects = np.array([[10, 20, 5, 7], [0, 0, 1, 1]], dtype=np.int32)
    expected = np.array([[10, 20, 15, 27], [0, 0, 1, 1]], dtype=np.float32)
    boxes = proposals.opencv_rects_to_boxes(rects)
    assert boxes.dtype == np.float32
    np.testing.assert_array_equal(boxes, expected)
    assert proposals.opencv_rects_to_boxes(np.zeros((0, 4))).shape == (0, 4)


def test_mat_boxes_hand_case():
    # [y1 x1 y2 x2] 1-based inclusive: columns 2..20 and rows 3..10 → 19 × 8 pixels
    boxes = proposals.mat_to_boxes(np.array([[3, 2, 10, 20], [1, 1, 1, 1]]))
    np.testing.assert_array_equal(boxes, [[1, 2, 20, 10], [0, 0, 1, 1]])
    assert boxes.dtype == np.float32
    width, height = boxes[0, 2] - boxes[0, 0], boxes[0, 3] - boxes[0, 1]
    assert (width, height) == (20 - 2 + 1, 10 - 3 + 1)


def _write_rcnn_mat(path, ids, boxes_yx):
    """The R-CNN layout: ``images`` a cell of strings, ``boxes`` a cell of (R, 4) doubles."""
    images = np.empty((len(ids), 1), dtype=object)
    cells = np.empty((1, len(ids)), dtype=object)
    for i, (image_id, boxes) in enumerate(zip(ids, boxes_yx, strict=True)):
        images[i, 0] = image_id
        cells[0, i] = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scipy.io.savemat(path, {"images": images, "boxes": cells})


def test_load_mat_proposals(tmp_path):
    path = tmp_path / "voc_2007_test.mat"
    ids = ["000001", "000002", "000004"]
    boxes_yx = [
        [[3, 2, 10, 20], [1, 1, 50, 60]],
        [[5, 6, 7, 8]],  # one box: must stay (1, 4)
        np.zeros((0, 4)),  # no boxes
    ]
    _write_rcnn_mat(path, ids, boxes_yx)
    loaded = proposals.load_mat_proposals(path, ["000004", "000001", "000002"])
    assert list(loaded) == ["000004", "000001", "000002"]
    np.testing.assert_array_equal(loaded["000001"], [[1, 2, 20, 10], [0, 0, 60, 50]])
    np.testing.assert_array_equal(loaded["000002"], [[5, 4, 8, 7]])
    assert loaded["000004"].shape == (0, 4)
    assert all(b.dtype == np.float32 for b in loaded.values())


def test_load_mat_proposals_char_matrix_ids(tmp_path):
    path = tmp_path / "chars.mat"
    cells = np.empty(2, dtype=object)
    cells[0], cells[1] = np.array([[1.0, 1, 30, 40]]), np.array([[2.0, 2, 9, 9]])
    # the ids saved as a 2×2 char matrix rather than a cell
    scipy.io.savemat(path, {"images": np.array(["a1", "b2"]), "boxes": cells})
    loaded = proposals.load_mat_proposals(path, ["b2"])
    np.testing.assert_array_equal(loaded["b2"], [[1, 1, 9, 9]])


def test_load_mat_proposals_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        proposals.load_mat_proposals(tmp_path / "none.mat", ["1"])
    path = tmp_path / "p.mat"
    _write_rcnn_mat(path, ["1"], [[[1, 1, 5, 5]]])
    with pytest.raises(UserError, match=r"no boxes for 1 image.*\b2\b"):
        proposals.load_mat_proposals(path, ["1", "2"])
    scipy.io.savemat(tmp_path / "other.mat", {"x": np.zeros(3)})
    with pytest.raises(UserError, match="'images' and 'boxes'"):
        proposals.load_mat_proposals(tmp_path / "other.mat", ["1"])
    (tmp_path / "junk.mat").write_bytes(b"not a mat file at all" * 10)
    with pytest.raises(UserError, match=r"junk\.mat"):
        proposals.load_mat_proposals(tmp_path / "junk.mat", ["1"])


# --- filters ----------------------------------------------------------------------------------


def test_filter_boxes_min_size_dedup_cap():
    boxes = np.array(
        [
            [0, 0, 19, 50],  # 19 px wide: dropped
            [5, 5, 40, 40],
            [0, 0, 50, 19],  # 19 px tall: dropped
            [1, 1, 21, 21],  # exactly 20 × 20: kept
            [5, 5, 40, 40],  # duplicate of the second: dropped
            [0, 0, 100, 100],
        ],
        dtype=np.float32,
    )
    kept = proposals.filter_boxes(boxes, min_size=20, max_per_image=0)
    np.testing.assert_array_equal(kept, boxes[[1, 3, 5]])  # first occurrences, in input order
    np.testing.assert_array_equal(proposals.filter_boxes(boxes, 20, 2), boxes[[1, 3]])
    assert proposals.filter_boxes(np.zeros((0, 4)), 20, 0).shape == (0, 4)
    assert proposals.filter_boxes(boxes, 0, 0).shape == (5, 4)  # only the duplicate goes


def test_clip_and_downscale_factor():
    clipped = clip_boxes(np.array([[-5, -1, 300, 90]], np.float32), (80, 200))
    np.testing.assert_array_equal(clipped, [[0, 0, 200, 80]])
    assert proposals.downscale_factor((300, 800), 400) == 0.5
    assert proposals.downscale_factor((300, 800), 0) == 1.0
    assert proposals.downscale_factor((300, 800), 1000) == 1.0


def test_propose_image_maps_downscaled_boxes_back(monkeypatch):
    seen = {}

    def fake_search(image, mode, base_k, inc_k, sigma):
        seen["shape"] = image.shape
        return np.array([[10, 10, 50, 30], [0, 0, 4, 4], [90, 40, 200, 200]], dtype=np.float32)

    monkeypatch.setattr(proposals, "selective_search", fake_search)
    image = np.zeros((200, 400, 3), np.uint8)
    boxes = proposals.propose_image(image, "selective_search", max_side=100, min_size=20)
    assert seen["shape"] == (50, 100, 3)
    # ×4 back to original pixels; the 16-px box is dropped; the last is clipped to the image
    np.testing.assert_array_equal(boxes, [[40, 40, 200, 120], [360, 160, 400, 200]])
    with pytest.raises(ValueError, match="method"):
        proposals.propose_image(image, "mat")


# --- methods ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["fast", "quality"])
def test_selective_search_finds_objects_and_is_deterministic(mode):
    image, objects = _scene()
    first = proposals.selective_search(image, mode, 150, 150, 0.8)
    proposals.selective_search(np.ascontiguousarray(image[:, ::-1]), mode, 150, 150, 0.8)
    again = proposals.selective_search(image, mode, 150, 150, 0.8)
    assert first.dtype == np.float32 and first.ndim == 2 and first.shape[1] == 4
    np.testing.assert_array_equal(first, again)  # same boxes, same order
    assert (first[:, 2] > first[:, 0]).all() and (first[:, 3] > first[:, 1]).all()
    assert first.min() >= 0 and first[:, 2].max() <= 240 and first[:, 3].max() <= 180
    for target in objects:
        assert max(_iou_reference(target, box) for box in first) > 0.9


def test_selective_search_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        proposals.selective_search(np.zeros((20, 20, 3), np.uint8), "best", 150, 150, 0.8)


def test_gradient_edges_thin_and_oriented():
    image = np.zeros((60, 80, 3), np.uint8)
    image[:, 40:] = 255  # one vertical step edge between columns 39 and 40
    edges, orientation = proposals.gradient_edges(image)
    assert edges.shape == orientation.shape == (60, 80)
    assert edges.dtype == orientation.dtype == np.float32
    assert edges.min() >= 0 and edges.max() == pytest.approx(1.0)
    assert orientation.min() >= 0 and orientation.max() < np.pi
    row = edges[30]
    assert set(np.flatnonzero(row > 0.5)) <= {39, 40}  # thinned by NMS to the step
    strong = edges > 0.5
    normal = np.minimum(orientation[strong], np.pi - orientation[strong])
    assert np.abs(normal).max() < 0.1  # normal along x: orientation ≈ 0 (mod π)


def test_edge_boxes_finds_objects_and_is_deterministic():
    image, objects = _scene()
    boxes = proposals.edge_boxes(image, None, max_boxes=500)
    assert boxes.dtype == np.float32 and 0 < len(boxes) <= 500
    np.testing.assert_array_equal(boxes, proposals.edge_boxes(image, "", max_boxes=500))
    for target in objects:
        assert max(_iou_reference(target, box) for box in boxes) > 0.7


def test_propose_image_edge_boxes_with_max_side():
    image, _ = _scene(360, 480)
    big = cv2.resize(image, (480, 360), interpolation=cv2.INTER_NEAREST)
    boxes = proposals.propose_image(big, "edge_boxes", max_side=240, min_size=20)
    assert boxes[:, 2].max() <= 480 and boxes[:, 3].max() <= 360
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert widths.min() >= 20 and heights.min() >= 20
    assert len(np.unique(boxes, axis=0)) == len(boxes)


# --- recall -----------------------------------------------------------------------------------


def test_proposal_recall_hand_case():
    gt = [np.array([[0, 0, 10, 10]], np.float32)]
    boxes = [np.array([[0, 0, 10, 5], [0, 0, 10, 10]], np.float32)]  # IoU 0.5, then 1.0
    report = proposals.proposal_recall(gt, boxes, top_n=(1, 0))
    assert report["1"] == {"recall_0.5": 1.0, "recall_0.7": 0.0, "average_recall": 0.1}
    assert report["all"] == {"recall_0.5": 1.0, "recall_0.7": 1.0, "average_recall": 1.0}


def test_proposal_recall_matches_reference():
    rng = np.random.default_rng(1)

    def random_boxes(count):
        return uniform_boxes(rng, count, 80, (5, 60)).astype(np.float32)

    gt = [random_boxes(3), random_boxes(0), random_boxes(5)]
    boxes = [random_boxes(40), random_boxes(10), random_boxes(0)]
    top_n = (5, 20, 0)
    report = proposals.proposal_recall(gt, boxes, top_n)
    for n in top_n:
        best = []
        for g, b in zip(gt, boxes, strict=True):
            kept = b if n == 0 else b[:n]
            best += [max([_iou_reference(x, y) for y in kept], default=0.0) for x in g]
        best = np.array(best)
        entry = report[str(n) if n else "all"]
        assert entry["recall_0.5"] == pytest.approx((best >= 0.5).mean())
        assert entry["recall_0.7"] == pytest.approx((best >= 0.7).mean())
        thresholds = np.arange(0.5, 0.951, 0.05)
        assert entry["average_recall"] == pytest.approx(
            np.mean([(best >= t).mean() for t in thresholds])
        )
    table = proposals.format_recall_table(report)
    assert table.splitlines()[0].split()[:2] == ["top", "N"] and len(table.splitlines()) == 5


def test_check_edge_model_missing_file(tmp_path):
    with pytest.raises(UserError, match="structured-edge model not found"):
        proposals.check_edge_model(tmp_path / "model.yml.gz")
