"""The one split reader: a split's annotated images from a VOC-layout folder or a COCO file,
read once per process.

Parsing 5,000 annotations and image headers takes seconds, and a stage reads its split again to
close (its data digest), `run` once per stage. A later read reuses the records while every file
they came from (split list or annotation file, each XML, each image) has the size and
modification time it had.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from spp_detect.data import coco, voc
from spp_detect.runtime.artifacts import file_identity
from spp_detect.structures import ImageRecord


class SplitRead(NamedTuple):
    """A split as read: its records, the file that lists them, and where its class names are
    (for hints)."""

    records: list[ImageRecord]
    listing: Path
    class_names_from: str


# Splits read by this process: key → (stamp of their files, the split as read).
_READ_SPLITS: dict[tuple, tuple[tuple, SplitRead]] = {}


def read_split(
    data_format: str, root: str | Path, annotations: str, split: str, classes: Sequence[str]
) -> SplitRead:
    """The images of ``split`` (``data_format`` "voc" or "coco", whose file ``annotations``
    names) under ``root``, their labels indexing ``classes``; see the module docstring."""
    key = (data_format, str(Path(root).resolve()), annotations, split, tuple(classes))
    if key in _READ_SPLITS:
        stamp, found = _READ_SPLITS[key]
        if _split_stamp(data_format, root, found) == stamp:
            return found
    found = _parse_split(data_format, Path(root), annotations, split, classes)
    _READ_SPLITS[key] = (_split_stamp(data_format, root, found), found)
    return found


def _split_stamp(data_format: str, root: str | Path, found: SplitRead) -> tuple:
    """Size and modification time of every file a split's records were read from."""
    paths = [found.listing, *(record.path for record in found.records)]
    if data_format != "coco":
        paths += [Path(root) / "Annotations" / f"{r.image_id}.xml" for r in found.records]
    return tuple(file_identity(path) for path in paths)


def _parse_split(
    data_format: str, root: Path, annotations: str, split: str, classes: Sequence[str]
) -> SplitRead:
    if data_format == "coco":
        path = coco.annotation_path(root, annotations, split)
        records = coco.read_split(root, path, split, classes)
        return SplitRead(records, path, f"category names of {path}")
    records = voc.read_split(root, split, classes)
    listing = root / "ImageSets/Main" / f"{split}.txt"
    return SplitRead(records, listing, f"<name>s of {root / 'Annotations'}")
