import importlib.util

import numpy as np
import pytest

from spp_detect.errors import UserError
from spp_detect.evaluation.voc_eval import (
    detection_outcomes,
    evaluate_all_classes,
    evaluate_class,
    evaluate_detections,
    format_ap_table,
    plot_pr_curves,
    read_devkit_files,
    voc_ap,
    write_devkit_files,
)
from spp_detect.runtime.run_dir import RunDir
from spp_detect.structures import Detections, ImageRecord

BOX_A = [0.0, 0.0, 10.0, 10.0]
BOX_B = [20.0, 20.0, 40.0, 30.0]


def gt(boxes, difficult=None):
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    flags = np.zeros(len(boxes), bool) if difficult is None else np.asarray(difficult, bool)
    return boxes, flags


def evaluate(image_index, scores, boxes, gt_per_image, iou_thresh=0.5):
    return evaluate_class(
        np.asarray(image_index),
        np.asarray(scores, np.float32),
        np.asarray(boxes, np.float32).reshape(-1, 4),
        gt_per_image,
        iou_thresh,
    )


def test_voc_ap_on_a_known_curve():
    recall = np.array([0.2, 0.4, 0.4, 0.85])
    precision = np.array([1.0, 1.0, 0.67, 0.5])
    # 11-point: t = 0 … 0.4 → 1.0 (5 points), 0.5 … 0.8 → 0.5 (4), 0.9, 1.0 → 0
    assert voc_ap(recall, precision, use_07_metric=True) == pytest.approx(7 / 11)
    # area under the envelope: 0.4 · 1.0 + (0.85 − 0.4) · 0.5
    assert voc_ap(recall, precision, use_07_metric=False) == pytest.approx(0.625)


def test_voc_ap_empty_curve_is_zero():
    assert voc_ap(np.zeros(0), np.zeros(0), True) == 0.0
    assert voc_ap(np.zeros(0), np.zeros(0), False) == 0.0


def test_perfect_detector():
    result = evaluate(
        [0, 1, 1], [0.9, 0.8, 0.7], [BOX_A, BOX_A, BOX_B], [gt([BOX_A]), gt([BOX_A, BOX_B])]
    )
    assert result.ap_07 == pytest.approx(1.0) and result.ap_area == pytest.approx(1.0)
    assert result.npos == 3 and result.num_tp == 3


def test_duplicate_is_a_false_positive():
    # order: TP (img 0), duplicate FP (img 0), TP (img 1) → recall .5 .5 1, precision 1 .5 2/3
    result = evaluate([0, 0, 1], [0.9, 0.8, 0.7], [BOX_A, BOX_A, BOX_B], [gt([BOX_A]), gt([BOX_B])])
    np.testing.assert_allclose(result.recall, [0.5, 0.5, 1.0])
    np.testing.assert_allclose(result.precision, [1.0, 0.5, 2 / 3])
    assert result.ap_07 == pytest.approx((6 * 1.0 + 5 * 2 / 3) / 11)
    assert result.ap_area == pytest.approx(0.5 * 1.0 + 0.5 * 2 / 3)


def test_scores_decide_the_order_not_the_input_order():
    result = evaluate([1, 0, 0], [0.7, 0.8, 0.9], [BOX_B, BOX_A, BOX_A], [gt([BOX_A]), gt([BOX_B])])
    np.testing.assert_allclose(result.precision, [1.0, 0.5, 2 / 3])


def test_no_fallback_to_the_next_best_gt():
    # the second detection overlaps gt A best (0.905) and gt B enough (0.739), but A is taken
    gts = [gt([BOX_A, [2.0, 0.0, 12.0, 10.0]])]
    result = evaluate([0, 0], [0.9, 0.8], [BOX_A, [0.5, 0.0, 10.5, 10.0]], gts)
    assert result.num_tp == 1
    np.testing.assert_allclose(result.precision, [1.0, 0.5])


def test_iou_threshold_is_inclusive():
    result = evaluate([0], [1.0], [[0.0, 0.0, 20.0, 10.0]], [gt([BOX_A])])  # IoU exactly 0.5
    assert result.num_tp == 1
    result = evaluate([0], [1.0], [[0.0, 0.0, 20.0, 10.0]], [gt([BOX_A])], iou_thresh=0.51)
    assert result.num_tp == 0


def test_difficult_gt_is_ignored():
    gts = [gt([BOX_A, BOX_B], difficult=[False, True])]
    result = evaluate([0, 0], [0.9, 0.8], [BOX_B, BOX_A], gts)
    assert result.npos == 1 and result.num_tp == 1
    np.testing.assert_allclose(result.recall, [0.0, 1.0])
    assert result.ap_07 == pytest.approx(1.0)  # the ignored detection is not an FP


def test_no_detections_and_no_gt():
    result = evaluate(np.zeros(0, int), [], np.zeros((0, 4)), [gt([BOX_A])])
    assert result.ap_07 == 0.0 and result.ap_area == 0.0 and result.npos == 1
    result = evaluate([0], [0.5], [BOX_A], [gt([])])
    assert result.ap_07 == 0.0 and result.npos == 0 and result.num_tp == 0


def records_and_detections():
    def record(image_id, boxes, labels, difficult):
        return ImageRecord(
            image_id, f"{image_id}.jpg", 50, 60, np.array(boxes, np.float32), labels, difficult
        )

    records = [
        record("a", [BOX_A, BOX_B], [0, 1], [False, False]),
        record("b", [BOX_A], [1], [False]),
    ]
    detections = Detections(
        image_ids=np.array(["a", "b", "other"]),
        image_index=np.array([0, 0, 1, 0, 2]),
        boxes=np.array([BOX_A, BOX_B, BOX_A, [0.25, 1.0, 10.5, 20.0], BOX_A], np.float32),
        scores=np.array([0.9, 0.8, 0.3, 0.5, 0.99], np.float32),
        labels=np.array([0, 1, 1, 1, 1]),
    )
    return records, detections


def test_evaluate_detections_report():
    records, detections = records_and_detections()
    report = evaluate_detections(detections, records, ["cat", "dog"], 0.5, use_07_metric=True)
    assert report["metric"] == "voc07_11point" and report["num_images"] == 2
    assert report["ap"]["cat"] == pytest.approx(1.0)
    # dog, the detection on image "other" dropped: TP (0.8), FP (0.5), TP (0.3)
    assert report["ap"]["dog"] == pytest.approx((6 + 5 * 2 / 3) / 11)
    assert report["mAP"] == pytest.approx((1.0 + report["ap"]["dog"]) / 2)
    assert report["ap_area"]["dog"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert report["npos"] == {"cat": 1, "dog": 2}
    area = evaluate_detections(detections, records, ["cat", "dog"], 0.5, use_07_metric=False)
    assert area["metric"] == "area" and area["mAP"] == pytest.approx(report["mAP_area"])
    table = format_ap_table(report)
    assert "cat" in table and "dog" in table and "mean" in table and "100.00" in table


def test_untested_record_is_a_user_error():
    records, _ = records_and_detections()
    partial = Detections(np.array(["a"]), np.zeros(0), np.zeros((0, 4)), np.zeros(0), np.zeros(0))
    with pytest.raises(UserError, match="not tested"):
        evaluate_all_classes(partial, records, 2, 0.5)


def test_devkit_files_round_trip(tmp_path):
    _, detections = records_and_detections()
    paths = RunDir(tmp_path).devkit_paths("test", "test", ["cat", "dog", "bird"])
    assert [p.name for p in paths] == [
        "comp4_det_test_cat.txt",
        "comp4_det_test_dog.txt",
        "comp4_det_test_bird.txt",
    ]
    write_devkit_files(detections, ["cat", "dog", "bird"], paths)
    assert paths[0].read_text() == "a 0.900000 1.000 1.000 10.000 10.000\n"
    assert "a 0.500000 1.250 2.000 10.500 20.000\n" in paths[1].read_text()
    assert paths[2].read_text() == ""
    back = read_devkit_files(paths, ["a", "b", "other"])
    order = np.lexsort((detections.scores, detections.labels))
    back_order = np.lexsort((back.scores, back.labels))
    np.testing.assert_array_equal(back.image_index[back_order], detections.image_index[order])
    np.testing.assert_array_equal(back.labels[back_order], detections.labels[order])
    np.testing.assert_allclose(back.boxes[back_order], detections.boxes[order], atol=1e-3)
    np.testing.assert_allclose(back.scores[back_order], detections.scores[order], atol=1e-6)


def test_read_devkit_files_rejects_unknown_ids(tmp_path):
    (tmp_path / "comp4_det_test_cat.txt").write_text("zzz 0.5 1 1 2 2\n")
    with pytest.raises(UserError, match=r"comp4_det_test_cat\.txt:1"):
        read_devkit_files([tmp_path / "comp4_det_test_cat.txt"], ["a"])
    with pytest.raises(UserError, match="not found"):
        read_devkit_files([tmp_path / "comp4_det_test_dog.txt"], ["a"])


def test_plot_pr_curves(tmp_path):
    records, detections = records_and_detections()
    results = evaluate_all_classes(detections, records, 2, 0.5)
    written = plot_pr_curves(results, ["cat", "dog"], tmp_path / "pr.png")
    assert written == (importlib.util.find_spec("matplotlib") is not None)
    assert (tmp_path / "pr.png").exists() == written


def devkit_reference(image_index, scores, boxes, gt_per_image, iou_thresh):
    """`VOCevaldet.m` transcribed literally: 1-based boxes, +1 IoU, one detection at a time."""
    one_based = lambda box: (box[0] + 1, box[1] + 1, box[2], box[3])  # noqa: E731
    used = [np.zeros(len(boxes_g), bool) for boxes_g, _ in gt_per_image]
    tp, fp = [], []
    for d in np.argsort(-scores, kind="stable"):
        bb = one_based(boxes[d])
        gt_boxes, difficult = gt_per_image[image_index[d]]
        ovmax, jmax = -np.inf, -1
        for j, gt_box in enumerate(gt_boxes):
            bbgt = one_based(gt_box)
            iw = min(bb[2], bbgt[2]) - max(bb[0], bbgt[0]) + 1
            ih = min(bb[3], bbgt[3]) - max(bb[1], bbgt[1]) + 1
            if iw > 0 and ih > 0:
                area = (bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1)
                area_gt = (bbgt[2] - bbgt[0] + 1) * (bbgt[3] - bbgt[1] + 1)
                ov = iw * ih / (area + area_gt - iw * ih)
                if ov > ovmax:
                    ovmax, jmax = ov, j
        hit = ovmax >= iou_thresh
        ignored = hit and difficult[jmax]
        true_positive = hit and not ignored and not used[image_index[d]][jmax]
        if true_positive:
            used[image_index[d]][jmax] = True
        tp.append(float(true_positive))
        fp.append(float(not true_positive and not ignored))
    npos = sum(int((~d).sum()) for _, d in gt_per_image)
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    return tp / npos, tp / np.maximum(tp + fp, 1e-300)


@pytest.mark.parametrize("seed", range(5))
def test_matches_a_literal_devkit_transcription(seed):
    rng = np.random.default_rng(seed)
    gt_per_image = []
    for _ in range(8):
        count = rng.integers(0, 4)
        corner = rng.integers(0, 60, (count, 2)).astype(np.float64)
        gt_boxes = np.concatenate([corner, corner + rng.integers(10, 40, (count, 2))], 1)
        gt_per_image.append((gt_boxes.astype(np.float32), rng.random(count) < 0.2))
    image_index, boxes = [], []
    for image, (gt_boxes, _) in enumerate(gt_per_image):
        for box in gt_boxes:  # jittered copies of every gt, some duplicates among them
            for _ in range(rng.integers(0, 3)):
                image_index.append(image)
                boxes.append(box + rng.integers(-4, 5, 4))
        for _ in range(3):  # and random boxes
            corner = rng.integers(0, 60, 2)
            image_index.append(image)
            boxes.append(np.concatenate([corner, corner + rng.integers(10, 40, 2)]))
    image_index = np.array(image_index)
    boxes = np.array(boxes, np.float32)
    scores = np.round(rng.random(len(boxes)), 1).astype(np.float32)  # ties: stable order matters
    result = evaluate_class(image_index, scores, boxes, gt_per_image, 0.5)
    recall, precision = devkit_reference(image_index, scores, boxes, gt_per_image, 0.5)
    np.testing.assert_allclose(result.recall, recall, atol=1e-12)
    np.testing.assert_allclose(result.precision, precision, atol=1e-12)


def test_detection_outcomes_agree_with_the_ap_counts():
    """Hits, false positives and misses per detection add up to evaluate_all_classes' counts
    on random detections (the match depends only on each image's own score order)."""
    rng = np.random.default_rng(0)
    records = []
    for index in range(6):
        count = int(rng.integers(0, 4))
        corners = rng.uniform(0, 60, (count, 2))
        boxes = np.concatenate([corners, corners + rng.uniform(10, 40, (count, 2))], axis=1)
        records.append(
            ImageRecord(f"im{index}", "x.jpg", 100, 100, boxes.astype(np.float32),
                        rng.integers(0, 2, count), rng.random(count) < 0.2)
        )  # fmt: skip
    jitter = [r.gt_boxes + rng.normal(0, 4, r.gt_boxes.shape) for r in records]
    boxes = np.concatenate([*jitter, rng.uniform(0, 80, (10, 4)).cumsum(axis=1) / 3])
    image_index = np.concatenate([np.full(len(j), i) for i, j in enumerate(jitter)] + [
        rng.integers(0, 6, 10)
    ])  # fmt: skip
    labels = np.concatenate([r.gt_labels for r in records] + [rng.integers(0, 2, 10)])
    detections = Detections(
        image_ids=[r.image_id for r in records], image_index=image_index,
        boxes=boxes.astype(np.float32), scores=rng.random(len(boxes)).astype(np.float32),
        labels=labels,
    )  # fmt: skip
    outcomes = detection_outcomes(detections, records, 0.5)
    results = evaluate_all_classes(detections, records, 2, 0.5)
    for label, result in enumerate(results):
        mine = detections.labels == label
        assert outcomes.true[mine].sum() == result.num_tp
        assert sum(miss[1] == label for miss in outcomes.missed) == result.npos - result.num_tp
    assert not (outcomes.true & outcomes.false).any()
