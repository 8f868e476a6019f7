"""image.py: shorter-side resizing (docs/method.md#image-scales) and the two normalisations."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from spp_detect.errors import UserError
from spp_detect.image import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    flip_image,
    image_to_tensor,
    read_image,
    resize_short_side,
    resized_hw,
)


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
