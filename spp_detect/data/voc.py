"""Reading a VOC-layout dataset: ``ImageSets/Main/<split>.txt``, ``Annotations/``, ``JPEGImages/``.

Shapes: G gt boxes of one image.

The reader is tolerant of what real-world VOC-style sets contain (missing ``<difficult>`` or
``<truncated>`` tags, float coordinates, padded or differently-cased class names, objects of
classes outside ``classes``, boxes reaching outside the image, a ``<size>`` that disagrees with the
image file) and strict about what it cannot repair: each such problem is a :class:`UserError` that
names the file and the fix. Boxes leave this module in the one internal format
(docs/method.md#conventions-and-box-format); :func:`voc_to_continuous` is the only place that
converts from the XML's 1-based inclusive pixel indices.
"""

from __future__ import annotations

import codecs
import logging
import math
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from spp_detect.data.image import TRANSPOSING_ORIENTATIONS, image_header
from spp_detect.data.records import SplitLog, gt_record, label_lookup, log_split_summary
from spp_detect.errors import UserError
from spp_detect.structures import ImageRecord

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")  # <id><suffix>, in this order
BOX_TAGS = ("xmin", "ymin", "xmax", "ymax")
# Linux's NAME_MAX (255 bytes) less the 4 of ".xml"/".npz": every stage names files <id>.npz.
MAX_ID_BYTES = 251
SPLIT_FLAGS = ("-1", "0", "1")  # the per-class column of VOC split files (class_split.txt)


def voc_to_continuous(voc_boxes: np.ndarray) -> np.ndarray:
    """VOC ``(xmin, ymin, xmax, ymax)``, 1-based inclusive (G, 4) → continuous XYXY (G, 4) float32.

    Pixel ``xmin`` (1-based) starts at continuous ``xmin − 1``; pixel ``xmax`` ends at ``xmax``.
    """
    boxes = np.asarray(voc_boxes, dtype=np.float32).reshape(-1, 4)
    return boxes - np.array([1, 1, 0, 0], dtype=np.float32)


@dataclass(frozen=True)
class VocAnnotation:
    """One parsed XML: boxes (G, 4) float32 continuous and not yet clipped, labels (G,) int64,
    difficult (G,) bool; ``size_hw`` from ``<size>`` (None when absent or unusable);
    ``skipped`` counts objects whose class is not in ``classes``."""

    filename: str | None
    size_hw: tuple[int, int] | None
    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray
    skipped: Counter[str] = field(default_factory=Counter)


def parse_annotation(xml_path: str | Path, classes: Sequence[str]) -> VocAnnotation:
    """Parse one VOC XML; objects of other classes are skipped and counted, not errors."""
    xml_path = Path(xml_path)
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as exc:
        raise UserError(f"{xml_path}: not valid XML ({exc}); fix or replace the file") from None
    except OSError as exc:
        raise UserError(f"{xml_path}: unreadable ({exc.strerror}); check the file") from None
    _drop_namespaces(root)
    label_of = label_lookup(classes)
    voc_boxes, labels, difficult = [], [], []
    skipped: Counter[str] = Counter()
    for index, obj in enumerate(root.iter("object")):
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise UserError(f"{xml_path}: <object> {index + 1} has no <name>; add the class name")
        label = label_of.get(name, label_of.get(name.lower()))
        if label is None:
            skipped[name] += 1
            continue
        voc_boxes.append(_read_bndbox(obj, xml_path, index))
        labels.append(label)
        difficult.append(_read_flag(obj.findtext("difficult")))
    return VocAnnotation(
        filename=(root.findtext("filename") or "").strip() or None,
        size_hw=_read_size(root),
        boxes=voc_to_continuous(np.array(voc_boxes, dtype=np.float32).reshape(-1, 4)),
        labels=np.array(labels, dtype=np.int64),
        difficult=np.array(difficult, dtype=bool),
        skipped=skipped,
    )


def _drop_namespaces(root: ET.Element) -> None:
    """Tags without their XML namespace: ``<annotation xmlns="...">`` (some export tools) is
    read as plain VOC, where ElementTree would name every tag ``{namespace}object``."""
    for element in root.iter():
        if isinstance(element.tag, str) and element.tag.startswith("{"):
            element.tag = element.tag.split("}", 1)[1]


def _read_bndbox(obj: ET.Element, xml_path: Path, index: int) -> list[float]:
    bndbox = obj.find("bndbox")
    if bndbox is None:
        raise UserError(
            f"{xml_path}: <object> {index + 1} has no <bndbox>; add the box or remove the object"
        )
    values = []
    for tag in BOX_TAGS:
        text = (bndbox.findtext(tag) or "").strip()
        try:
            value = float(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value):  # "nan" and "inf" parse, but are no pixel
            kind = "a number" if value is None else "a finite number"
            raise UserError(
                f"{xml_path}: <object> {index + 1} <bndbox><{tag}> is {text!r}, not {kind}; "
                "fix the coordinate"
            )
        values.append(value)
    return values


def _read_flag(text: str | None) -> bool:
    """``<difficult>`` as a bool; absent or empty means 0, as in the VOC devkit, and so does
    text that is no finite number (``nan`` would otherwise compare unequal to 0)."""
    text = (text or "").strip().lower()
    if text in ("true", "yes"):
        return True
    try:
        value = float(text)
    except ValueError:
        return False
    return math.isfinite(value) and value != 0


def _read_size(root: ET.Element) -> tuple[int, int] | None:
    try:
        height = int(float(root.findtext("size/height") or ""))
        width = int(float(root.findtext("size/width") or ""))
    except (ValueError, OverflowError):  # not a number, nan, or inf
        return None
    return (height, width) if height > 0 and width > 0 else None


def find_image(
    root: Path, image_id: str, filename: str | None, listed: Collection[str] = ()
) -> tuple[Path, str | None]:
    """The image of ``image_id``, and a problem to warn about (or None).

    The id decides: ``<id>.jpg`` (.jpeg, .png, any case), or the XML's ``<filename>`` when its
    stem is the id. A ``<filename>`` that names the image of another id in ``listed`` (the
    split) is a :class:`UserError`, one that names another file a warning; that file is used
    only when the id has no image of its own.
    """
    folder = root / "JPEGImages"
    named = Path(filename).name if filename else ""
    elsewhere = bool(named) and Path(named).stem != image_id  # names a file of another id
    if elsewhere and Path(named).stem in listed:
        raise UserError(
            f"{root / 'Annotations' / image_id}.xml: <filename> {named} is the image of id "
            f"{Path(named).stem!r}, also in the split, but the id {image_id!r} decides the "
            "image; fix <filename> (or remove it) or the split"
        )
    own = [folder / f"{image_id}{suffix}" for suffix in IMAGE_SUFFIXES]
    for candidate in ([folder / named] if named and not elsewhere else []) + own:
        if candidate.is_file():
            problem = "<filename> names another file (the id's image is used)"
            return candidate, problem if elsewhere else None
    if elsewhere and (folder / named).is_file():
        return folder / named, "no image named by the id (the <filename> image is used)"
    raise UserError(
        f"{folder / (image_id + '.jpg')}: image not found for id {image_id!r}; add the image "
        "(.jpg/.jpeg/.png) or drop the id from the split"
    )


def read_split_ids(root: Path, split: str, classes: Sequence[str] = ()) -> list[str]:
    """Image ids of ``ImageSets/Main/<split>.txt`` in file order: one a line, optionally
    followed by a -1/0/1 flag (VOC's per-class lists)."""
    root = Path(root)
    check_layout(root)
    split_dir = root / "ImageSets" / "Main"
    split_file = split_dir / f"{split}.txt"
    if not split_file.is_file():
        available = available_splits(root, classes)
        hint = f"available: {', '.join(available)}" if available else "the folder has no splits"
        raise UserError(f"{split_file}: split file not found; use --split with one of those {hint}")
    ids: list[str] = []
    for number, line in enumerate(_split_text(split_file).splitlines(), start=1):
        tokens = line.split()
        if tokens:
            ids.append(_split_id(split_file, number, tokens))
    unique = list(dict.fromkeys(ids))
    if len(unique) != len(ids):
        logger.warning("%s: %d duplicate ids ignored", split_file, len(ids) - len(unique))
    return unique


def _split_text(split_file: Path) -> str:
    """The split file as text: UTF-8, with or without a byte-order mark; anything else
    (UTF-16 from some Windows editors, Latin-1) is refused by name."""
    data = split_file.read_bytes()
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) or b"\x00" in data:
        raise UserError(f"{split_file}: UTF-16 text; save it as UTF-8 (one image id a line)")
    try:
        return data.decode("utf-8-sig")  # a UTF-8 byte-order mark is dropped
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{split_file}: not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start}); "
            "save it as UTF-8 (one image id a line)"
        ) from None


def _split_id(split_file: Path, number: int, tokens: list[str]) -> str:
    """The id of one split-file line, refused when it could not name a file of the run."""
    where = f"{split_file}:{number}"
    if len(tokens) > 2 or (len(tokens) == 2 and tokens[1] not in SPLIT_FLAGS):
        raise UserError(
            f"{where}: {' '.join(tokens)!r} holds a space, and a split file lists one id a line "
            "(optionally followed by -1, 0 or 1); rename the image and its XML without spaces"
        )
    image_id = tokens[0]
    if len(image_id.encode()) > MAX_ID_BYTES:
        raise UserError(
            f"{where}: an id of {len(image_id.encode())} bytes, longer than the "
            f"{MAX_ID_BYTES} the file names <id>.xml and <id>.npz may have; shorten the id (and "
            "rename its image and XML)"
        )
    return image_id


def check_layout(root: Path) -> None:
    if not root.is_dir():
        raise UserError(
            f"{root}: dataset root not found; set data.root (in the -c config or "
            "--set data.root=PATH) to a VOC-layout folder"
        )
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        if not (root / sub).is_dir():
            raise UserError(
                f"{root / sub}: folder missing; data.root must be a VOC-layout folder with "
                "Annotations/, JPEGImages/ and ImageSets/Main/"
            )


def available_splits(root: Path, classes: Sequence[str] = ()) -> list[str]:
    """Split names in ``ImageSets/Main``, leaving out the per-class lists ``<class>_<split>``."""
    prefixes = tuple(f"{name}_" for name in classes)
    stems = sorted(p.stem for p in (Path(root) / "ImageSets" / "Main").glob("*.txt"))
    return [s for s in stems if not (prefixes and s.startswith(prefixes))]


def read_split(root: Path, split: str, classes: Sequence[str]) -> list[ImageRecord]:
    """The annotated images of ``split``, in split-file order; labels index into ``classes``."""
    root = Path(root)
    ids = read_split_ids(root, split, classes)
    log = SplitLog(unit="file")
    listed = frozenset(ids)
    records = [_read_record(root, image_id, classes, log, listed) for image_id in ids]
    where = f"{root} split {split}"
    log_split_summary(where, records, log.skipped, "difficult", "objects", logger)
    log.emit(where, logger)
    return records


def _read_record(
    root: Path, image_id: str, classes: Sequence[str], log: SplitLog, listed: Collection[str]
) -> ImageRecord:
    xml_path = root / "Annotations" / f"{image_id}.xml"
    if not xml_path.is_file():
        raise UserError(
            f"{xml_path}: no annotation for id {image_id!r} listed in ImageSets/Main; add the XML "
            "or drop the id from the split file"
        )
    annotation = parse_annotation(xml_path, classes)
    log.skipped.update(annotation.skipped)
    image_path, problem = find_image(root, image_id, annotation.filename, listed)
    if problem:
        log.note(problem, xml_path)
    (height, width), orientation = image_header(image_path)
    if annotation.size_hw is None:
        log.note("no usable <size> (image size read from the file)", xml_path)
    elif annotation.size_hw != (height, width):
        _check_stored_size(xml_path, image_path, annotation.size_hw, orientation)
        log.note("<size> differs from the image (the image is trusted)", xml_path)
    if not len(annotation.boxes):
        logger.debug("%s: no objects of the configured classes", xml_path)
    return gt_record(
        image_id, image_path, (height, width), annotation.boxes, annotation.labels,
        annotation.difficult, log, xml_path,
    )  # fmt: skip


def _check_stored_size(
    xml_path: Path, image_path: Path, size_hw: tuple[int, int], orientation: int
) -> None:
    """Refuse a ``<size>`` that is the image as stored when its EXIF orientation turns it by 90
    degrees: its boxes were drawn on the sideways pixels, and would land on the wrong ones."""
    height, width = size_hw
    if orientation in TRANSPOSING_ORIENTATIONS:
        raise UserError(
            f"{xml_path}: <size> {width}x{height} is {image_path.name} as stored, but its EXIF "
            f"orientation {orientation} turns it upright to {height}x{width}, which is how "
            "images are read; save the image upright without the EXIF tag and redraw its boxes, "
            "or, if its boxes are for the stored pixels, set its EXIF orientation to 1 "
            "(exiftool -Orientation=1 -n FILE)"
        )
