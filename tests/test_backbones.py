"""Backbones: geometry derived from the layer lists, ZF-5 as docs/method.md#conv-trunks, weights."""

from __future__ import annotations

import re
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spp_detect.data.image import ILSVRC_2012_BGR_MEAN, caffe_bgr_mean, image_to_tensor
from spp_detect.errors import UserError
from spp_detect.models import backbones
from spp_detect.models.backbones import (
    AcrossChannelLRN,
    WithinChannelLRN,
    conv_layer_index,
    lrn_before_pool,
    output_hw,
    receptive_center,
)
from spp_detect.models.weights import (
    LRN_BEFORE_POOL_KEY,
    build_backbone,
    load_classifier_state,
    trunk_state,
)
from spp_detect.testing import zf5_fmap_side  # conv5 size arithmetic by hand

# caffenet's default pixels: BGR minus the ILSVRC 2012 mean, as float32 (a converted file's mean)
CAFFENET_NORMALIZATION = "caffe_bgr:" + ",".join(
    repr(float(v)) for v in torch.tensor(ILSVRC_2012_BGR_MEAN, dtype=torch.float32)
)


def caffenet_fmap_side(side: int) -> int:
    """Caffe's size arithmetic for CaffeNet conv1–conv5 (conv ⌊(H + 2p − k)/s⌋ + 1, pooling
    ⌈(H + 2p − k)/s⌉ + 1): conv1 11/4 pad 0, pool 3/2, conv2 5 pad 2, pool 3/2, conv3–5 3 pad 1."""
    c1 = (side - 11) // 4 + 1
    p1 = -(-(c1 - 3) // 2) + 1
    c2 = (p1 + 2 * 2 - 5) // 1 + 1
    return -(-(c2 - 3) // 2) + 1


@pytest.fixture(scope="module")
def zf5() -> backbones.Backbone:
    return build_backbone("zf5", "none")


@pytest.fixture(scope="module")
def alexnet() -> backbones.Backbone:
    return build_backbone("alexnet", "none")


@pytest.mark.parametrize(
    ("name", "stride", "offset0", "channels", "normalization"),
    [
        ("zf5", 16, 21.0, 256, "caffe_bgr"),
        ("alexnet", 16, 16.0, 256, "imagenet"),
        ("vgg16", 16, 8.5, 512, "imagenet"),
        ("caffenet", 16, 18.0, 256, CAFFENET_NORMALIZATION),
    ],
)
def test_geometry_of_each_backbone(name, stride, offset0, channels, normalization):
    backbone = build_backbone(name, "none")
    assert (backbone.stride, backbone.offset0) == (stride, offset0)
    assert backbone.channels == channels
    assert backbone.normalization == normalization
    last = list(backbone.features)
    assert isinstance(last[-1], nn.ReLU) and isinstance(last[-2], nn.Conv2d)  # no final pool


def test_receptive_center_by_hand():
    # conv 3×3 pad 0: centre of cell 0 at pixel 1 (0-based); pool 2/2: +0.5·1; conv 5/2 pad 2: 0
    layers = [nn.Conv2d(1, 1, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(1, 1, 5, 2, 2)]
    assert receptive_center(layers) == (4, 1 + 0.5 + 1)


@pytest.mark.parametrize("side", [224, 480, 576, 688, 864, 874, 1200])
def test_zf5_map_sizes_match_spec(zf5, side):
    expected = {224: 13, 480: 29, 576: 35, 688: 42, 874: 53, 1200: 74}  # docs/method.md#conv-trunks
    assert zf5.output_hw((side, side)) == (zf5_fmap_side(side), zf5_fmap_side(side))
    if side in expected:
        assert zf5_fmap_side(side) == expected[side]


def test_zf5_forward_matches_size_arithmetic(zf5):
    with torch.no_grad():
        assert zf5(torch.zeros(1, 3, 224, 224)).shape == (1, 256, 13, 13)
        out = zf5(torch.randn(1, 3, 150, 227) * 60)
    assert out.shape[2:] == zf5.output_hw((150, 227)) == (zf5_fmap_side(150), zf5_fmap_side(227))
    assert bool((out >= 0).all())  # conv5 is post-ReLU


def test_alexnet_forward_matches_size_arithmetic(alexnet):
    with torch.no_grad():
        out = alexnet(torch.randn(1, 3, 224, 301))
    assert out.shape == (1, 256, *alexnet.output_hw((224, 301)))
    assert alexnet.output_hw((224, 224)) == (13, 13)


@pytest.fixture(scope="module")
def caffenet() -> backbones.Backbone:
    return build_backbone("caffenet", "none")


def test_caffenet_default_pixels_are_the_ilsvrc_2012_mean():
    assert caffe_bgr_mean(CAFFENET_NORMALIZATION) == pytest.approx((104.0, 116.7, 122.7), abs=0.05)
    assert backbones.DEFAULT_NORMALIZATION["caffenet"] == CAFFENET_NORMALIZATION


@pytest.mark.parametrize("side", [11, 67, 150, 224, 227, 301, 480, 576, 688, 864, 1200])
def test_caffenet_map_sizes_match_caffe_arithmetic(caffenet, side):
    assert caffenet.output_hw((side, side)) == (caffenet_fmap_side(side),) * 2
    expected = {227: 13, 224: 13, 480: 29, 688: 42, 1200: 74}  # 227: Caffe's deploy input → 13
    if side in expected:
        assert caffenet_fmap_side(side) == expected[side]


def test_caffenet_layers_and_ceil_mode_pooling(caffenet):
    pools = [m for m in caffenet.features if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 2 and all(p.ceil_mode and p.kernel_size == 3 for p in pools)
    # 55 → ⌈52/2⌉+1 = 27 as in Caffe (the 227 input's conv1 map); 56 → 28, floor would give 27
    assert output_hw(pools[:1], (55, 56)) == (27, 28)
    convs = [m for m in caffenet.features if isinstance(m, nn.Conv2d)]
    assert [c.groups for c in convs] == [1, 2, 1, 2, 2]
    assert [conv_layer_index(caffenet, f"conv{i}") for i in range(1, 6)] == [0, 4, 8, 10, 12]
    assert not lrn_before_pool(caffenet)  # CaffeNet's order: pool1, then norm1


def test_caffenet_extract_like_forward_with_random_weights(caffenet):
    """``none`` weights: a uint8 image normalised as extract does gives post-ReLU conv5 maps of
    Caffe's size."""
    image = np.random.default_rng(0).integers(0, 256, (150, 227, 3), dtype=np.uint8)
    pixels = image_to_tensor(image, caffenet.normalization)
    with torch.no_grad():
        out = caffenet(pixels[None])
    assert out.shape == (1, 256, caffenet_fmap_side(150), caffenet_fmap_side(227)) == (
        1, 256, *caffenet.output_hw((150, 227))
    )  # fmt: skip
    assert bool(out.isfinite().all()) and bool((out >= 0).all()) and float(out.max()) > 0
    again = build_backbone("caffenet", "none")
    for a, b in zip(caffenet.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_grouped_conv_is_caffes_group():
    """Caffe's ``group: 2`` convolves input channels 0…C/2−1 into outputs 0…F/2−1 and the rest
    into the rest; PyTorch's ``groups=2`` with the same (F, C/2, k, k) weight blob does too."""
    conv = build_backbone("caffenet", "none").features[4]  # conv2: 96 → 256 in two groups
    x = torch.randn(1, 96, 9, 9)
    halves = [
        F.conv2d(x[:, g * 48 : (g + 1) * 48], conv.weight[g * 128 : (g + 1) * 128],
                 conv.bias[g * 128 : (g + 1) * 128], padding=2)
        for g in range(2)
    ]  # fmt: skip
    with torch.no_grad():
        assert torch.allclose(conv(x), torch.cat(halves, dim=1), atol=1e-5)


def _across_channel_lrn_by_loops(x, size, alpha, beta, k):
    """Caffe's ACROSS_CHANNELS LRN (BVLC lrn_layer.cpp CrossChannelForward_cpu), by hand:
    scale_c = k + alpha/size · Σ x_c'² over c' = c − (size−1)/2 … c + (size−1)/2 inside 0…C−1."""
    out = torch.empty_like(x)
    channels, half = x.shape[1], (size - 1) // 2
    for c in range(channels):
        window = range(max(0, c - half), min(channels, c + half + 1))
        total = sum(x[:, c2].double() ** 2 for c2 in window)
        out[:, c] = (x[:, c].double() * (k + alpha / size * total) ** -beta).float()
    return out


def test_across_channel_lrn_is_caffes_and_torchs():
    """CaffeNet's norm1/norm2 (size 5, α 1e-4, β 0.75, k 1): our module and torch's
    nn.LocalResponseNorm both divide α by size, as Caffe does; α unscaled would differ."""
    x = torch.randn(2, 9, 4, 5) * 300  # Σ x² ≈ 5·9e4: the LRN scale is far from 1
    expected = _across_channel_lrn_by_loops(x, 5, 1e-4, 0.75, 1.0)
    assert not torch.allclose(expected, x, rtol=0.1)
    ours = AcrossChannelLRN(5, 1e-4, 0.75)(x)
    theirs = nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)(x)
    assert torch.allclose(ours, expected, rtol=1e-5, atol=1e-4)
    assert torch.allclose(theirs, expected, rtol=1e-5, atol=1e-4)
    unscaled = _across_channel_lrn_by_loops(x, 5, 5e-4, 0.75, 1.0)  # α not divided by size
    assert not torch.allclose(theirs, unscaled, rtol=1e-2)
    channels_last = x.contiguous(memory_format=torch.channels_last)
    assert torch.allclose(AcrossChannelLRN(5, 1e-4, 0.75)(channels_last), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="odd"):
        AcrossChannelLRN(4, 1e-4, 0.75)


def test_across_channel_lrn_of_float16_does_not_overflow():
    x = (torch.randn(1, 8, 6, 7) * 500).relu()  # CaffeNet conv1 outputs reach the hundreds
    lrn = AcrossChannelLRN(5, 1e-4, 0.75)
    out = lrn(x.half())
    assert out.dtype == torch.float16 and bool(out.isfinite().all())
    assert torch.allclose(out.float(), lrn(x), rtol=2e-3, atol=0.5)


def test_caffenet_weights_file_sets_the_pool_norm_order(tmp_path, caffenet):
    """One trunk name, two orders: a file's LRN_BEFORE_POOL_KEY picks bvlc_alexnet's (norm,
    then pool); without it the trunk runs CaffeNet's. A fine-tuned trunk keeps its order."""
    generator = torch.Generator().manual_seed(3)
    state = {
        k: torch.randn(v.shape, generator=generator) * 0.05
        for k, v in caffenet.state_dict().items()
    }
    torch.save(state, tmp_path / "caffenet.pt")
    torch.save({**state, LRN_BEFORE_POOL_KEY: torch.tensor(True)}, tmp_path / "alexnet_bvlc.pt")
    pool_first = build_backbone("caffenet", str(tmp_path / "caffenet.pt"))
    norm_first = build_backbone("caffenet", str(tmp_path / "alexnet_bvlc.pt"))
    assert not lrn_before_pool(pool_first) and lrn_before_pool(norm_first)
    assert [type(m).__name__ for m in norm_first.features][:4] == [
        "Conv2d", "ReLU", "AcrossChannelLRN", "MaxPool2d"
    ]  # fmt: skip
    assert (norm_first.stride, norm_first.offset0) == (pool_first.stride, pool_first.offset0)
    pixels = torch.randn(1, 3, 131, 99) * 60
    with torch.no_grad():
        a, b = pool_first(pixels), norm_first(pixels)
    assert a.shape == b.shape and not torch.allclose(a, b)  # same weights, other order

    torch.save(trunk_state(norm_first), tmp_path / "trunk.pt")
    assert lrn_before_pool(build_backbone("caffenet", str(tmp_path / "trunk.pt")))
    assert torch.load(tmp_path / "trunk.pt", weights_only=True)[LRN_BEFORE_POOL_KEY].item() is True
    torch.save({**state, LRN_BEFORE_POOL_KEY: torch.tensor([1.0, 0.0])}, tmp_path / "bad.pt")
    with pytest.raises(UserError, match=r"architecture\.lrn_before_pool must hold one value"):
        build_backbone("caffenet", str(tmp_path / "bad.pt"))


def test_random_weights_are_reproducible(zf5):
    again = build_backbone("zf5", "none")
    for a, b in zip(zf5.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_within_channel_lrn_against_loops():
    x = torch.randn(1, 2, 4, 5) * 30
    size, alpha, beta = 3, 5e-5, 0.75
    out = WithinChannelLRN(size, alpha, beta)(x)
    expected = torch.empty_like(x)
    for c in range(2):
        for y in range(4):
            for xx in range(5):
                total = 0.0
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        if 0 <= y + dy < 4 and 0 <= xx + dx < 5:  # zero padding
                            total += float(x[0, c, y + dy, xx + dx]) ** 2
                scale = (1 + alpha / size**2 * total) ** -beta  # divisor 9 (docs/method.md)
                expected[0, c, y, xx] = x[0, c, y, xx] * scale
    assert torch.allclose(out, expected, rtol=1e-5)


def test_within_channel_lrn_of_float16_does_not_overflow():
    """ZF-5's conv1 outputs reach the hundreds; their squares overflow float16 (max 65504)."""
    x = torch.randn(1, 4, 6, 7) * 300
    lrn = WithinChannelLRN(3, 5e-5, 0.75)
    out = lrn(x.half())
    assert out.dtype == torch.float16 and bool(out.isfinite().all())
    assert torch.allclose(out.float(), lrn(x), rtol=2e-3, atol=0.5)


def test_zf5_pools_in_ceil_mode():
    pools = [m for m in build_backbone("zf5", "none").features if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 2 and all(p.ceil_mode for p in pools)
    assert output_hw(pools[:1], (110, 110)) == (55, 55)  # ⌈107/2⌉+1, floor would give 54
    assert F.max_pool2d(torch.zeros(1, 1, 110, 110), 3, 2, ceil_mode=True).shape[-1] == 55


# ---------------------------------------------------------------- weights


def test_local_trunk_state_dict_round_trip(tmp_path, zf5):
    changed = {k: v + 1.0 for k, v in zf5.state_dict().items()}
    torch.save(changed, tmp_path / "zf5.pt")
    loaded = build_backbone("zf5", str(tmp_path / "zf5.pt"))
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, changed[key])
    assert not any(p.requires_grad for p in loaded.parameters())


def _classification_state(backbone: backbones.Backbone) -> dict[str, torch.Tensor]:
    """A torchvision-style AlexNet state dict: features.* plus classifier.1/.4/.6."""
    state = {k: torch.randn_like(v) for k, v in backbone.state_dict().items()}
    state.update({
        "classifier.1.weight": torch.randn(64, 256 * 36), "classifier.1.bias": torch.randn(64),
        "classifier.4.weight": torch.randn(64, 64), "classifier.4.bias": torch.randn(64),
        "classifier.6.weight": torch.randn(10, 64), "classifier.6.bias": torch.randn(10),
    })  # fmt: skip
    return state


def test_full_classification_state_dict_and_classifier(tmp_path, alexnet):
    state = _classification_state(alexnet)
    path = tmp_path / "alexnet_full.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    loaded = build_backbone("alexnet", str(path))
    assert torch.equal(loaded.features[0].weight, state["features.0.weight"])
    classifier = load_classifier_state("alexnet", str(path))
    assert set(classifier) == {"fc6.weight", "fc6.bias", "fc7.weight", "fc7.bias"}
    assert torch.equal(classifier["fc6.weight"], state["classifier.1.weight"])
    assert torch.equal(classifier["fc7.bias"], state["classifier.4.bias"])
    assert load_classifier_state("alexnet", "none") is None


def test_trunk_only_file_has_no_classifier(tmp_path, zf5):
    torch.save(zf5.state_dict(), tmp_path / "zf5.pt")
    assert load_classifier_state("zf5", str(tmp_path / "zf5.pt")) is None


# One row of data/README.md's zf5 weights table: | `features.0.weight` | (96, 3, 7, 7) | conv1 |
DOCUMENTED_KEY_ROW = re.compile(r"^\| `(features\.\d+\.(?:weight|bias))` \| \(([\d, ]+)\) \|")
DATA_README = Path(__file__).resolve().parents[1] / "data" / "README.md"


def documented_zf5_keys() -> dict[str, tuple[int, ...]]:
    """The zf5 weight keys and shapes that data/README.md tells users to write."""
    shapes = {}
    for line in DATA_README.read_text().splitlines():
        match = DOCUMENTED_KEY_ROW.match(line.strip())
        if match:
            shapes[match[1]] = tuple(int(v) for v in match[2].split(",") if v.strip())
    return shapes


@pytest.mark.parametrize("layout", ["plain", "wrapped", "bare"])
def test_zf5_weights_file_as_documented_loads(tmp_path, layout):
    """A file written exactly as data/README.md documents loads through the public loader."""
    shapes = documented_zf5_keys()
    assert len(shapes) == 10  # conv1-conv5, weight and bias each
    generator = torch.Generator().manual_seed(7)
    state = {key: torch.randn(shape, generator=generator) for key, shape in shapes.items()}
    if layout == "plain":  # torch.save(state, "data/weights/zf5.pt")
        saved = state
    elif layout == "wrapped":  # {"state_dict": ...} with DataParallel's "module." prefix
        saved = {"state_dict": {f"module.{key}": value for key, value in state.items()}}
    else:  # a bare nn.Sequential state dict: no "features." prefix
        saved = {key.removeprefix("features."): value for key, value in state.items()}
    path = tmp_path / "zf5.pt"
    torch.save(saved, path)
    loaded = build_backbone("zf5", str(path))
    assert set(loaded.state_dict()) == set(shapes)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key
    with torch.no_grad():
        assert loaded(torch.zeros(1, 3, 224, 224)).shape == (1, 256, 13, 13)
    assert load_classifier_state("zf5", str(path)) is None  # conv layers only: fc6/fc7 at random


def test_another_trunks_file_names_both_trunks(tmp_path, alexnet):
    torch.save(alexnet.state_dict(), tmp_path / "alexnet.pt")
    with pytest.raises(UserError) as caught:
        build_backbone("zf5", str(tmp_path / "alexnet.pt"))
    message = str(caught.value)
    assert "alexnet.pt" in message and "\n" not in message
    assert "holds alexnet weights but extract.backbone is zf5" in message


def test_wrong_architecture_file_names_the_keys(tmp_path, alexnet):
    state = alexnet.state_dict()
    state["features.0.weight"] = state["features.0.weight"][:, :, :7, :7]  # no trunk's shapes
    torch.save(state, tmp_path / "odd.pt")
    with pytest.raises(UserError) as caught:
        build_backbone("zf5", str(tmp_path / "odd.pt"))
    message = str(caught.value)
    assert "odd.pt" in message and "zf5" in message and "\n" not in message
    assert "features.0.weight (64, 3, 7, 7) vs (96, 3, 7, 7)" in message
    assert "missing" in message and "unexpected" in message


def test_unknown_backbone_and_bad_files(tmp_path):
    with pytest.raises(UserError, match=r"extract\.backbone"):
        build_backbone("resnet50", "none")
    with pytest.raises(UserError, match="not found"):
        build_backbone("zf5", str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match=r"junk\.pt"):
        build_backbone("zf5", str(tmp_path / "junk.pt"))


def test_weights_names(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(UserError, match="zf5 has no torchvision weights"):
        build_backbone("zf5", "IMAGENET1K_V1")
    with pytest.raises(UserError, match="caffenet has no torchvision weights"):
        build_backbone("caffenet", "IMAGENET1K_V1")
    with pytest.raises(UserError, match=r"AlexNet_Weights\.IMAGENET1K_V1"):
        build_backbone("alexnet", "VGG16_Weights.IMAGENET1K_V1")
    with pytest.raises(UserError, match="not a file nor a weights name"):
        build_backbone("alexnet", "IMAGENET_V9")


def test_uncached_weights_offline_give_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(UserError) as caught:
        build_backbone("alexnet", "IMAGENET1K_V1")
    message = str(caught.value)
    assert "AlexNet_Weights.IMAGENET1K_V1" in message and "network" in message
    assert "alexnet-owt-7be5be79.pth" in message and "\n" not in message


def test_cached_weights_load_without_download(monkeypatch, tmp_path, alexnet):
    checkpoints = Path(tmp_path) / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    state = _classification_state(alexnet)
    torch.save(state, checkpoints / "alexnet-owt-7be5be79.pth")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", pytest.fail)
    loaded = build_backbone("alexnet", "AlexNet_Weights.IMAGENET1K_V1")
    assert torch.equal(loaded.features[3].weight, state["features.3.weight"])
    assert load_classifier_state("alexnet", "DEFAULT")["fc6.weight"].shape == (64, 9216)


@pytest.mark.parametrize(
    ("name", "last_stage"),
    [("zf5", ""), ("alexnet", ""), ("caffenet", ""), ("efficientnet_lite0", ""),
     ("efficientnet_lite0", "stage7"), ("efficientnet_lite2", "")],
)  # fmt: skip
def test_offset0_is_the_centre_of_the_gradient_support(name, last_stage):
    """Independent check of receptive_center: the input pixels that reach conv cell (j, j) are
    centred on offset0 − 1 + stride·j (0-based). Max-pooling is swapped for average pooling of
    the same geometry and all weights made positive, so every pixel of the field counts (the
    Lite trunks' blocks and residuals included)."""
    backbone = build_backbone(name, "none", last_stage)
    layers = []
    for layer in backbone.features:
        if isinstance(layer, nn.MaxPool2d):
            layer = nn.AvgPool2d(layer.kernel_size, layer.stride, layer.padding, layer.ceil_mode)
        for conv in layer.modules():
            if isinstance(conv, nn.Conv2d):
                with torch.no_grad():
                    conv.weight.fill_(1.0 / conv.weight[0].numel())
                    conv.bias.zero_()
        layers.append(layer)
    # small pixels: the Lite residuals double activations, which must stay below ReLU6's cap
    side = 300 if name in ("zf5", "alexnet", "caffenet") else 1000  # Lite fields span ~800 px
    pixels = (torch.rand(1, 3, side, side) * 1e-3).requires_grad_()
    cell = side // 2 // backbone.stride
    nn.Sequential(*layers)(pixels)[0, 0, cell, cell].backward()
    rows = torch.nonzero(pixels.grad[0].abs().sum(dim=(0, 2))).flatten()
    centre = (float(rows.min()) + float(rows.max())) / 2
    assert rows.min() > 0  # the field is not cut by the border
    assert centre == backbone.offset0 - 1 + backbone.stride * cell
