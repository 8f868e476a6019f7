"""Reading images, resizing them to a shorter side, and normalising them for a backbone.

Images are numpy uint8 (H, W, 3) in RGB order everywhere in the package.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from spp_detect.errors import UserError

logger = logging.getLogger(__name__)

if TYPE_CHECKING:  # torch is imported where tensors are made: proposal workers never need it
    import torch


# The pixels are decoded as stored, then turned upright by our own reading of the EXIF
# Orientation tag (upright_pixels), the one image_header reads the sizes with: photo viewers and
# annotation tools show the picture upright, and its boxes are drawn on that
# (docs/method.md#image-scales, "Pixels").
_DECODE_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
EXIF_ORIENTATION_TAG = 0x0112  # TIFF/EXIF tag 274, Orientation
# Orientations 5-8 turn the stored pixels by 90 degrees (EXIF 2.32, Orientation): W and H swap.
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
# Pillow's decompression-bomb error limit (2 x PIL.Image.MAX_IMAGE_PIXELS): more pixels than
# this are refused, so that a small file cannot make a stage allocate gigabytes.
MAX_IMAGE_PIXELS = 2 * 89_478_485
DATASET_FIX = "replace the file or drop its id from the split"


def read_image(path: str | Path, fix: str = DATASET_FIX) -> np.ndarray:
    """Decode an image file to uint8 (H, W, 3) RGB, upright (its EXIF orientation applied);
    grayscale is replicated to 3 channels.

    A file that decodes only partially (a JPEG cut short, common in scraped datasets) is used
    as decoded, as ``cv2.imread`` does, with one WARNING per file; ``cv2.imdecode`` alone
    refuses it. A file that does not decode at all is a :class:`UserError` ending in ``fix``.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: image not found; check the path")
    data = np.fromfile(path, dtype=np.uint8)
    if not data.size:
        raise UserError(f"{path}: an empty file (0 bytes), not an image; {fix}")
    _, orientation = image_header(path, fix, required=False)
    image = cv2.imdecode(data, _DECODE_FLAGS)
    if image is None:
        image = cv2.imread(str(path), _DECODE_FLAGS)  # libjpeg's tolerant path
        if image is not None:
            _warn_partial(path)
    if image is None:
        raise UserError(f"{path}: not a readable image; {fix}")
    return upright_pixels(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), orientation)


def image_header(
    path: Path, fix: str = DATASET_FIX, required: bool = True
) -> tuple[tuple[int, int], int]:
    """(H, W) of the picture upright, and its EXIF orientation (1 when it has none), from the
    file header only (PIL opens lazily; no pixel is decoded).

    More than ``MAX_IMAGE_PIXELS`` is a :class:`UserError`. A header PIL cannot read is one too,
    unless not ``required`` (``read_image``: OpenCV reads formats PIL does not): ((0, 0), 1).
    """
    try:
        with warnings.catch_warnings():  # our own limit below, not PIL's raw warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                orientation = _orientation(image)
    except Image.DecompressionBombError:  # PIL's own check, at twice its warning limit
        raise UserError(_too_many_pixels(path, fix)) from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        if not required:
            return (0, 0), 1
        raise UserError(f"{path}: not a readable image ({type(exc).__name__}); {fix}") from None
    if width * height > MAX_IMAGE_PIXELS:
        raise UserError(_too_many_pixels(path, fix))
    if orientation in TRANSPOSING_ORIENTATIONS:
        return (width, height), orientation
    return (height, width), orientation


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) of the picture upright (its EXIF orientation applied, as
    :func:`read_image` decodes it), from the file header only."""
    return image_header(path)[0]


def _too_many_pixels(path: Path, fix: str) -> str:
    return (
        f"{path}: more than {MAX_IMAGE_PIXELS:,} pixels, the limit against decompression bombs; "
        f"downscale the image (e.g. to 10,000 px on its longer side) or {fix}"
    )


def _orientation(image: Image.Image) -> int:
    """The EXIF Orientation of an opened image, 1 (as stored) when absent or unusable."""
    if image.format == "PNG" and "exif" not in image.info:
        return 1  # an eXIf chunk after the pixel data: PIL would decode every pixel to find it
    try:
        value = image.getexif().get(EXIF_ORIENTATION_TAG, 1)
    except (OSError, ValueError, SyntaxError):  # a damaged EXIF block: no orientation
        return 1
    return value if value in range(1, 9) else 1


def upright_pixels(image: np.ndarray, orientation: int) -> np.ndarray:
    """Stored pixels (H, W, C) turned upright as EXIF ``orientation`` (1-8) says, contiguous;
    the same transforms as ``PIL.ImageOps.exif_transpose``."""
    turned = {
        2: lambda a: a[:, ::-1],  # mirrored left-right
        3: lambda a: a[::-1, ::-1],  # rotated 180
        4: lambda a: a[::-1],  # mirrored top-bottom
        5: lambda a: a.transpose(1, 0, 2),  # transposed
        6: lambda a: np.rot90(a, k=-1),  # rotated 90 clockwise
        7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],  # transversed
        8: lambda a: np.rot90(a, k=1),  # rotated 90 anticlockwise
    }.get(orientation)
    return image if turned is None else np.ascontiguousarray(turned(image))


_warned_partial: set[Path] = set()


def _warn_partial(path: Path) -> None:
    if path not in _warned_partial:
        _warned_partial.add(path)
        logger.warning(
            "%s: truncated or damaged image, decoded partially (the rest is grey); "
            "replace the file to use all of it",
            path,
        )


# Pixel means and normalisations, chosen by the backbone's weights (docs/method.md#image-scales,
# "Pixels"); every pixel mean of the package is here.
CAFFE_PIXEL_MEAN = 128.0  # subtracted from every BGR channel, no /255 (docs/method.md#image-scales)
# py-faster-rcnn lib/fast_rcnn/config.py __C.PIXEL_MEANS (B, G, R): the one mean Fast/Faster
# R-CNN feed all their ImageNet Caffe models (CaffeNet, VGG16) with, from 0–255 pixels.
FAST_RCNN_PIXEL_MEANS = (102.9801, 115.9465, 122.7717)
# The per-channel (B, G, R) means of Caffe's ilsvrc_2012_mean.binaryproto (python/caffe/imagenet/
# ilsvrc_2012_mean.npy averaged over its 256×256 pixels, as Caffe's classification example
# prints them): the mean image the BVLC AlexNet and CaffeNet models were trained with.
ILSVRC_2012_BGR_MEAN = (104.0069879317889, 116.66876761696767, 122.6789143406786)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # RGB mean of torchvision's ImageNet weights, after /255
IMAGENET_STD = (0.229, 0.224, 0.225)  # RGB std of torchvision's ImageNet weights, after /255
# TensorFlow's EfficientNet-Lite preprocessing (efficientnet_lite_builder.py MEAN_RGB, STDDEV_RGB)
LITE_PIXEL_MEAN = 127.0
LITE_PIXEL_STD = 128.0
# and "caffe_bgr:B,G,R" (caffe_bgr_normalization)
NORMALIZATIONS = ("caffe_bgr", "imagenet", "rgb127")
_CAFFE_BGR_PREFIX = "caffe_bgr:"


def caffe_bgr_normalization(bgr_mean: Sequence[float]) -> str:
    """The normalisation of BGR 0–255 pixels minus ``bgr_mean`` (B, G, R): "caffe_bgr" when
    that is ``CAFFE_PIXEL_MEAN`` everywhere, else "caffe_bgr:B,G,R" (the mean of a model
    converted from Caffe, ``spp_detect.models.caffe``). ``repr`` keeps every float exactly."""
    values = tuple(float(value) for value in bgr_mean)
    if values == (CAFFE_PIXEL_MEAN,) * 3:
        return "caffe_bgr"
    return _CAFFE_BGR_PREFIX + ",".join(repr(value) for value in values)


def caffe_bgr_mean(normalization: str) -> tuple[float, ...] | None:
    """The (B, G, R) mean of a "caffe_bgr" normalisation; None for any other."""
    if normalization == "caffe_bgr":
        return (CAFFE_PIXEL_MEAN,) * 3
    if normalization.startswith(_CAFFE_BGR_PREFIX):
        return tuple(float(v) for v in normalization.removeprefix(_CAFFE_BGR_PREFIX).split(","))
    return None


def resized_hw(
    image_hw: tuple[int, int], short_side: int, max_long_side: int = 0
) -> tuple[int, int]:
    """(H, W) after resizing the shorter side to ``short_side`` (docs/method.md#image-scales).

    The longer side becomes round(s·long/short), halves rounded up. With ``max_long_side`` > 0
    and a longer side above it, the longer side becomes the cap and the shorter side
    round(cap·short/long) instead (the image keeps its aspect ratio).
    """
    height, width = image_hw
    short, long = min(height, width), max(height, width)
    new_short, new_long = short_side, _round_ratio(short_side * long, short)
    if max_long_side > 0 and new_long > max_long_side:
        new_short, new_long = max(1, _round_ratio(max_long_side * short, long)), max_long_side
    return (new_short, new_long) if height <= width else (new_long, new_short)


def _round_ratio(numerator: int, denominator: int) -> int:
    """round(numerator / denominator) with halves up, in exact integer arithmetic."""
    return (2 * numerator + denominator) // (2 * denominator)


def resize_short_side(image: np.ndarray, short_side: int, max_long_side: int = 0) -> np.ndarray:
    """uint8 (H, W, 3) → (H', W', 3) with the shorter side ``short_side``; bilinear, no antialias
    (``cv2.INTER_LINEAR``, as the original's imresize with antialiasing off,
    docs/method.md#image-scales)."""
    height, width = resized_hw(image.shape[:2], short_side, max_long_side)
    if (height, width) == image.shape[:2]:
        return image
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)


def image_to_tensor(
    image: np.ndarray, normalization: str, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """uint8 (H, W, 3) RGB → float32 (3, H, W) on ``device``, normalised for the weights.

    "caffe_bgr": channels reordered to BGR, 0–255 minus 128 (ZF-5). "caffe_bgr:B,G,R": the
    same minus that BGR mean (weights converted from Caffe). "imagenet": /255, then ImageNet
    mean/std per RGB channel (torchvision weights). "rgb127": RGB, (x − 127) / 128 (the
    EfficientNet-Lite weights). See docs/method.md#image-scales.
    """
    import torch

    pixels = torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1).float()
    bgr_mean = caffe_bgr_mean(normalization)
    if bgr_mean is not None:
        return pixels.flip(0) - torch.tensor(bgr_mean, device=pixels.device).view(3, 1, 1)
    if normalization == "rgb127":
        return (pixels - LITE_PIXEL_MEAN) / LITE_PIXEL_STD
    if normalization == "imagenet":
        mean = torch.tensor(IMAGENET_MEAN, device=pixels.device).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=pixels.device).view(3, 1, 1)
        return (pixels / 255.0 - mean) / std
    raise ValueError(
        f"normalization must be one of {NORMALIZATIONS} or caffe_bgr:B,G,R, got {normalization!r}"
    )


def flip_image(image: np.ndarray) -> np.ndarray:
    """The horizontally flipped image (columns reversed), contiguous."""
    return np.ascontiguousarray(image[:, ::-1])
