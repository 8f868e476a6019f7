"""The toy dataset: determinism, layout, the variety it promises, and safe (re)writing."""

from __future__ import annotations

import colorsys
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from spp_detect.data import toy
from spp_detect.data.toy import TOY_CLASSES, draw_image, make_toy_dataset
from spp_detect.data.voc import read_split
from spp_detect.errors import UserError


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def full_toy(tmp_path_factory) -> tuple[list, list]:
    """The default-size toy set (60 + 30 images) read back through the VOC reader."""
    root = tmp_path_factory.mktemp("full") / "toy"
    make_toy_dataset(root)
    return read_split(root, "trainval", TOY_CLASSES), read_split(root, "test", TOY_CLASSES)


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path):
    first, second, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    make_toy_dataset(first, num_train=5, num_test=3, seed=7)
    make_toy_dataset(second, num_train=5, num_test=3, seed=7)
    make_toy_dataset(other, num_train=5, num_test=3, seed=8)
    files = tree_bytes(first)
    assert files == tree_bytes(second)
    assert len(files) == 2 * 8 + 2 + 1  # images, XMLs, two split files, toy.json
    others = tree_bytes(other)
    assert files.keys() == others.keys()
    assert files["JPEGImages/trainval_00001.jpg"] != others["JPEGImages/trainval_00001.jpg"]


def test_test_split_does_not_depend_on_num_train(tmp_path):
    make_toy_dataset(tmp_path / "a", num_train=2, num_test=2)
    make_toy_dataset(tmp_path / "b", num_train=4, num_test=2)
    name = "JPEGImages/test_00002.jpg"
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_layout_and_counts(toy_root):
    trainval = read_split(toy_root, "trainval", TOY_CLASSES)
    test = read_split(toy_root, "test", TOY_CLASSES)
    assert (len(trainval), len(test)) == (12, 6)
    assert not {r.image_id for r in trainval} & {r.image_id for r in test}
    for records in (trainval, test):
        assert set(np.concatenate([r.gt_labels for r in records]).tolist()) == {0, 1, 2}
    for record in trainval + test:
        assert record.path.suffix == ".jpg"
        assert cv2.imread(str(record.path)).shape[:2] == record.image_hw
        assert 1 <= len(record.gt_boxes) <= 4


def test_variety(full_toy):
    records = full_toy[0] + full_toy[1]
    sizes = np.array([r.image_hw for r in records])
    assert sizes.min() >= 200 and sizes.max() <= 500
    assert sizes[:, 0].std() > 40 and sizes[:, 1].std() > 40
    assert (sizes[:, 0] != sizes[:, 1]).mean() > 0.9  # width and height drawn independently
    boxes = np.concatenate([r.gt_boxes for r in records])
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    sides = np.sqrt(widths * heights)
    assert 19 <= sides.min() <= 25 and min(widths.min(), heights.min()) >= 12
    largest = max(
        np.sqrt(np.prod(r.gt_boxes[:, 2:] - r.gt_boxes[:, :2], axis=1)).max() / min(r.image_hw)
        for r in records
    )
    assert largest > 0.7  # "most of the image"
    aspect = widths / heights
    assert aspect.min() < 0.65 and aspect.max() > 1.5
    difficult = np.concatenate([r.difficult for r in records])
    assert 0.02 <= difficult.mean() <= 0.12
    assert (sides[difficult] < toy.DIFFICULT_SIDE + 1).all()
    assert any(overlapping(r.gt_boxes) for r in records)  # partial occlusion happens


def overlapping(boxes: np.ndarray) -> bool:
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            lo, hi = np.maximum(boxes[i, :2], boxes[j, :2]), np.minimum(boxes[i, 2:], boxes[j, 2:])
            if (hi > lo).all():
                return True
    return False


def circular_mean_degrees(hues: np.ndarray) -> float:
    radians = np.deg2rad(hues)
    return float(np.rad2deg(np.arctan2(np.sin(radians).mean(), np.cos(radians).mean())) % 360)


def test_boxes_are_tight_and_colours_separate_classes():
    """Draw images directly: outside the boxes is grey; the last-drawn (unoccluded) object fills
    its box edge to edge, and its hue is nearest its own class's colour family."""
    hues = {name: [] for name in TOY_CLASSES}
    for index in range(24):
        image, objects = draw_image(np.random.default_rng([123, index]), first_class=index % 3)
        hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV_FULL).astype(np.float32)
        saturated = hsv[:, :, 1] > 100
        outside = np.ones(image.shape[:2], dtype=bool)
        for o in objects:
            outside[o.ymin - 1 : o.ymax, o.xmin - 1 : o.xmax] = False
        assert saturated[outside].mean() < 0.01  # greyish background
        top = objects[-1]
        inside = saturated[top.ymin - 1 : top.ymax, top.xmin - 1 : top.xmax]
        assert inside.any(axis=0)[[0, -1]].all() and inside.any(axis=1)[[0, -1]].all()
        centre_y, centre_x = (top.ymin + top.ymax) // 2 - 1, (top.xmin + top.xmax) // 2 - 1
        patch = hsv[centre_y - 1 : centre_y + 2, centre_x - 1 : centre_x + 2]  # inside every shape
        hues[top.name].append(circular_mean_degrees(patch[:, :, 0].ravel() * 360 / 256))
    for name, values in hues.items():
        assert values, name
        for hue in values:
            distance = {n: min(abs(hue - c), 360 - abs(hue - c)) for n, c in toy.CLASS_HUES.items()}
            assert min(distance, key=distance.get) == name, (name, hue)
            assert distance[name] <= toy.HUE_JITTER + 3


def test_class_hues_are_far_apart():
    hues = sorted(toy.CLASS_HUES.values())
    gaps = np.diff([*hues, hues[0] + 360])
    assert gaps.min() > 4 * toy.HUE_JITTER
    low_rgb = colorsys.hsv_to_rgb(0, toy.SATURATION_RANGE[0], toy.VALUE_RANGE[0])
    assert max(low_rgb) - min(low_rgb) > 0.3  # even the dullest object is clearly coloured


def test_xml_is_voc_1_based(toy_root):
    text = (toy_root / "Annotations" / "trainval_00001.xml").read_text()
    assert "<filename>trainval_00001.jpg</filename>" in text and "<difficult>" in text
    marker = json.loads((toy_root / toy.MARKER).read_text())
    assert marker["num_train"] == 12 and marker["classes"] == list(TOY_CLASSES)


def test_existing_same_set_is_kept_other_args_replace(tmp_path):
    out = tmp_path / "toy"
    make_toy_dataset(out, num_train=3, num_test=2)
    stamp = (out / toy.MARKER).stat().st_mtime_ns
    assert "already" in make_toy_dataset(out, num_train=3, num_test=2)
    assert (out / toy.MARKER).stat().st_mtime_ns == stamp
    make_toy_dataset(out, num_train=4, num_test=2)
    assert len((out / "ImageSets/Main/trainval.txt").read_text().split()) == 4
    assert sorted(os.listdir(tmp_path)) == ["toy"]  # no temporary folders left


def test_foreign_folder_is_refused(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("precious")
    with pytest.raises(UserError, match="mine: exists and is not a toy dataset"):
        make_toy_dataset(tmp_path / "mine", num_train=2, num_test=1)
    assert (tmp_path / "mine" / "keep.txt").read_text() == "precious"


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    def crash(root, num_images, seed):
        (root / "JPEGImages").mkdir(parents=True)
        (root / "JPEGImages" / "half.jpg").write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setattr(toy, "_write_dataset", crash)
    with pytest.raises(KeyboardInterrupt):
        make_toy_dataset(tmp_path / "toy", num_train=2, num_test=1)
    assert os.listdir(tmp_path) == []
