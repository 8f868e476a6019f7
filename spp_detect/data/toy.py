"""A deterministic toy detection dataset in VOC layout: the embedded default for the demo and tests.

Three classes that differ in shape **and** colour family, so that even a random-weight backbone
plus trained classifiers separates them: reddish ellipses (``circle``), greenish rectangles
(``square``) and bluish stretched triangles (``triangle``). Images are 200–500 px a side (width and
height drawn independently) with a grey, softly textured and noisy background; each holds 1–4
filled objects from about 20 px to most of the image, of varied aspect ratios. Objects drawn later
may hide part of earlier ones (never more than half of one); the box is the full extent of the
shape. The tiniest objects are marked ``difficult``.

Same arguments → byte-identical files: each image draws from its own ``numpy`` generator seeded
by ``(seed, split, index)`` (so the test split does not change with ``num_train``), OpenCV draws
and JPEG-encodes at a fixed quality, and the XML text is written by hand.

The dataset is written into a hidden sibling folder and moved into place at the end, so a killed
run never leaves a folder that looks complete. ``toy.json`` in the result records the arguments:
when ``out`` already holds a toy set made with the same arguments it is kept as is; one made with
other arguments is replaced; any other non-empty folder is refused.
"""

from __future__ import annotations

import colorsys
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from spp_detect.errors import UserError

logger = logging.getLogger(__name__)

TOY_CLASSES = ("circle", "square", "triangle")
TOY_FORMAT = 1  # bump when the generator's output changes, so old folders get regenerated
MARKER = "toy.json"  # written last inside the dataset; its presence means the set is complete
SPLITS = ("trainval", "test")

IMAGE_SIDE = (200, 500)  # px, each of width and height drawn independently
OBJECTS_PER_IMAGE = (1, 4)  # inclusive
OBJECT_SIDE_MIN = 20.0  # px, smallest sqrt(w·h) of an object
OBJECT_SIDE_MAX_FRACTION = 0.85  # largest sqrt(w·h) as a fraction of the image's shorter side
ASPECT_RANGE = (0.5, 2.0)  # width / height of an object's box, log-uniform
DIFFICULT_SIDE = 23.0  # px: objects with sqrt(w·h) below this are difficult (about 5 % of them)
MIN_VISIBLE = 0.5  # an object keeps at least this fraction of its pixels visible
PLACEMENT_TRIES = 30  # random positions tried before an object is dropped
JPEG_QUALITY = 90
# Colour families (hue in degrees, HSV): reddish, greenish, bluish; per object jitter below.
CLASS_HUES = {"circle": 0.0, "square": 125.0, "triangle": 225.0}
HUE_JITTER = 14.0  # degrees
SATURATION_RANGE = (0.6, 1.0)
VALUE_RANGE = (0.55, 1.0)
BACKGROUND_GREY = (95, 165)  # mean grey level of a background
BACKGROUND_TINT = 8.0  # max per-channel offset from grey
GRADIENT_AMPLITUDE = 30.0  # grey levels across the image
TEXTURE_AMPLITUDE = 12.0  # grey levels of the smooth blotchy texture
NOISE_SIGMA = 5.0  # grey levels of per-pixel noise (objects included)


@dataclass(frozen=True)
class ToyObject:
    """One drawn object: its class and box in VOC 1-based inclusive pixel indices."""

    name: str
    xmin: int
    ymin: int
    xmax: int
    ymax: int
    difficult: bool


def make_toy_dataset(out: Path, num_train: int = 60, num_test: int = 30, seed: int = 0) -> str:
    """Write the toy dataset to ``out`` (VOC layout) and return a one-line summary."""
    out = Path(out).absolute()  # a name for the hidden sibling folder even when out is "."
    started = time.perf_counter()
    params = {"format": TOY_FORMAT, "num_train": num_train, "num_test": num_test, "seed": seed,
              "classes": list(TOY_CLASSES)}  # fmt: skip
    if _existing_params(out) == params:
        return f"toy dataset already in {out} ({num_train} trainval + {num_test} test images)"
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        objects = _write_dataset(tmp, {"trainval": num_train, "test": num_test}, seed)
        (tmp / MARKER).write_text(json.dumps(params, indent=2) + "\n")
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    counts = {name: sum(o.name == name for o in objects) for name in TOY_CLASSES}
    per_class = ", ".join(f"{name} {count}" for name, count in counts.items())
    return (
        f"toy dataset in {out}: {num_train} trainval + {num_test} test images, {len(objects)} "
        f"objects ({per_class}; {sum(o.difficult for o in objects)} difficult) in "
        f"{time.perf_counter() - started:.1f} s"
    )


def _existing_params(out: Path) -> dict | None:
    """The arguments of a complete toy set at ``out``; None when ``out`` is absent or empty."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    marker = out / MARKER
    if not out.is_dir() or not marker.is_file():
        raise UserError(
            f"{out}: exists and is not a toy dataset; choose another folder or delete it"
        )
    try:
        return json.loads(marker.read_text())
    except ValueError:
        return {}


def _move_into_place(tmp: Path, out: Path) -> None:
    """Replace ``out`` by ``tmp``; ``out`` is either the old complete set or the new one."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)


def _write_dataset(root: Path, num_images: dict[str, int], seed: int) -> list[ToyObject]:
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    everything: list[ToyObject] = []
    for split_index, split in enumerate(SPLITS):
        ids = [f"{split}_{i + 1:05d}" for i in range(num_images[split])]
        for index, image_id in enumerate(ids):
            rng = np.random.default_rng([seed, split_index, index])
            image, objects = draw_image(rng, first_class=index % len(TOY_CLASSES))
            ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
            if not ok:
                raise RuntimeError(f"JPEG encoding failed for {image_id}")
            (root / "JPEGImages" / f"{image_id}.jpg").write_bytes(encoded.tobytes())
            xml = annotation_xml(image_id, image.shape[0], image.shape[1], objects)
            (root / "Annotations" / f"{image_id}.xml").write_text(xml)
            everything += objects
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return everything


def draw_image(
    rng: np.random.Generator, first_class: int = 0
) -> tuple[np.ndarray, list[ToyObject]]:
    """One BGR uint8 (H, W, 3) image and its objects; the first object has class ``first_class``
    (cycling it over images puts every class in every split)."""
    height, width = (int(v) for v in rng.integers(IMAGE_SIDE[0], IMAGE_SIDE[1] + 1, size=2))
    canvas = _background(rng, height, width)
    owner = np.full((height, width), -1, dtype=np.int32)  # index of the object on top of a pixel
    areas: list[int] = []
    objects: list[ToyObject] = []
    count = int(rng.integers(OBJECTS_PER_IMAGE[0], OBJECTS_PER_IMAGE[1] + 1))
    for slot in range(count):
        label = first_class if slot == 0 else int(rng.integers(len(TOY_CLASSES)))
        name = TOY_CLASSES[label]
        mask = _place(rng, name, height, width, owner, areas)
        if mask is None:
            continue
        rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        side = float(np.sqrt((cols[-1] - cols[0] + 1) * (rows[-1] - rows[0] + 1)))
        canvas[mask] = _object_colour(rng, name, int(mask.sum()))
        owner[mask] = len(areas)
        areas.append(int(mask.sum()))
        objects.append(ToyObject(name, int(cols[0]) + 1, int(rows[0]) + 1, int(cols[-1]) + 1,
                                 int(rows[-1]) + 1, difficult=side < DIFFICULT_SIDE))  # fmt: skip
    canvas += rng.normal(0.0, NOISE_SIGMA, size=canvas.shape).astype(np.float32)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), objects


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Grey float32 (H, W, 3): a slight tint, a soft linear gradient and a blotchy texture."""
    grey = rng.uniform(*BACKGROUND_GREY) + rng.uniform(-BACKGROUND_TINT, BACKGROUND_TINT, size=3)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = (np.cos(angle) * xs / width + np.sin(angle) * ys / height).astype(np.float32)
    ramp = (ramp - ramp.mean()) * rng.uniform(0.3, 1.0) * GRADIENT_AMPLITUDE
    cells = int(rng.integers(4, 16))
    coarse = rng.uniform(-1.0, 1.0, size=(cells, cells)).astype(np.float32)
    texture = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC) * TEXTURE_AMPLITUDE
    canvas = np.empty((height, width, 3), dtype=np.float32)
    canvas[:] = grey.astype(np.float32)
    canvas += (ramp + texture)[:, :, None]
    return canvas


def _place(
    rng: np.random.Generator,
    name: str,
    height: int,
    width: int,
    owner: np.ndarray,
    areas: list[int],
) -> np.ndarray | None:
    """A bool (H, W) mask of a new shape that leaves every earlier object at least half visible."""
    for _ in range(PLACEMENT_TRIES):
        mask = _shape_mask(rng, name, height, width)
        hidden = np.bincount(owner[mask & (owner >= 0)], minlength=len(areas))
        visible = np.bincount(owner[owner >= 0], minlength=len(areas)) - hidden
        if all(visible[i] >= MIN_VISIBLE * areas[i] for i in range(len(areas))):
            return mask
    return None


def _shape_mask(rng: np.random.Generator, name: str, height: int, width: int) -> np.ndarray:
    max_side = OBJECT_SIDE_MAX_FRACTION * min(height, width)
    side = np.exp(rng.uniform(np.log(OBJECT_SIDE_MIN), np.log(max_side)))
    aspect = np.exp(rng.uniform(np.log(ASPECT_RANGE[0]), np.log(ASPECT_RANGE[1])))
    box_w = int(min(round(side * np.sqrt(aspect)), width - 2))
    box_h = int(min(round(side / np.sqrt(aspect)), height - 2))
    x0 = int(rng.integers(0, width - box_w))
    y0 = int(rng.integers(0, height - box_h))
    x1, y1 = x0 + box_w - 1, y0 + box_h - 1  # inclusive last pixel
    mask = np.zeros((height, width), dtype=np.uint8)
    if name == "circle":
        center = ((x0 + x1) / 2.0, (y0 + y1) / 2.0)
        cv2.ellipse(mask, (center, (float(box_w), float(box_h)), 0.0), 1, thickness=-1)
    elif name == "square":
        cv2.rectangle(mask, (x0, y0), (x1, y1), 1, thickness=-1)
    else:
        apex_x = round(x0 + rng.uniform(0.15, 0.85) * (box_w - 1))
        base_y, apex_y = (y1, y0) if rng.random() < 0.75 else (y0, y1)  # a quarter point down
        points = np.array([[x0, base_y], [x1, base_y], [apex_x, apex_y]], dtype=np.int32)
        cv2.fillPoly(mask, [points], 1)
    return mask.astype(bool)


def _object_colour(rng: np.random.Generator, name: str, num_pixels: int) -> np.ndarray:
    """BGR float32 (P, 3): the object's jittered colour with a gentle per-pixel variation."""
    hue = (CLASS_HUES[name] + rng.uniform(-HUE_JITTER, HUE_JITTER)) % 360.0
    rgb = colorsys.hsv_to_rgb(
        hue / 360.0, rng.uniform(*SATURATION_RANGE), rng.uniform(*VALUE_RANGE)
    )
    bgr = np.array(rgb[::-1], dtype=np.float32) * 255.0
    shade = rng.uniform(-6.0, 6.0, size=(num_pixels, 1)).astype(np.float32)
    return bgr[None, :] + shade


def annotation_xml(image_id: str, height: int, width: int, objects: list[ToyObject]) -> str:
    """VOC annotation text; coordinates are 1-based inclusive integers as in VOC."""
    parts = [
        "<annotation>",
        "\t<folder>toy</folder>",
        f"\t<filename>{image_id}.jpg</filename>",
        "\t<source><database>spp-detect toy</database></source>",
        f"\t<size><width>{width}</width><height>{height}</height><depth>3</depth></size>",
        "\t<segmented>0</segmented>",
    ]
    for obj in objects:
        parts += [
            "\t<object>",
            f"\t\t<name>{obj.name}</name>",
            "\t\t<pose>Unspecified</pose>",
            "\t\t<truncated>0</truncated>",
            f"\t\t<difficult>{int(obj.difficult)}</difficult>",
            f"\t\t<bndbox><xmin>{obj.xmin}</xmin><ymin>{obj.ymin}</ymin>"
            f"<xmax>{obj.xmax}</xmax><ymax>{obj.ymax}</ymax></bndbox>",
            "\t</object>",
        ]
    parts.append("</annotation>")
    return "\n".join(parts) + "\n"
