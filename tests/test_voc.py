"""VOC-layout reading: the raccoon set, hand-made XML edge cases, and every bad input."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from spp_detect.data.voc import available_splits, parse_annotation, read_split, voc_to_continuous
from spp_detect.errors import UserError

CLASSES = ("cat", "dog")


def obj(name: str, box: tuple, difficult: str | None = "0", truncated: bool = True) -> str:
    tags = f"<name>{name}</name>"
    if truncated:
        tags += "<truncated>0</truncated>"
    if difficult is not None:
        tags += f"<difficult>{difficult}</difficult>"
    coords = "".join(
        f"<{t}>{v}</{t}>" for t, v in zip(("xmin", "ymin", "xmax", "ymax"), box, strict=True)
    )
    return f"<object>{tags}<bndbox>{coords}</bndbox></object>"


def xml(objects: str, size: tuple[int, int] | None = (60, 80), filename: str | None = None) -> str:
    head = f"<filename>{filename}</filename>" if filename else ""
    if size is not None:
        head += f"<size><width>{size[1]}</width><height>{size[0]}</height><depth>3</depth></size>"
    return f"<annotation>{head}{objects}</annotation>"


def make_voc(
    root: Path,
    annotations: dict[str, str],
    image_hw: tuple[int, int] = (60, 80),
    split_text: str | None = None,
    suffix: str = ".jpg",
) -> Path:
    """A VOC folder with split 'trainval' listing every id, an image of ``image_hw`` per id."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for image_id, text in annotations.items():
        (root / "Annotations" / f"{image_id}.xml").write_text(text)
        image = np.full((*image_hw, 3), 128, dtype=np.uint8)
        cv2.imwrite(str(root / "JPEGImages" / f"{image_id}{suffix}"), image)
    if split_text is None:
        split_text = "".join(f"{image_id}\n" for image_id in annotations)
    (root / "ImageSets" / "Main" / "trainval.txt").write_text(split_text)
    return root


def test_voc_to_continuous_hand_case():
    boxes = voc_to_continuous(np.array([[1, 1, 10, 20], [81.5, 3, 100, 4]]))
    assert boxes.dtype == np.float32
    np.testing.assert_array_equal(boxes, [[0, 0, 10, 20], [80.5, 2, 100, 4]])
    assert voc_to_continuous(np.zeros((0, 4))).shape == (0, 4)


def test_raccoon_has_200_images_and_217_boxes(raccoon_root):
    trainval = read_split(raccoon_root, "trainval", ["raccoon"])
    test = read_split(raccoon_root, "test", ["raccoon"])
    assert (len(trainval), len(test)) == (160, 40)
    records = trainval + test
    assert len({r.image_id for r in records}) == 200
    assert sum(len(r.gt_boxes) for r in records) == 217
    for record in records:
        assert record.path.is_file()
        assert (record.gt_labels == 0).all()
        boxes = record.gt_boxes
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= record.width).all()
        assert (boxes[:, 3] <= record.height).all() and (boxes[:, 2:] > boxes[:, :2]).all()
    first = next(r for r in trainval if r.image_id == "raccoon-1")  # XML: 81 88 522 408, 650x417
    np.testing.assert_array_equal(first.gt_boxes, [[80, 87, 522, 408]])
    assert first.image_hw == (417, 650)


def test_tolerant_parsing(tmp_path, caplog):
    objects = (
        obj("  cat ", (11, 21, 40.5, 50), difficult=None, truncated=False)
        + obj("Dog", (1, 1, 80, 60), difficult="1")
        + obj("bird", (1, 1, 5, 5))
        + obj("bird", (2, 2, 6, 6))
    )
    root = make_voc(tmp_path / "voc", {"a": xml(objects)})
    with caplog.at_level(logging.INFO, logger="spp_detect.data.voc"):
        (record,) = read_split(root, "trainval", CLASSES)
    np.testing.assert_array_equal(record.gt_boxes, [[10, 20, 40.5, 50], [0, 0, 80, 60]])
    np.testing.assert_array_equal(record.gt_labels, [0, 1])
    np.testing.assert_array_equal(record.difficult, [False, True])
    assert record.image_hw == (60, 80)
    assert "skipped 2 objects of other classes (bird 2)" in caplog.text


def test_parse_annotation_returns_unclipped_boxes_and_skips(tmp_path):
    path = tmp_path / "a.xml"
    path.write_text(xml(obj("dog", (5, 6, 200, 7)) + obj("cow", (1, 1, 2, 2)), filename="a.png"))
    annotation = parse_annotation(path, CLASSES)
    np.testing.assert_array_equal(annotation.boxes, [[4, 5, 200, 7]])
    assert annotation.labels.tolist() == [1] and annotation.skipped == {"cow": 1}
    assert annotation.filename == "a.png" and annotation.size_hw == (60, 80)


def test_boxes_outside_clipped_and_degenerate_dropped(tmp_path, caplog):
    objects = (
        obj("cat", (-5, 10, 100, 70)) + obj("dog", (90, 10, 120, 20)) + obj("dog", (5, 5, 5, 9))
    )
    root = make_voc(tmp_path / "voc", {"a": xml(objects)})
    with caplog.at_level(logging.WARNING, logger="spp_detect.data.voc"):
        (record,) = read_split(root, "trainval", CLASSES)
    # box 2 starts right of the 80-px image; box 3 is one pixel column wide, kept
    np.testing.assert_array_equal(record.gt_boxes, [[0, 9, 80, 60], [4, 4, 5, 9]])
    assert record.gt_labels.tolist() == [0, 1]
    assert "clipped" in caplog.text and "dropped" in caplog.text


def test_real_image_size_wins_over_xml(tmp_path, caplog):
    annotations = {"a": xml(obj("cat", (1, 1, 80, 60)), size=(600, 800)), "b": xml("", size=None)}
    root = make_voc(tmp_path / "voc", annotations, image_hw=(30, 40))
    with caplog.at_level(logging.WARNING, logger="spp_detect.data.voc"):
        first, second = read_split(root, "trainval", CLASSES)
    assert first.image_hw == second.image_hw == (30, 40)
    np.testing.assert_array_equal(first.gt_boxes, [[0, 0, 40, 30]])
    assert second.gt_boxes.shape == (0, 4) and second.gt_labels.shape == (0,)
    assert "<size> differs" in caplog.text and "no usable <size>" in caplog.text


def test_split_file_columns_blank_lines_duplicates_and_png(tmp_path):
    annotations = {"b": xml(obj("cat", (1, 1, 5, 5))), "a": xml(obj("dog", (1, 1, 5, 5)))}
    split = "b  1\n\n   \na -1\nb 1\n"
    root = make_voc(tmp_path / "voc", annotations, split_text=split, suffix=".png")
    records = read_split(root, "trainval", CLASSES)
    assert [r.image_id for r in records] == ["b", "a"]
    assert records[0].path.name == "b.png"


def test_the_id_decides_the_image_and_another_filename_is_a_warning(tmp_path, caplog):
    """A <filename> naming another file: the id's own image is used, with a warning; that file
    only when the id has no image (before, <filename> won over the id)."""
    root = make_voc(tmp_path / "voc", {"a": xml("", filename="other.jpg")})
    image = np.zeros((10, 20, 3), dtype=np.uint8)
    cv2.imwrite(str(root / "JPEGImages" / "other.jpg"), image)
    with caplog.at_level(logging.WARNING, logger="spp_detect.data.voc"):
        (record,) = read_split(root, "trainval", CLASSES)
    assert record.path.name == "a.jpg" and record.image_hw == (60, 80)
    assert "<filename> names another file (the id's image is used)" in caplog.text
    (root / "JPEGImages" / "a.jpg").unlink()
    (record,) = read_split(root, "trainval", CLASSES)
    assert record.path.name == "other.jpg" and record.image_hw == (10, 20)


def test_available_splits_leave_out_class_lists(tmp_path):
    root = make_voc(tmp_path / "voc", {"a": xml("")})
    (root / "ImageSets/Main/cat_trainval.txt").write_text("a 1\n")
    (root / "ImageSets/Main/test.txt").write_text("a\n")
    assert available_splits(root, CLASSES) == ["test", "trainval"]


def raises_naming(path: Path | str, fix: str):
    """A UserError whose single-line message names ``path`` and contains ``fix``."""
    return pytest.raises(UserError, match=rf"^{re.escape(str(path))}: [^\n]*{re.escape(fix)}")


def test_missing_root(tmp_path):
    with raises_naming(tmp_path / "nope", "set data.root"):
        read_split(tmp_path / "nope", "trainval", CLASSES)


def test_missing_layout_folder(tmp_path):
    (tmp_path / "voc" / "Annotations").mkdir(parents=True)
    with raises_naming(tmp_path / "voc" / "JPEGImages", "VOC-layout"):
        read_split(tmp_path / "voc", "trainval", CLASSES)


def test_missing_split_lists_available(tmp_path):
    root = make_voc(tmp_path / "voc", {"a": xml("")})
    (root / "ImageSets/Main/dog_trainval.txt").write_text("a 1\n")
    with raises_naming(root / "ImageSets/Main/val.txt", "one of those available: trainval") as info:
        read_split(root, "val", CLASSES)
    assert "dog_trainval" not in str(info.value)


def test_id_without_xml(tmp_path):
    root = make_voc(tmp_path / "voc", {"a": xml("")}, split_text="a\nghost\n")
    with raises_naming(root / "Annotations/ghost.xml", "drop the id from the split file"):
        read_split(root, "trainval", CLASSES)


def test_xml_that_is_not_xml(tmp_path):
    root = make_voc(tmp_path / "voc", {"a": "this is <not xml"})
    with raises_naming(root / "Annotations/a.xml", "not valid XML"):
        read_split(root, "trainval", CLASSES)


def test_object_without_bndbox_or_number(tmp_path):
    root = make_voc(tmp_path / "voc", {"a": xml("<object><name>cat</name></object>")})
    with raises_naming(root / "Annotations/a.xml", "has no <bndbox>"):
        read_split(root, "trainval", CLASSES)
    (root / "Annotations/a.xml").write_text(xml(obj("cat", (1, "x", 3, 4))))
    with raises_naming(root / "Annotations/a.xml", "<ymin> is 'x', not a number"):
        read_split(root, "trainval", CLASSES)


def test_missing_image(tmp_path):
    root = make_voc(tmp_path / "voc", {"a": xml("")})
    (root / "JPEGImages/a.jpg").unlink()
    with raises_naming(root / "JPEGImages/a.jpg", "image not found"):
        read_split(root, "trainval", CLASSES)


def test_image_that_does_not_decode(tmp_path):
    root = make_voc(tmp_path / "voc", {"a": xml("")})
    (root / "JPEGImages/a.jpg").write_bytes(b"\x00garbage, not an image" * 10)
    with raises_naming(root / "JPEGImages/a.jpg", "not a readable image"):
        read_split(root, "trainval", CLASSES)


# --- inputs from the wild (issue 27) ---------------------------------------------------------


def test_a_filename_naming_another_listed_id_is_refused(tmp_path):
    """Id b whose XML names a.jpg, the image of id a: one image would be read (and scored)
    twice; before, b silently read a's image."""
    root = make_voc(tmp_path / "voc", {"a": xml(""), "b": xml("", filename="a.jpg")})
    with raises_naming(root / "Annotations/b.xml", "is the image of id 'a', also in the split"):
        read_split(root, "trainval", CLASSES)


def test_a_namespaced_xml_keeps_its_objects(tmp_path):
    """<annotation xmlns="..."> (and prefixed tags) are read as plain VOC; before, every
    object was lost without a word."""
    plain = xml(obj("cat", (1, 1, 40, 30)) + obj("dog", (5, 5, 60, 50)))
    namespaced = plain.replace("<annotation>", '<annotation xmlns="http://example.com/voc">')
    prefixed = (
        namespaced.replace('xmlns="', 'xmlns:v="').replace("<", "<v:").replace("<v:/", "</v:")
    )
    root = make_voc(tmp_path / "voc", {"plain": plain, "ns": namespaced, "prefixed": prefixed})
    records = read_split(root, "trainval", CLASSES)
    for record in records:
        np.testing.assert_array_equal(record.gt_boxes, records[0].gt_boxes)
        assert record.gt_labels.tolist() == [0, 1] and record.image_hw == (60, 80)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_coordinate_that_is_not_a_finite_number_is_refused(tmp_path, value):
    """Before, 'nan' was read as a number and reported as a box outside the image."""
    root = make_voc(tmp_path / "voc", {"a": xml(obj("cat", (1, value, 30, 40)))})
    with raises_naming(root / "Annotations/a.xml", f"<ymin> is '{value}', not a finite number"):
        read_split(root, "trainval", CLASSES)


def test_a_difficult_flag_of_nan_is_not_difficult(tmp_path):
    """<difficult>nan</difficult> read as difficult (nan != 0), hiding the box from the AP."""
    objects = obj("cat", (1, 1, 30, 40), difficult="nan") + obj("dog", (1, 1, 9, 9), difficult="1")
    root = make_voc(tmp_path / "voc", {"a": xml(objects)})
    (record,) = read_split(root, "trainval", CLASSES)
    assert record.difficult.tolist() == [False, True]


def test_a_size_of_inf_is_no_size(tmp_path, caplog):
    """<size> with inf (OverflowError in int()) was a traceback; it is unusable, like text."""
    text = xml(obj("cat", (1, 1, 30, 40))).replace("<width>80</width>", "<width>inf</width>")
    root = make_voc(tmp_path / "voc", {"a": text})
    with caplog.at_level(logging.WARNING, logger="spp_detect.data.voc"):
        (record,) = read_split(root, "trainval", CLASSES)
    assert record.image_hw == (60, 80) and "no usable <size>" in caplog.text


def _exif_photo(path: Path, stored_hw: tuple[int, int], orientation: int) -> None:
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(np.full((*stored_hw, 3), 90, np.uint8)).save(path, exif=exif)


def test_an_exif_rotated_photo_is_read_upright_with_its_upright_size(tmp_path, caplog):
    """A phone photo (orientation 6, stored 60x80 landscape) whose <size> and boxes are for the
    upright 80x60 portrait: read upright, boxes kept, no size warning (before: the stored
    size, a "<size> differs" warning and every box on sideways pixels)."""
    root = make_voc(tmp_path / "voc", {"a": xml(obj("cat", (1, 51, 40, 80)), size=(80, 60))})
    _exif_photo(root / "JPEGImages/a.jpg", (60, 80), orientation=6)
    with caplog.at_level(logging.WARNING, logger="spp_detect.data.voc"):
        (record,) = read_split(root, "trainval", CLASSES)
    assert record.image_hw == (80, 60)
    np.testing.assert_array_equal(record.gt_boxes, [[0, 50, 40, 80]])  # not clipped
    assert "<size> differs" not in caplog.text


def test_a_size_of_the_stored_pixels_of_a_rotated_photo_is_refused(tmp_path):
    """<size> 80x60 is the stored landscape, but EXIF turns it to a portrait: the boxes were
    drawn on the sideways pixels, so one line says how to fix the data."""
    root = make_voc(tmp_path / "voc", {"a": xml(obj("cat", (1, 1, 70, 50)), size=(60, 80))})
    _exif_photo(root / "JPEGImages/a.jpg", (60, 80), orientation=8)
    with raises_naming(root / "Annotations/a.xml", "EXIF orientation 8 turns it upright") as info:
        read_split(root, "trainval", CLASSES)
    assert "exiftool -Orientation=1 -n" in str(info.value)


def test_a_utf8_bom_is_read_and_utf16_or_latin1_named(tmp_path):
    """A UTF-8 BOM was glued to the first id ('\\ufeffa': "no annotation for id"); UTF-16 and
    other encodings gave ids of garbage. The BOM is dropped; the others are named."""
    root = make_voc(tmp_path / "voc", {"a": xml(""), "b": xml("")})
    split = root / "ImageSets/Main/trainval.txt"
    split.write_bytes("\ufeffa\r\nb\r\n".encode())
    assert [r.image_id for r in read_split(root, "trainval", CLASSES)] == ["a", "b"]
    split.write_bytes("a\r\nb\r\n".encode("utf-16"))
    with raises_naming(split, "UTF-16 text; save it as UTF-8"):
        read_split(root, "trainval", CLASSES)
    split.write_bytes("a\nb\xe9\n".encode("latin-1"))
    with raises_naming(split, "not UTF-8 text (byte 0xe9 at offset 3); save it as UTF-8"):
        read_split(root, "trainval", CLASSES)


def test_an_id_with_a_space_is_refused(tmp_path):
    """'my photo' was cut to the id 'my' without a word; a -1/0/1 flag column is still read."""
    root = make_voc(tmp_path / "voc", {"a": xml("")}, split_text="a 1\nmy photo\n")
    with raises_naming(f"{root / 'ImageSets/Main/trainval.txt'}:2", "'my photo' holds a space"):
        read_split(root, "trainval", CLASSES)


def test_an_id_too_long_for_a_file_name_is_refused(tmp_path):
    """A 300-character line: Annotations/<id>.xml raised ENAMETOOLONG (a traceback)."""
    root = make_voc(tmp_path / "voc", {"a": xml("")}, split_text="a\n" + "x" * 300 + "\n")
    with raises_naming(f"{root / 'ImageSets/Main/trainval.txt'}:2", "an id of 300 bytes"):
        read_split(root, "trainval", CLASSES)
