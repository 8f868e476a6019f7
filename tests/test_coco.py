"""COCO-format datasets and COCO metrics: the toy set converted to COCO JSON reads back as the
VOC reader's records; real-export quirks; every bad input; pycocotools figures against the VOC
ones; the whole pipeline in COCO form (slow)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from spp_detect.cli import cli
from spp_detect.config import load_config
from spp_detect.data.coco import (
    coco_to_continuous,
    continuous_to_coco,
    read_split,
    records_to_coco,
)
from spp_detect.data.toy import TOY_CLASSES
from spp_detect.data.voc import read_split as read_voc_split
from spp_detect.errors import UserError
from spp_detect.evaluation.voc_eval import evaluate_detections
from spp_detect.structures import Detections, ImageDetections, ImageRecord

TOY_CATEGORY_IDS = (3, 7, 11)  # not contiguous, as in real exports (COCO's own skip ids)
ANNOTATIONS = "annotations/instances_{split}.json"  # data.annotations, the default


def voc_to_coco(voc_root: Path, split: str, out: Path, category_ids=TOY_CATEGORY_IDS) -> dict:
    """Write ``split`` of a VOC-layout set as the COCO JSON ``out``, as an exporter would:
    integer image ids, file names relative to ``voc_root`` (so in a sub-folder), a polygon
    segmentation on every box and an extra category without annotations. Returns the dict."""
    records = read_voc_split(voc_root, split, TOY_CLASSES)
    ids = list(range(1, len(records) + 1))
    data = records_to_coco(records, TOY_CLASSES, category_ids, ids, root=voc_root)
    for annotation in data["annotations"]:
        x, y, w, h = annotation["bbox"]
        annotation["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    data["categories"].insert(0, {"id": 0, "name": "shapes", "supercategory": "none"})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data))
    return data


@pytest.fixture(scope="module")
def toy_coco(toy_root, tmp_path_factory) -> Path:
    """The toy set's annotations in COCO form, in a folder of their own (the toy set is shared)."""
    folder = tmp_path_factory.mktemp("toy_coco")
    for split in ("trainval", "test"):
        voc_to_coco(toy_root, split, folder / ANNOTATIONS.replace("{split}", split))
    return folder


def coco_sets(toy_root: Path, toy_coco: Path, *extra: str) -> list[str]:
    pattern = str(toy_coco / ANNOTATIONS)
    return [f"data.root={toy_root}", "data.format=coco", f"data.annotations={pattern}", *extra]


def write_coco(tmp_path: Path, data, images: dict[str, tuple[int, int]] | None = None) -> Path:
    """A COCO file (any JSON value, or text as is) and grey images ``{file_name: (h, w)}``."""
    import cv2

    for name, hw in (images or {}).items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / name), np.full((*hw, 3), 128, np.uint8))
    path = tmp_path / "annotations" / "instances_trainval.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def small_coco(**changes) -> dict:
    """Two images (one in a sub-folder, one without annotations), two categories."""
    data = {
        "images": [
            {"id": 10, "file_name": "photos/a.jpg", "height": 60, "width": 80},
            {"id": 20, "file_name": "b.jpg", "height": 60, "width": 80},
        ],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 4, "bbox": [10, 20, 30, 15], "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 9, "bbox": [0, 0, 5, 5], "iscrowd": 1},
        ],
        "categories": [{"id": 9, "name": "dog"}, {"id": 4, "name": "cat"}],
    }
    data.update(changes)
    return data


SMALL_IMAGES = {"photos/a.jpg": (60, 80), "b.jpg": (60, 80)}


# ---------------------------------------------------------------------------- conversion edge


def test_conversion_edge_hand_case_and_round_trip():
    boxes = coco_to_continuous([[10, 20, 30, 40], [0.5, 1.5, 2, 3]])
    assert boxes.dtype == np.float32
    np.testing.assert_array_equal(boxes, [[10, 20, 40, 60], [0.5, 1.5, 2.5, 4.5]])
    np.testing.assert_array_equal(continuous_to_coco(boxes), [[10, 20, 30, 40], [0.5, 1.5, 2, 3]])
    # A VOC box covering pixels 1…10 (1-based, inclusive) is 10 px wide in COCO, from x = 0.
    from spp_detect.data.voc import voc_to_continuous

    np.testing.assert_array_equal(
        continuous_to_coco(voc_to_continuous([1, 1, 10, 20])), [[0, 0, 10, 20]]
    )


# ------------------------------------------------------------------------------------ reading


def test_toy_in_coco_form_reads_as_the_voc_records(toy_root, toy_coco):
    for split in ("trainval", "test"):
        voc = read_voc_split(toy_root, split, TOY_CLASSES)
        path = toy_coco / ANNOTATIONS.replace("{split}", split)
        coco = read_split(toy_root, path, split, TOY_CLASSES)
        assert [r.image_id for r in coco] == [str(i) for i in range(1, len(voc) + 1)]
        for a, b in zip(voc, coco, strict=True):
            assert a.path == b.path and a.image_hw == b.image_hw
            np.testing.assert_array_equal(a.gt_boxes, b.gt_boxes)
            np.testing.assert_array_equal(a.gt_labels, b.gt_labels)
            np.testing.assert_array_equal(a.difficult, b.difficult)
        assert sum(int(r.difficult.sum()) for r in coco) > 0  # the toy has difficult objects


def test_classes_from_categories_or_checked_against_them(toy_root, toy_coco):
    config = load_config("toy", coco_sets(toy_root, toy_coco))
    assert config.data.classes == TOY_CLASSES  # the toy YAML's, checked when reading
    sets = coco_sets(toy_root, toy_coco)
    config = load_config(None, sets)  # no data.classes: the annotated categories, in id order
    assert config.data.classes == TOY_CLASSES  # "shapes" (id 0) has no annotation
    again = load_config(None, [*sets, "data.classes=[triangle, circle]"])
    records = read_split(
        toy_root, toy_coco / "annotations/instances_test.json", "test", again.data.classes
    )
    voc = read_voc_split(toy_root, "test", ("triangle", "circle"))
    for a, b in zip(voc, records, strict=True):
        np.testing.assert_array_equal(a.gt_labels, b.gt_labels)
    with pytest.raises(UserError, match=r"data.classes \['horse'\] are not among its categories"):
        read_split(toy_root, toy_coco / "annotations/instances_test.json", "test", ("horse",))


def test_real_export_quirks(tmp_path, caplog):
    data = small_coco()
    data["annotations"].append(  # reaches outside the 80 × 60 image: clipped
        {"id": 3, "image_id": 10, "category_id": 4, "bbox": [70, 50, 20, 20], "segmentation": {}}
    )
    data["annotations"].append(  # no area: dropped
        {"id": 4, "image_id": 10, "category_id": 4, "bbox": [5, 5, 0, 3]}
    )
    data["images"][1]["width"] = 81  # a stale size: the image file is trusted
    path = write_coco(tmp_path, data, SMALL_IMAGES)
    with caplog.at_level(logging.INFO, logger="spp_detect.data.coco"):
        records = read_split(tmp_path, path, "trainval", ("cat", "dog"))
        only_cats = read_split(tmp_path, path, "trainval", ("cat",))
    first, second = records
    assert (first.image_id, second.image_id) == ("10", "20")
    assert first.path == tmp_path / "photos" / "a.jpg" and first.image_hw == (60, 80)
    np.testing.assert_array_equal(
        first.gt_boxes, [[10, 20, 40, 35], [0, 0, 5, 5], [70, 50, 80, 60]]
    )
    np.testing.assert_array_equal(first.gt_labels, [0, 1, 0])  # by name, not by category id
    np.testing.assert_array_equal(first.difficult, [False, True, False])  # iscrowd
    assert len(second.gt_boxes) == 0  # an image without annotations is kept
    assert "boxes outside the image (clipped) in 1 image(s): 10" in caplog.text
    assert "boxes with no area (dropped) in 1 image(s): 10" in caplog.text
    assert "differ from the image file (the file is trusted) in 1 image(s): 20" in caplog.text
    assert "3 boxes (1 crowd)" in caplog.text
    assert (
        len(only_cats[0].gt_boxes) == 2
        and "skipped 1 boxes of other classes (dog 1)" in caplog.text
    )


def test_images_found_under_the_split_folder_or_beside_the_file(tmp_path):
    data = small_coco(annotations=[])
    path = write_coco(tmp_path, data, {"trainval/photos/a.jpg": (60, 80)})
    (path.parent / "b.jpg").write_bytes((tmp_path / "trainval/photos/a.jpg").read_bytes())
    first, second = read_split(tmp_path, path, "trainval", ("cat",))
    assert first.path == tmp_path / "trainval/photos/a.jpg"  # COCO's own: <root>/val2017/…
    assert second.path == path.parent / "b.jpg"  # Roboflow's: beside the JSON


# ---------------------------------------------------------------------------------- bad input


def broken(kind: str) -> dict | str:
    data = small_coco()
    if kind == "not json":
        return "{images: ["
    if kind == "no categories":
        del data["categories"]
    elif kind == "unknown image":
        data["annotations"][0]["image_id"] = 99
    elif kind == "unknown category":
        data["annotations"][0]["category_id"] = 5
    elif kind == "negative width":
        data["annotations"][0]["bbox"] = [10, 20, -30, 15]
    elif kind == "missing image":
        data["images"][1]["file_name"] = "gone.jpg"
    return data


BAD_INPUTS = {  # broken(kind) → the message it gives
    "not json": r"instances_trainval.json: not valid JSON",
    "no categories": r"not a COCO detection file: no list 'categories'",
    "unknown image": r"annotation id 1 refers to image id 99, which is not in 'images'",
    "unknown category": r"annotation id 1 has category id 5, which is not in 'categories'",
    "negative width": r"annotation id 1: bbox \[10, 20, -30, 15\] has a negative width",
    "missing image": r"gone.jpg: image of id 20 in .* not found",
}


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_2(tmp_path, kind):
    message = BAD_INPUTS[kind]
    path = write_coco(tmp_path, broken(kind), SMALL_IMAGES)
    with pytest.raises(UserError, match=message) as caught:
        read_split(tmp_path, path, "trainval", ("cat", "dog"))
    assert "\n" not in str(caught.value)
    sets = [f"data.root={tmp_path}", "data.format=coco", "data.classes=[cat, dog]"]
    args = ["propose", "--run-dir", str(tmp_path / "run"), "--workers", "1"]
    result = CliRunner().invoke(cli, args + [p for s in sets for p in ("--set", s)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), result.output


def test_bad_config_values():
    with pytest.raises(UserError, match=r"data.format must be one of voc, coco, got 'yolo'"):
        load_config(None, ["data.format=yolo"])
    with pytest.raises(UserError, match=r"data.annotations must contain \{split\}"):
        load_config(None, ["data.format=coco", "data.annotations=all.json"])
    with pytest.raises(UserError, match=r"eval.metric must be one of voc, coco"):
        load_config(None, ["eval.metric=map"])
    with pytest.raises(UserError, match=r"instances_trainval.json: COCO annotation file not found"):
        load_config(None, ["data.format=coco", "data.root=/nowhere"])


# ------------------------------------------------------------------------------------ metrics


def noisy_detections(records: list[ImageRecord], seed: int = 0) -> Detections:
    """Every gt box jittered (some by too much), plus random false positives, random scores."""
    rng = np.random.default_rng(seed)
    per_image = []
    for record in records:
        count = len(record.gt_boxes)
        jitter = rng.normal(0, 0.08, (count, 4)) * np.tile(
            record.gt_boxes[:, 2:] - record.gt_boxes[:, :2], 2
        )
        corners = rng.uniform(0, min(record.image_hw), (3, 2))
        false = np.concatenate([corners, corners + rng.uniform(20, 80, (3, 2))], axis=1)
        boxes = np.concatenate([record.gt_boxes + jitter, false]).astype(np.float32)
        labels = np.concatenate([record.gt_labels, rng.integers(0, len(TOY_CLASSES), 3)])
        per_image.append(ImageDetections(boxes, rng.uniform(0, 1, len(boxes)), labels))
    return Detections.from_images([r.image_id for r in records], per_image)


def test_coco_ap50_against_voc_area_ap(toy_root):
    pytest.importorskip("pycocotools")
    from spp_detect.evaluation.coco_eval import evaluate_coco, results_json

    records = read_voc_split(toy_root, "trainval", TOY_CLASSES)
    ids = list(range(1, len(TOY_CLASSES) + 1))
    found = [ImageDetections(r.gt_boxes, np.ones(len(r.gt_boxes)), r.gt_labels) for r in records]
    perfect = Detections.from_images([r.image_id for r in records], found)
    figures = evaluate_coco(records, results_json(perfect, records, ids), TOY_CLASSES, ids)
    assert figures["AP"] == pytest.approx(1.0) and figures["AP50"] == pytest.approx(1.0)
    assert set(figures["ap"]) == set(TOY_CLASSES)
    nothing = evaluate_coco(records, [], TOY_CLASSES, ids)  # pycocotools cannot load none
    assert nothing["AP"] == 0.0 and nothing["ap50"]["circle"] == 0.0
    detections = noisy_detections(records)
    results = results_json(detections, records, ids)
    assert results[0]["image_id"] == records[0].image_id  # VOC ids stay strings
    figures = evaluate_coco(records, results, TOY_CLASSES, ids)
    voc = evaluate_detections(detections, records, TOY_CLASSES, 0.5, use_07_metric=False)
    for name in TOY_CLASSES:
        # 101-point sampling of the same precision envelope: within about 1/100 of the area AP
        # (docs/coco.md#coco-ap50-against-the-voc-area-ap).
        assert abs(figures["ap50"][name] - voc["ap_area"][name]) < 0.015, name
    assert figures["AP50"] == pytest.approx(np.mean(list(figures["ap50"].values())))
    assert figures["AP"] < figures["AP50"]


def test_missing_pycocotools_names_the_install(monkeypatch):
    import importlib.util

    from spp_detect.evaluation import coco_eval

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "pycocotools" else real(name)
    )
    with pytest.raises(
        UserError, match=r'pycocotools is not installed; pip install "spp-detect\[coco\]"'
    ):
        coco_eval.require_pycocotools()


# ------------------------------------------------------------------------------ whole pipeline


@pytest.mark.slow
def test_pipeline_in_coco_form_matches_the_voc_run(toy_root, toy_coco, tmp_path):
    pytest.importorskip("pycocotools")
    from spp_detect.testing import TOY_SETTINGS

    def run(run_dir: Path, sets: list[str], verb: str = "run", *extra: str) -> dict:
        args = [verb, "-c", "toy", "--run-dir", str(run_dir), "--workers", "2", *extra]
        args += [p for s in [*sets, *TOY_SETTINGS] for p in ("--set", s)]
        result = CliRunner().invoke(cli, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return json.loads((run_dir / "eval/test.json").read_text())

    voc = run(tmp_path / "voc", [f"data.root={toy_root}"])
    coco_sets_ = coco_sets(toy_root, toy_coco, "eval.metric=coco")
    coco = run(tmp_path / "coco", coco_sets_)
    assert coco["mAP"] == voc["mAP"] and coco["ap_area"] == voc["ap_area"]
    figures = coco["coco"]
    print(f"toy VOC mAP {voc['mAP']:.4f} area {voc['mAP_area']:.4f}; COCO {figures}")
    # Same data, other rules (101-point sampling, crowd IoU on the difficult boxes, matching to
    # the next-best gt): close to the area AP, not equal (docs/coco.md).
    assert abs(figures["AP50"] - voc["mAP_area"]) < 0.03
    results = json.loads((tmp_path / "coco/eval/test/coco_results.json").read_text())
    assert {r["category_id"] for r in results} <= set(TOY_CATEGORY_IDS)
    assert all(isinstance(r["image_id"], int) for r in results)
    # --metric coco on the VOC-layout run gives the same COCO figures.
    again = run(tmp_path / "voc", [f"data.root={toy_root}"], "eval", "--metric", "coco")
    assert again["coco"]["AP50"] == pytest.approx(figures["AP50"])
    assert again["coco"]["AP"] == pytest.approx(figures["AP"])
