"""image.py: shorter-side resizing (docs/method.md#image-scales) and the two normalisations."""

from __future__ import annotations

import struct
import warnings
import zlib

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from spp_detect.data.image import (
    EXIF_ORIENTATION_TAG,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MAX_IMAGE_PIXELS,
    flip_image,
    image_header,
    image_to_tensor,
    read_image,
    resize_short_side,
    resized_hw,
)
from spp_detect.errors import UserError


@pytest.mark.parametrize(
    ("image_hw", "short", "cap", "expected"),
    [
        ((375, 500), 600, 0, (600, 800)),
        ((500, 375), 600, 0, (800, 600)),  # portrait
        ((333, 500), 1200, 0, (1200, 1802)),  # 1801.8 → 1802, no cap (docs/method.md#image-scales)
        ((2, 3), 3, 0, (3, 5)),  # 4.5 → 5: halves round up
        ((100, 100), 224, 0, (224, 224)),
        ((333, 500), 1200, 1000, (666, 1000)),  # capped: short = round(1000·333/500)
        ((333, 500), 480, 1000, (480, 721)),  # under the cap: unchanged
        ((500, 333), 1200, 1000, (1000, 666)),
    ],
)
def test_resized_hw(image_hw, short, cap, expected):
    assert resized_hw(image_hw, short, cap) == expected


def test_resize_is_cv2_bilinear():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    resized = resize_short_side(image, 80)
    assert resized.shape == (80, 115, 3) and resized.dtype == np.uint8
    assert np.array_equal(resized, cv2.resize(image, (115, 80), interpolation=cv2.INTER_LINEAR))
    assert resize_short_side(image, 37) is image  # already the right size


def test_caffe_normalization_is_bgr_minus_128():
    image = np.zeros((2, 3, 3), dtype=np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 10, 20, 200  # R, G, B
    tensor = image_to_tensor(image, "caffe_bgr")
    assert tensor.shape == (3, 2, 3) and tensor.dtype == torch.float32
    assert tensor[:, 0, 0].tolist() == [200 - 128, 20 - 128, 10 - 128]  # B, G, R


def test_imagenet_normalization():
    image = np.full((4, 5, 3), 255, dtype=np.uint8)
    image[0, 0] = (0, 128, 255)
    tensor = image_to_tensor(image, "imagenet")
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    expected = (torch.tensor([0.0, 128.0, 255.0]) / 255 - mean) / std
    assert torch.allclose(tensor[:, 0, 0], expected)
    assert torch.allclose(tensor[:, 1, 1], (1 - mean) / std)
    with pytest.raises(ValueError):
        image_to_tensor(image, "bgr")


def test_flip_image():
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    flipped = flip_image(image)
    assert np.array_equal(flipped[:, 0], image[:, 2]) and flipped.flags.c_contiguous


def test_read_image_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_image(tmp_path / "missing.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match="not a readable image"):
        read_image(tmp_path / "bad.jpg")


# --- inputs from the wild (issue 27) ---------------------------------------------------------


def _save_with_orientation(path, pixels: np.ndarray, orientation: int) -> None:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = orientation
    Image.fromarray(pixels).save(path, exif=exif)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_pil_does(tmp_path, orientation, suffix):
    """Every EXIF orientation turns the pixels upright exactly as PIL's exif_transpose does,
    and the header gives the upright size; before, the stored pixels were returned."""
    pixels = np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    path = tmp_path / f"photo{suffix}"
    _save_with_orientation(path, pixels, orientation)
    with Image.open(path) as stored:
        expected = np.asarray(ImageOps.exif_transpose(stored).convert("RGB"))
    got = read_image(path)
    assert got.shape == expected.shape
    if suffix == ".png":  # lossless: the very pixels
        np.testing.assert_array_equal(got, expected)
    assert image_header(path) == (got.shape[:2], orientation)


def _png_header(path, width: int, height: int) -> None:
    """A PNG of a header only (no pixel data): PIL reads its size without decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))


def test_a_decompression_bomb_is_one_line_and_a_large_image_no_raw_warning(tmp_path):
    """Over PIL's bomb limit: one UserError naming the file and the fix (was PIL's
    DecompressionBombError, a traceback); 108 MP: read without PIL's raw warning."""
    bomb = tmp_path / "bomb.png"
    _png_header(bomb, 20_000, 10_000)
    assert MAX_IMAGE_PIXELS < 20_000 * 10_000
    for read in (image_header, read_image):
        with pytest.raises(UserError, match=rf"^{bomb}: more than 178,956,970 pixels.*downscale"):
            read(bomb)
    large = tmp_path / "large.png"
    _png_header(large, 12_000, 9_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert image_header(large) == ((9_000, 12_000), 1)


def test_an_empty_file_is_named_as_such_with_the_callers_fix(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match=r"empty file \(0 bytes\), not an image; replace the file"):
        read_image(empty)
    with pytest.raises(UserError, match=r"not an image; pass an image file$"):
        read_image(empty, fix="pass an image file")
