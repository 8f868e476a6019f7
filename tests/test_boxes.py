import math

import numpy as np
import pytest
import torch

from spp_detect.ops.boxes import (
    MAX_LOG_SCALE,
    clip_boxes,
    decode_deltas,
    encode_deltas,
    flip_boxes,
)
from spp_detect.testing import cpu_and_cuda, uniform_boxes

CORNER_MAX, SIDES = 400, (10, 200)  # px; size ratios stay below the log cap


def test_encode_hand_case():
    proposal = np.array([[0.0, 0.0, 10.0, 20.0]])
    gt = np.array([[5.0, 0.0, 25.0, 10.0]])
    # p: centre (5, 10), size (10, 20); g: centre (15, 5), size (20, 10)
    expected = [[1.0, -0.25, math.log(2.0), math.log(0.5)]]
    np.testing.assert_allclose(encode_deltas(proposal, gt), expected, atol=1e-12)


def test_decode_hand_case():
    proposal = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    deltas = torch.tensor([[1.0, -0.25, math.log(2.0), math.log(0.5)]])
    decoded = decode_deltas(proposal, deltas)
    assert isinstance(decoded, torch.Tensor) and decoded.dtype == torch.float32
    torch.testing.assert_close(decoded, torch.tensor([[5.0, 0.0, 25.0, 10.0]]))


def test_zero_deltas_keep_the_box():
    boxes = uniform_boxes(np.random.default_rng(0), 50, CORNER_MAX, SIDES)
    np.testing.assert_allclose(decode_deltas(boxes, np.zeros_like(boxes)), boxes, atol=1e-9)


@pytest.mark.parametrize("to_kind", [np.asarray, torch.from_numpy])
def test_decode_inverts_encode(to_kind):
    proposals, gt = (
        uniform_boxes(np.random.default_rng(1), 200, CORNER_MAX, SIDES),
        uniform_boxes(np.random.default_rng(2), 200, CORNER_MAX, SIDES),
    )
    deltas = encode_deltas(to_kind(proposals), to_kind(gt))
    assert type(deltas) is type(to_kind(proposals))
    decoded = decode_deltas(to_kind(proposals), deltas)
    np.testing.assert_allclose(np.asarray(decoded), gt, atol=1e-9)


def test_float32_keeps_dtype():
    proposals = uniform_boxes(np.random.default_rng(3), 10, CORNER_MAX, SIDES).astype(np.float32)
    deltas = encode_deltas(proposals, proposals + 1)
    assert deltas.dtype == np.float32
    assert decode_deltas(proposals, deltas).dtype == np.float32


def test_decode_caps_log_scale():
    decoded = decode_deltas(np.array([[0.0, 0.0, 1.0, 1.0]]), np.array([[0, 0, 1e4, 1e4]]))
    assert np.isfinite(decoded).all()
    np.testing.assert_allclose(decoded[0, 2] - decoded[0, 0], math.exp(MAX_LOG_SCALE), rtol=1e-9)


def test_flip_hand_case_and_twice_is_identity():
    boxes = np.array([[0.0, 1.0, 10.0, 5.0], [90.0, 2.0, 100.0, 3.0]], np.float32)
    flipped = flip_boxes(boxes, 100)
    np.testing.assert_array_equal(flipped, [[90, 1, 100, 5], [0, 2, 10, 3]])
    np.testing.assert_array_equal(flip_boxes(flipped, 100), boxes)
    # 1-based inclusive equivalence (docs/method.md#conventions-and-box-format): x1' = W + 1 − x2
    # with x1_1b = x1 + 1, x2_1b = x2
    one_based_x1 = 100 + 1 - boxes[:, 2]
    np.testing.assert_array_equal(flipped[:, 0] + 1, one_based_x1)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_clip(device):
    boxes = torch.tensor([[-5.0, -1.0, 120.0, 30.0], [10.0, 10.0, 20.0, 20.0]], device=device)
    clipped = clip_boxes(boxes, (25, 100))
    expected = torch.tensor([[0.0, 0.0, 100.0, 25.0], [10, 10, 20, 20]], device=device)
    torch.testing.assert_close(clipped, expected)
    assert clip_boxes(boxes.cpu().numpy(), (25, 100)).shape == (2, 4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_clip_of_an_array_is_the_tensor_clip_bit_for_bit(dtype):
    """Arrays are clipped without torch (the proposal workers do not load it), to the same
    bits as a tensor: NaN and -0.0 pass unchanged, integers come back as float32."""
    boxes = (np.random.default_rng(0).normal(size=(500, 4)) * 150).astype(dtype)
    if dtype != np.int64:
        boxes[0] = [-0.0, np.nan, np.inf, -np.inf]
    from_array = clip_boxes(boxes, (100, 120))
    from_tensor = clip_boxes(torch.from_numpy(boxes), (100, 120)).numpy()
    assert from_array.dtype == from_tensor.dtype and from_array.tobytes() == from_tensor.tobytes()


def test_empty_inputs():
    empty = np.zeros((0, 4), np.float32)
    assert encode_deltas(empty, empty).shape == (0, 4)
    assert decode_deltas(empty, empty).shape == (0, 4)
    assert clip_boxes(empty, (10, 10)).shape == (0, 4)
    assert flip_boxes(empty, 10).shape == (0, 4)


def test_paired_iou_is_the_diagonal_of_box_iou():
    from torchvision.ops import box_iou

    from spp_detect.ops.boxes import paired_iou

    generator = torch.Generator().manual_seed(0)
    corner = torch.rand((200, 2), generator=generator) * 100
    size = torch.rand((200, 2), generator=generator) * 50 + 1
    first = torch.cat([corner, corner + size], dim=1)
    second = first + torch.randn((200, 4), generator=generator) * 10
    second[:, 2:] = torch.maximum(second[:, 2:], second[:, :2] + 1)
    torch.testing.assert_close(paired_iou(first, second), box_iou(first, second).diagonal())
    assert paired_iou(first.numpy(), first.numpy()) == pytest.approx(np.ones(200))
    disjoint = torch.tensor([[0.0, 0, 1, 1]]), torch.tensor([[2.0, 2, 3, 3]])
    assert float(paired_iou(*disjoint)[0]) == 0.0
