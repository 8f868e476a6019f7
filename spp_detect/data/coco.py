"""Reading a COCO-format dataset: one JSON file per split (``images``, ``annotations``,
``categories``) and the images under ``data.root`` (docs/coco.md).

Shapes: G gt boxes of one image, M boxes.

The reader builds its :class:`ImageRecord`s as the VOC reader does (``records.gt_record``). It
tolerates what real exports contain (category ids that are not contiguous, segmentation fields,
file names with sub-folders, images without annotations, boxes reaching outside the image) and
is strict about what it cannot repair: each such problem is a :class:`UserError` that names the
file and the fix. Boxes cross the package boundary only here: :func:`coco_to_continuous` on the
way in and :func:`continuous_to_coco` on the way out (docs/method.md#conventions-and-box-format).
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from spp_detect.data.image import image_size
from spp_detect.data.records import SplitLog, gt_record, label_lookup, log_split_summary
from spp_detect.errors import UserError
from spp_detect.structures import ImageRecord

logger = logging.getLogger(__name__)

REQUIRED_KEYS = ("images", "annotations", "categories")  # a COCO detection file's lists
SPLIT_FIELD = "{split}"  # replaced by the split name in data.annotations
# A string image id becomes a file name (<image_id>.npz) and a token of devkit lines, so it must
# be one safe path component; integer ids (the COCO spec) always are.
SAFE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
SIZE_DIFFERS = "width/height differ from the image file (the file is trusted)"


def coco_to_continuous(xywh: np.ndarray) -> np.ndarray:
    """COCO ``[x, y, width, height]`` (G, 4) → continuous XYXY (G, 4) float32.

    COCO boxes are already continuous (``x, y`` the top-left corner, pycocotools' IoU has no +1),
    so ``x2 = x + width`` with no pixel offset (docs/coco.md#boxes).
    """
    boxes = np.asarray(xywh, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1).astype(np.float32)


def continuous_to_coco(boxes: np.ndarray) -> np.ndarray:
    """Continuous XYXY (M, 4) → COCO ``[x, y, width, height]`` (M, 4) float64."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def annotation_path(root: str | Path, pattern: str, split: str) -> Path:
    """The annotation file of ``split``: ``pattern`` (data.annotations) with ``{split}``
    replaced, relative to ``root`` unless absolute."""
    return Path(root) / pattern.replace(SPLIT_FIELD, split)


def load_coco(path: str | Path) -> dict[str, Any]:
    """The parsed, checked JSON at ``path`` (cached per file version; do not modify it)."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        raise UserError(
            f"{path}: COCO annotation file not found; set data.annotations (relative to "
            "data.root, {split} for the split name) or data.root"
        ) from None
    return _load_checked(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _load_checked(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
    """One parse per file version: the config, the records and the eval all read the file."""
    try:
        with open(path, "rb") as handle:
            data = json.load(handle)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc}); re-export it in COCO format") from None
    except OSError as exc:
        raise UserError(f"{path}: unreadable ({exc.strerror}); check the file") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a COCO file (a JSON object with {', '.join(REQUIRED_KEYS)})")
    missing = [key for key in REQUIRED_KEYS if not isinstance(data.get(key), list)]
    if missing:
        raise UserError(
            f"{path}: not a COCO detection file: no list {', '.join(map(repr, missing))}; "
            f"a COCO file has {', '.join(REQUIRED_KEYS)}"
        )
    _check_categories(Path(path), data["categories"])
    return data


def _check_categories(path: Path, categories: list) -> None:
    seen_ids: set = set()
    seen_names: dict[str, Any] = {}
    for index, category in enumerate(categories):
        if not isinstance(category, dict) or "id" not in category or "name" not in category:
            raise UserError(f"{path}: categories[{index}] needs an 'id' and a 'name'")
        cid, name = category["id"], str(category["name"]).strip()
        if cid in seen_ids:
            raise UserError(f"{path}: category id {cid} appears twice; make the ids unique")
        if name in seen_names:
            raise UserError(
                f"{path}: categories {seen_names[name]} and {cid} are both named {name!r}; "
                "rename or merge them"
            )
        seen_ids.add(cid)
        seen_names[name] = cid


def category_names(path: str | Path) -> tuple[str, ...]:
    """The classes a file defines: its category names in id order, leaving out categories
    without any annotation (e.g. Roboflow's dataset-level category 0), which nothing could
    learn."""
    data = load_coco(path)
    used = Counter(a.get("category_id") for a in data["annotations"] if isinstance(a, dict))
    categories = sorted(data["categories"], key=lambda c: _sort_key(c["id"]))
    names = tuple(str(c["name"]).strip() for c in categories if used[c["id"]])
    unused = [str(c["name"]).strip() for c in categories if not used[c["id"]]]
    if unused:
        logger.info("%s: categories without annotations left out of the classes: %s", path, unused)
    if not names:
        raise UserError(f"{path}: no annotated category; set data.classes or fix the file")
    return names


def category_ids(path: str | Path, classes: Sequence[str]) -> list[Any]:
    """The file's category id of each class (K,), in class order."""
    by_name = {str(c["name"]).strip(): c["id"] for c in load_coco(path)["categories"]}
    label_of = _class_labels(Path(path), by_name, classes)
    ids: list[Any] = [None] * len(classes)
    for name, cid in by_name.items():
        if name in label_of:
            ids[label_of[name]] = cid
    return ids


def _class_labels(path: Path, names: Sequence[str], classes: Sequence[str]) -> dict[str, int]:
    """{category name: label} for the categories in ``classes`` (matched as VOC names are:
    stripped, then case-insensitively); every class must name a category."""
    lookup = label_lookup(classes)
    label_of = {}
    for name in names:
        label = lookup.get(name, lookup.get(name.lower()))
        if label is not None:
            label_of[name] = label
    missing = [c for i, c in enumerate(classes) if i not in label_of.values()]
    if missing:
        raise UserError(
            f"{path}: data.classes {missing} are not among its categories {list(names)}; fix "
            "data.classes, or leave it out to take the file's categories"
        )
    return label_of


def _sort_key(value: Any) -> tuple[int, Any]:
    """Ints in numeric order before any other ids (ids may be ints or strings)."""
    return (0, value) if isinstance(value, int) else (1, str(value))


def read_split(
    root: str | Path, path: str | Path, split: str, classes: Sequence[str]
) -> list[ImageRecord]:
    """The images of the COCO file ``path`` in file order, images under ``root``; labels index
    into ``classes``; ``iscrowd`` boxes are flagged ``difficult``."""
    root, path = Path(root), Path(path)
    data = load_coco(path)
    names = {c["id"]: str(c["name"]).strip() for c in data["categories"]}
    label_of = _class_labels(path, list(names.values()), classes)
    images = _index_images(path, data["images"])
    boxes_of = _group_annotations(path, data["annotations"], images, names)
    log = SplitLog(unit="image")
    records = [
        _record(root, path, split, image, boxes_of.get(image_id, []), names, label_of, log)
        for image_id, image in images.items()
    ]
    where = f"{path} split {split}"
    log_split_summary(where, records, log.skipped, "crowd", "boxes", logger)
    log.emit(where, logger)
    return records


def _index_images(path: Path, images: list) -> dict[str, dict]:
    """{image id as a string: image entry}, in file order; ids must be unique and safe."""
    indexed: dict[str, dict] = {}
    for index, image in enumerate(images):
        if not isinstance(image, dict) or "id" not in image or not image.get("file_name"):
            raise UserError(f"{path}: images[{index}] needs an 'id' and a 'file_name'")
        image_id = _image_id(path, image["id"])
        if image_id in indexed:
            raise UserError(f"{path}: image id {image['id']} appears twice; make the ids unique")
        indexed[image_id] = image
    return indexed


def _image_id(path: Path, value: Any) -> str:
    """The record's image id: the COCO id as a string (a safe file name)."""
    text = str(value)
    if isinstance(value, bool) or not SAFE_ID.fullmatch(text):
        raise UserError(
            f"{path}: image id {value!r} is not an integer or a plain name (letters, digits, "
            "'_', '.', '-'); renumber the images"
        )
    return text


def _group_annotations(
    path: Path, annotations: list, images: dict[str, dict], names: dict
) -> dict[str, list[dict]]:
    """{image id: its annotations}, each checked: known image and category, a usable bbox."""
    grouped: dict[str, list[dict]] = {}
    for index, annotation in enumerate(annotations):
        where = f"{path}: annotation {_annotation_name(annotation, index)}"
        if not isinstance(annotation, dict):
            raise UserError(f"{where} is not an object; re-export the file")
        image_id = str(annotation.get("image_id"))
        if image_id not in images:
            raise UserError(
                f"{where} refers to image id {annotation.get('image_id')!r}, which is not in "
                "'images'; add the image or remove the annotation"
            )
        if annotation.get("category_id") not in names:
            raise UserError(
                f"{where} has category id {annotation.get('category_id')!r}, which is not in "
                "'categories'; add the category or remove the annotation"
            )
        _check_bbox(where, annotation.get("bbox"))
        grouped.setdefault(image_id, []).append(annotation)
    return grouped


def _annotation_name(annotation: Any, index: int) -> str:
    if isinstance(annotation, dict) and "id" in annotation:
        return f"id {annotation['id']}"
    return f"#{index + 1}"


def _check_bbox(where: str, bbox: Any) -> None:
    ok = isinstance(bbox, list) and len(bbox) == 4
    ok = ok and all(isinstance(v, int | float) and not isinstance(v, bool) for v in bbox)
    if not ok or not np.isfinite(bbox).all():
        raise UserError(f"{where}: bbox {bbox!r} is not [x, y, width, height] numbers; fix it")
    for value, what in zip(bbox[2:], ("width", "height"), strict=True):
        if value < 0:
            raise UserError(
                f"{where}: bbox {bbox} has a negative {what}; COCO boxes are "
                "[x, y, width, height], not corners: fix the exporter or the box"
            )


def _record(
    root: Path,
    path: Path,
    split: str,
    image: dict,
    annotations: list[dict],
    names: dict,
    label_of: dict[str, int],
    log: SplitLog,
) -> ImageRecord:
    image_id = str(image["id"])
    image_path = find_image(root, path, split, str(image["file_name"]), image_id)
    height, width = image_size(image_path)
    if (image.get("height"), image.get("width")) != (height, width):
        log.note(SIZE_DIFFERS, image_id)
    kept = []
    for annotation in annotations:
        name = names[annotation["category_id"]]
        if name in label_of:
            kept.append(annotation)
        else:
            log.skipped[name] += 1
    return gt_record(
        image_id,
        image_path,
        (height, width),
        coco_to_continuous(np.array([a["bbox"] for a in kept], dtype=np.float64)),
        np.array([label_of[names[a["category_id"]]] for a in kept], np.int64),
        np.array([bool(a.get("iscrowd", 0)) for a in kept], bool),
        log,
        image_id,
    )


def find_image(root: Path, path: Path, split: str, file_name: str, image_id: str) -> Path:
    """The image file: ``file_name`` (sub-folders allowed) under data.root, under
    ``data.root/<split>/`` (COCO's own layout, e.g. val2017/), or beside the annotation file
    (Roboflow's)."""
    relative = Path(file_name.replace("\\", "/").lstrip("/"))
    for folder in (root, root / split, path.parent):
        if (folder / relative).is_file():
            return folder / relative
    raise UserError(
        f"{root / relative}: image of id {image_id} in {path} not found (also looked under "
        f"{root / split} and {path.parent}); add the image or fix data.root"
    )


def records_to_coco(
    records: Sequence[ImageRecord],
    class_names: Sequence[str],
    category_ids: Sequence[Any] | None = None,
    image_ids: Sequence[Any] | None = None,
    root: str | Path | None = None,
) -> dict[str, Any]:
    """A COCO detection dict of ``records``: boxes out through :func:`continuous_to_coco`,
    ``area`` the box area, ``difficult`` as ``iscrowd``.

    ``category_ids`` (K,): the id of each class (default 1 … K); ``image_ids`` (N,): each
    record's (default its image id); ``root``: file names relative to it (default the name).
    """
    category_ids = list(category_ids or range(1, len(class_names) + 1))
    image_ids = list(image_ids or [r.image_id for r in records])
    images, annotations = [], []
    for record, image_id in zip(records, image_ids, strict=True):
        file_name = record.path.relative_to(root).as_posix() if root else record.path.name
        images.append(
            {"id": image_id, "file_name": file_name, "height": record.height, "width": record.width}
        )
        for box, label, crowd in zip(
            continuous_to_coco(record.gt_boxes).tolist(),
            record.gt_labels.tolist(),
            record.difficult.tolist(),
            strict=True,
        ):
            annotations.append(
                {
                    "id": len(annotations) + 1,  # pycocotools wants ids ≥ 1
                    "image_id": image_id,
                    "category_id": category_ids[label],
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": int(crowd),
                }
            )
    categories = [
        {"id": cid, "name": name} for cid, name in zip(category_ids, class_names, strict=True)
    ]
    return {"images": images, "annotations": annotations, "categories": categories}
