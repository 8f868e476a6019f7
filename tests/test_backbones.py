"""Backbones: geometry derived from the layer lists, ZF-5 as docs/method.md#conv-trunks, weights."""

from __future__ import annotations

import re
import urllib.error
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_spp import zf5_fmap_side  # ZF-5 size arithmetic by hand (docs/method.md#conv-trunks)
from torch import nn

from spp_detect import backbones
from spp_detect.backbones import (
    WithinChannelLRN,
    build_backbone,
    load_classifier_state,
    output_hw,
    receptive_center,
)
from spp_detect.errors import UserError


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


def test_wrong_architecture_file_names_the_keys(tmp_path, alexnet):
    torch.save(alexnet.state_dict(), tmp_path / "alexnet.pt")
    with pytest.raises(UserError) as caught:
        build_backbone("zf5", str(tmp_path / "alexnet.pt"))
    message = str(caught.value)
    assert "alexnet.pt" in message and "zf5" in message and "\n" not in message
    assert "features.0.weight (64, 3, 11, 11) vs (96, 3, 7, 7)" in message
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


@pytest.mark.parametrize("name", ["zf5", "alexnet"])
def test_offset0_is_the_centre_of_the_gradient_support(name):
    """Independent check of receptive_center: the input pixels that reach conv cell (j, j) are
    centred on offset0 − 1 + stride·j (0-based). Max-pooling is swapped for average pooling of
    the same geometry and all weights made positive, so every pixel of the field counts."""
    backbone = build_backbone(name, "none")
    layers = []
    for layer in backbone.features:
        if isinstance(layer, nn.MaxPool2d):
            layer = nn.AvgPool2d(layer.kernel_size, layer.stride, layer.padding, layer.ceil_mode)
        elif isinstance(layer, nn.Conv2d):
            with torch.no_grad():
                layer.weight.fill_(1.0 / layer.weight[0].numel())
                layer.bias.zero_()
        layers.append(layer)
    pixels = torch.rand(1, 3, 300, 300, requires_grad=True)
    cell = 7
    nn.Sequential(*layers)(pixels)[0, 0, cell, cell].backward()
    rows = torch.nonzero(pixels.grad[0].abs().sum(dim=(0, 2))).flatten()
    centre = (float(rows.min()) + float(rows.max())) / 2
    assert rows.min() > 0  # the field is not cut by the border
    assert centre == backbone.offset0 - 1 + backbone.stride * cell
