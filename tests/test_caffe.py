"""convert-weights: .caffemodel files written here (V1 `layers` and current `layer` layouts)
round-trip exactly into weights files that build_backbone and load_classifier_state read."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from spp_detect.cli import cli
from spp_detect.data.image import (
    FAST_RCNN_PIXEL_MEANS,
    ILSVRC_2012_BGR_MEAN,
    caffe_bgr_mean,
    caffe_bgr_normalization,
    image_to_tensor,
)
from spp_detect.errors import UserError
from spp_detect.models import caffe
from spp_detect.models.backbones import (
    DEFAULT_NORMALIZATION,
    ZF5_LRN_ALPHA,
    ZF5_LRN_BETA,
    ZF5_LRN_SIZE,
    conv_layout,
)
from spp_detect.models.backbones import lrn_before_pool as lrn_before_pool_of
from spp_detect.models.weights import (
    CAFFE_MEAN_KEY,
    LRN_BEFORE_POOL_KEY,
    build_backbone,
    load_classifier_state,
    trunk_state,
)
from spp_detect.testing import assert_one_line_error

FC_WIDTH = 16  # a narrow fc6/fc7 keeps the files small; the converter takes any width


def _blob(array: np.ndarray, v1: bool):
    """A BlobProto of ``array``: V1 files store legacy 4-d (num, channels, height, width)."""
    blob = caffe.caffe_messages().BlobProto()
    if v1:
        blob.num, blob.channels, blob.height, blob.width = (1,) * (4 - array.ndim) + array.shape
    else:
        blob.shape.dim.extend(array.shape)
    blob.data.extend(array.ravel().tolist())
    return blob


def write_caffemodel(path: Path, layers: dict[str, list[np.ndarray]], v1: bool) -> Path:
    """A .caffemodel holding ``layers`` (name → blobs) after a blob-less data layer, in the V1
    (``layers``) or the current (``layer``) layout."""
    net = caffe.caffe_messages().NetParameter(name="test net")
    add = net.layers.add if v1 else net.layer.add
    add(name="data")
    for name, blobs in layers.items():
        add(name=name, blobs=[_blob(blob, v1) for blob in blobs])
        add(name=f"relu_{name}")  # parameter-free layers sit between, as in real files
    path.write_bytes(net.SerializeToString())
    return path


# Caffe layer types of the CaffeNet-family files written here: (V1 LayerType, current type)
LAYER_TYPES = {
    "Data": (5, "Data"), "Convolution": (4, "Convolution"), "ReLU": (18, "ReLU"),
    "LRN": (15, "LRN"), "Pooling": (17, "Pooling"), "InnerProduct": (14, "InnerProduct"),
    "Dropout": (6, "Dropout"),
}  # fmt: skip
# BVLC's conv shapes (bvlc_reference_caffenet and bvlc_alexnet alike): what caffenet must be
BVLC_CONV_SHAPES = {
    "conv1": (96, 3, 11, 11), "conv2": (256, 48, 5, 5), "conv3": (384, 256, 3, 3),
    "conv4": (384, 192, 3, 3), "conv5": (256, 192, 3, 3),
}  # fmt: skip


# the LRN settings of norm1/norm2 in the files written here (caffe.proto LRNParameter fields)
CAFFENET_NORM = {"local_size": 5, "alpha": 1e-4, "beta": 0.75}
ZF5_NORM = {  # Zeiler_conv5's norm1/norm2: WITHIN_CHANNEL (1)
    "local_size": ZF5_LRN_SIZE, "alpha": ZF5_LRN_ALPHA, "beta": ZF5_LRN_BETA, "norm_region": 1,
}  # fmt: skip


def write_caffenet(
    path: Path,
    layers: dict[str, list[np.ndarray]],
    v1: bool,
    lrn_before_pool: bool,
    lrn: dict | None = None,
    pool: dict | None = None,
    norm: dict = CAFFENET_NORM,
    name: str = "CaffeNet",
) -> Path:
    """A CaffeNet-family .caffemodel as Caffe saves one: every layer of the train net with its
    type and settings, blobs from ``layers``; norm before pool (bvlc_alexnet) or pool before
    norm (bvlc_reference_caffenet). ``norm`` is the LRN settings of norm1 and norm2 (ZF5_NORM
    for a ZF-5 model); ``lrn``/``pool`` override norm1's/pool1's settings."""
    net = caffe.caffe_messages().NetParameter(name=name)
    add = net.layers.add if v1 else net.layer.add

    def layer(name: str, kind: str, **settings):
        added = add(name=name, type=LAYER_TYPES[kind][0 if v1 else 1], **settings)
        if name in layers:
            added.blobs.extend(_blob(blob, v1) for blob in layers[name])

    layer("data", "Data")
    for i in (1, 2, 3, 4, 5):
        layer(f"conv{i}", "Convolution")
        layer(f"relu{i}", "ReLU")
        if i <= 2:
            lrn_param = {**norm, **((lrn or {}) if i == 1 else {})}
            max_pool = {
                "pool": 0,
                "kernel_size": 3,
                "stride": 2,
                **((pool or {}) if i == 1 else {}),
            }
            steps = [
                (f"norm{i}", "LRN", {"lrn_param": lrn_param}),
                (f"pool{i}", "Pooling", {"pooling_param": max_pool}),
            ]
            for name, kind, settings in steps if lrn_before_pool else steps[::-1]:
                layer(name, kind, **settings)
    layer("pool5", "Pooling", pooling_param={"pool": 0, "kernel_size": 3, "stride": 2})
    for name in ("fc6", "fc7"):
        layer(name, "InnerProduct")
        layer(f"relu{name[-1]}", "ReLU")
        layer(f"drop{name[-1]}", "Dropout")
    layer("fc8", "InnerProduct")
    path.write_bytes(net.SerializeToString())
    return path


def write_zf5(path: Path, layers: dict[str, list[np.ndarray]], v1: bool, **change) -> Path:
    """SPP-net's ZF-5 as Caffe saves it (Zeiler_conv5: conv, relu, norm, pool after conv1 and
    conv2, within-channel LRN); ``change``: write_caffenet's lrn, pool or lrn_before_pool."""
    return write_caffenet(
        path, layers, v1, change.pop("lrn_before_pool", True), norm=ZF5_NORM, name="ZF5", **change
    )


def known_layers(backbone: str, fc_cells: int = 36, seed: int = 0) -> dict[str, list]:
    """Random float32 blobs named and shaped as ``backbone``'s Caffe model, with fc6 reading
    ``fc_cells`` cells per conv5 channel, fc7, and an fc8 the converter ignores."""
    rng = np.random.default_rng(seed)
    layers = {}
    for layer, _, weight_shape, bias_shape in conv_layout(backbone):
        layers[layer] = [
            rng.standard_normal(s).astype(np.float32) for s in (weight_shape, bias_shape)
        ]
    channels = conv_layout(backbone)[-1][2][0]
    for name, shape in (("fc6", (FC_WIDTH, channels * fc_cells)), ("fc7", (FC_WIDTH, FC_WIDTH))):
        layers[name] = [rng.standard_normal(s).astype(np.float32) for s in (shape, shape[:1])]
    layers["fc8"] = [np.ones((3, FC_WIDTH), np.float32), np.zeros(3, np.float32)]
    return layers


def convert(args: list[str]):
    return CliRunner().invoke(cli, ["convert-weights", *args])


# ---------------------------------------------------------------- round trip


@pytest.mark.parametrize("v1", [True, False], ids=["V1-layers", "layer"])
def test_zf5_round_trip_is_exact_and_loads(tmp_path, v1):
    layers = known_layers("zf5")
    model = write_caffemodel(tmp_path / "zf5.caffemodel", layers, v1)
    out = tmp_path / "zf5.pt"
    result = convert([str(model), "--backbone", "zf5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "fc6, fc7" in result.output and ("V1 layers" if v1 else "(layer)") in result.output

    state = torch.load(out, weights_only=True)
    for layer, prefix, _, _ in conv_layout("zf5"):
        assert torch.equal(state[f"{prefix}.weight"], torch.from_numpy(layers[layer][0]))
        assert torch.equal(state[f"{prefix}.bias"], torch.from_numpy(layers[layer][1]))
    assert state[CAFFE_MEAN_KEY].tolist() == [128.0, 128.0, 128.0]  # SPP-net's release
    assert not any(key.startswith("fc8") for key in state)

    trunk = build_backbone("zf5", str(out))
    assert trunk.normalization == "caffe_bgr"
    for key, value in trunk.state_dict().items():
        assert torch.equal(value, state[key])
    classifier = load_classifier_state("zf5", str(out))
    assert classifier is not None
    for name in ("fc6", "fc7"):
        assert torch.equal(classifier[f"{name}.weight"], torch.from_numpy(layers[name][0]))
        assert torch.equal(classifier[f"{name}.bias"], torch.from_numpy(layers[name][1]))


def test_alexnet_keeps_the_caffe_pixel_mean(tmp_path):
    layers = known_layers("alexnet", seed=1)
    model = write_caffemodel(tmp_path / "alexnet.caffemodel", layers, v1=False)
    out = tmp_path / "alexnet.pt"
    caffe.convert_caffemodel(model, "alexnet", out)
    trunk = build_backbone("alexnet", str(out))
    for layer, prefix, _, _ in conv_layout("alexnet"):
        assert torch.equal(
            trunk.state_dict()[f"{prefix}.weight"], torch.from_numpy(layers[layer][0])
        )
    # BGR 0–255 minus py-faster-rcnn's mean, not torchvision's ImageNet normalisation
    expected = tuple(float(np.float32(v)) for v in FAST_RCNN_PIXEL_MEANS)
    assert caffe_bgr_mean(trunk.normalization) == expected
    image = np.zeros((2, 2, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 10, 20, 200  # R, G, B
    pixels = image_to_tensor(image, trunk.normalization)
    assert pixels[:, 0, 0].tolist() == pytest.approx([200 - 102.9801, 20 - 115.9465, 10 - 122.7717])
    # a trunk fine-tuned from it is saved with its mean and fed the same pixels
    torch.save(trunk_state(trunk), tmp_path / "trunk.pt")
    assert (
        build_backbone("alexnet", str(tmp_path / "trunk.pt")).normalization == trunk.normalization
    )
    assert load_classifier_state("alexnet", str(out))["fc6.weight"].shape == (FC_WIDTH, 256 * 36)


def test_caffenet_layout_is_bvlcs():
    layout = conv_layout("caffenet")
    assert {layer: weight for layer, _, weight, _ in layout} == BVLC_CONV_SHAPES
    assert [prefix for _, prefix, *_ in layout] == [f"features.{i}" for i in (0, 4, 8, 10, 12)]


@pytest.mark.parametrize("v1", [True, False], ids=["V1-layers", "layer"])
@pytest.mark.parametrize(
    "lrn_before_pool", [False, True], ids=["caffenet-pool-norm", "bvlc-alexnet-norm-pool"]
)
def test_caffenet_round_trip_records_the_order(tmp_path, v1, lrn_before_pool):
    """bvlc_reference_caffenet (pool, norm) and bvlc_alexnet (norm, pool), in both layouts:
    conv1–conv5 and fc6 (4096 × 9216 in the real files; narrower here) and fc7 copied exactly,
    the order read from the file and written, the ILSVRC 2012 mean stored."""
    layers = known_layers("caffenet", seed=2)
    model = write_caffenet(tmp_path / "bvlc.caffemodel", layers, v1, lrn_before_pool)
    out = tmp_path / "caffenet.pt"
    result = convert([str(model), "--backbone", "caffenet", "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = result.output
    order = (
        "norm before pool: BVLC AlexNet's" if lrn_before_pool else "pool before norm: CaffeNet's"
    )
    assert order in summary and "fc6, fc7" in summary, summary
    assert "pixels BGR minus (104.007, 116.669, 122.679)" in summary

    state = torch.load(out, weights_only=True)
    assert state[LRN_BEFORE_POOL_KEY].item() is lrn_before_pool
    trunk = build_backbone("caffenet", str(out))
    assert lrn_before_pool_of(trunk) is lrn_before_pool
    for layer, prefix, _, _ in conv_layout("caffenet"):
        assert torch.equal(
            trunk.state_dict()[f"{prefix}.weight"], torch.from_numpy(layers[layer][0])
        )
        assert torch.equal(trunk.state_dict()[f"{prefix}.bias"], torch.from_numpy(layers[layer][1]))
    # the converted mean is the trunk's default pixels (float32 ILSVRC 2012 means)
    assert trunk.normalization == DEFAULT_NORMALIZATION["caffenet"]
    assert caffe_bgr_mean(trunk.normalization) == tuple(
        float(np.float32(v)) for v in ILSVRC_2012_BGR_MEAN
    )
    classifier = load_classifier_state("caffenet", str(out))
    assert classifier["fc6.weight"].shape == (FC_WIDTH, 256 * 6 * 6)  # pool5: 256 × 6 × 6
    for name in ("fc6", "fc7"):
        assert torch.equal(classifier[f"{name}.weight"], torch.from_numpy(layers[name][0]))
        assert torch.equal(classifier[f"{name}.bias"], torch.from_numpy(layers[name][1]))
    with torch.no_grad():
        assert trunk(torch.zeros(1, 3, 227, 227)).shape == (1, 256, 13, 13)


@pytest.mark.parametrize("v1", [True, False], ids=["V1-layers", "layer"])
def test_zf5_with_its_lrn_and_pooling_converts(tmp_path, v1):
    """Zeiler_conv5 as Caffe saves it: its norm1/pool1 and norm2/pool2 are the zf5 trunk's."""
    layers = known_layers("zf5", seed=3)
    model = write_zf5(tmp_path / "zf5.caffemodel", layers, v1)
    out = tmp_path / "zf5.pt"
    result = convert([str(model), "--backbone", "zf5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "zf5 conv1…conv5 and fc6, fc7 from" in result.output, result.output
    assert "not checked" not in result.output
    assert LRN_BEFORE_POOL_KEY not in torch.load(out, weights_only=True)
    trunk = build_backbone("zf5", str(out))
    for layer, prefix, _, _ in conv_layout("zf5"):
        assert torch.equal(
            trunk.state_dict()[f"{prefix}.weight"], torch.from_numpy(layers[layer][0])
        )


def test_zf5_without_lrn_and_pooling_layers_is_not_checked(tmp_path):
    """A file holding only the layers with weights: zf5's order is fixed, so it converts, and
    the summary says the LRN and pooling settings were not checked."""
    model = write_caffemodel(tmp_path / "zf5.caffemodel", known_layers("zf5"), v1=True)
    out = tmp_path / "zf5.pt"
    summary = caffe.convert_caffemodel(model, "zf5", out)
    note = "zf5 conv1…conv5 (LRN and pooling settings not in the file, not checked) and fc6, fc7"
    assert note in summary, summary
    build_backbone("zf5", str(out))


def test_vgg16_layer_names_and_keys():
    layout = conv_layout("vgg16")
    names = [layer for layer, *_ in layout]
    assert names[:3] == ["conv1_1", "conv1_2", "conv2_1"] and names[-1] == "conv5_3"
    assert [prefix for _, prefix, *_ in layout][:3] == ["features.0", "features.2", "features.5"]
    assert layout[-1][1:] == ("features.28", (512, 512, 3, 3), (512,))


def test_mean_options(tmp_path):
    model = write_caffemodel(tmp_path / "zf5.caffemodel", known_layers("zf5"), v1=False)
    out = tmp_path / "zf5.pt"
    result = convert([str(model), "--backbone", "zf5", "--out", str(out), "--mean", "1,2.5,3"])
    assert result.exit_code == 0, result.output
    assert build_backbone("zf5", str(out)).normalization == caffe_bgr_normalization((1, 2.5, 3))

    mean_image = np.stack([np.full((4, 5), v, np.float32) for v in (100, 110, 120)])[None]
    mean_image[0, 0, 0, 0] += 20  # channel B: mean 100 + 20/20 = 101
    mean_file = tmp_path / "mean.binaryproto"
    mean_file.write_bytes(_blob(mean_image, v1=True).SerializeToString())
    result = convert(
        [str(model), "--backbone", "zf5", "--out", str(out), "--mean-file", str(mean_file)]
    )
    assert result.exit_code == 0, result.output
    assert torch.load(out, weights_only=True)[CAFFE_MEAN_KEY].tolist() == [101.0, 110.0, 120.0]


def test_pyramid_fc6_is_left_out(tmp_path):
    """SPP-net's own ZF-5 fc6 reads the whole pyramid (256 × 50 cells): finetune cannot start
    from it, so only the conv layers are written."""
    model = write_caffemodel(tmp_path / "spp.caffemodel", known_layers("zf5", fc_cells=50), v1=True)
    out = tmp_path / "zf5.pt"
    result = convert([str(model), "--backbone", "zf5", "--out", str(out)])
    assert result.exit_code == 0 and "(fc6/fc7: left out, fc6 reads a pyramid" in result.output
    assert load_classifier_state("zf5", str(out)) is None
    build_backbone("zf5", str(out))


def test_normalization_names_round_trip():
    assert caffe_bgr_normalization((128, 128, 128)) == "caffe_bgr"
    mean = (float(np.float32(102.9801)), 0.1, 1e-7)
    assert caffe_bgr_mean(caffe_bgr_normalization(mean)) == mean
    assert caffe_bgr_mean("imagenet") is None
    image = np.array([[[10, 20, 200]]], np.uint8)  # R, G, B
    assert image_to_tensor(image, "caffe_bgr")[:, 0, 0].tolist() == [72, -108, -118]


# ---------------------------------------------------------------- bad input


def test_truncated_file_is_one_line(tmp_path):
    model = write_caffemodel(tmp_path / "zf5.caffemodel", known_layers("zf5"), v1=True)
    data = model.read_bytes()
    model.write_bytes(data[: len(data) // 2])
    result = convert([str(model), "--backbone", "zf5", "--out", str(tmp_path / "x.pt")])
    assert_one_line_error(result, str(model), "truncated or damaged")
    assert not (tmp_path / "x.pt").exists()


def test_other_network_names_its_first_layer(tmp_path):
    lenet = {  # LeNet's layer names and shapes (Caffe's MNIST example)
        "conv1": [np.zeros((20, 1, 5, 5), np.float32), np.zeros(20, np.float32)],
        "conv2": [np.zeros((50, 20, 5, 5), np.float32), np.zeros(50, np.float32)],
        "ip1": [np.zeros((500, 800), np.float32), np.zeros(500, np.float32)],
    }
    model = write_caffemodel(tmp_path / "lenet.caffemodel", lenet, v1=False)
    result = convert([str(model), "--backbone", "zf5", "--out", str(tmp_path / "x.pt")])
    assert_one_line_error(
        result, "does not fit --backbone zf5: layer conv1 has weight (20, 1, 5, 5)", "fits none"
    )
    result = convert([str(model), "--backbone", "vgg16", "--out", str(tmp_path / "x.pt")])
    assert_one_line_error(result, "no layer conv1_1 (layers with weights: conv1, conv2, ip1)")


def test_wrong_backbone_says_which_fits(tmp_path):
    model = write_caffemodel(tmp_path / "zf5.caffemodel", known_layers("zf5"), v1=True)
    result = convert([str(model), "--backbone", "alexnet", "--out", str(tmp_path / "x.pt")])
    assert_one_line_error(
        result, "does not fit --backbone alexnet: layer conv1", "it fits --backbone zf5"
    )
    # BVLC's AlexNet/CaffeNet given as torchvision's alexnet: pointed to caffenet
    bvlc = write_caffenet(tmp_path / "bvlc.caffemodel", known_layers("caffenet"), True, True)
    result = convert([str(bvlc), "--backbone", "alexnet", "--out", str(tmp_path / "x.pt")])
    line = assert_one_line_error(
        result,
        "does not fit --backbone alexnet: layer conv1 has weight (96, 3, 11, 11)",
        "it fits --backbone caffenet (BVLC's AlexNet and CaffeNet",
    )
    assert "64-192-384-256-256" not in line


def _caffenet_error(model: Path, out: Path) -> str:
    """The one-line UserError of converting ``model`` with --backbone caffenet."""
    with pytest.raises(UserError) as caught:
        caffe.convert_caffemodel(model, "caffenet", out)
    assert "\n" not in str(caught.value) and not out.exists()
    return str(caught.value)


def test_wrong_model_for_caffenet_names_the_first_layer(tmp_path):
    out = tmp_path / "x.pt"
    model = write_caffemodel(tmp_path / "zf5.caffemodel", known_layers("zf5"), v1=True)
    message = _caffenet_error(model, out)
    assert "does not fit --backbone caffenet: layer conv1 has weight (96, 3, 7, 7)" in message
    assert "the caffenet trunk needs (96, 3, 11, 11) and (96,); it fits --backbone zf5" in message

    layers = known_layers("caffenet")
    layers["conv4"][0] = layers["conv4"][0][:, :96]  # conv4 in four groups, not two
    model = write_caffenet(tmp_path / "c.caffemodel", layers, v1=False, lrn_before_pool=False)
    message = _caffenet_error(model, out)
    assert "layer conv4 has weight (384, 96, 3, 3)" in message and "fits none of" in message


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"lrn": {"local_size": 3}}, "layer norm1 is LRN ACROSS_CHANNELS local_size 3, alpha "),
        ({"lrn": {"norm_region": 1}}, "layer norm1 is LRN WITHIN_CHANNEL local_size 5"),
        ({"lrn": {"alpha": 5e-5}}, "alpha 5e-05, beta 0.75, k 1; the caffenet trunk needs"),
        ({"pool": {"pool": 1}}, "layer pool1 pools AVE 3×3 stride 2 pad 0; the caffenet trunk"),
        ({"pool": {"kernel_size": 2}}, "layer pool1 pools MAX 2×2 stride 2 pad 0"),
    ],
    ids=["lrn-size", "lrn-region", "lrn-alpha", "pool-average", "pool-kernel"],
)
def test_caffenet_other_lrn_or_pooling_names_the_layer(tmp_path, change, fragment):
    model = write_caffenet(
        tmp_path / "c.caffemodel", known_layers("caffenet"), True, False, **change
    )
    message = _caffenet_error(model, tmp_path / "x.pt")
    assert "does not fit --backbone caffenet: " in message and fragment in message, message


def test_caffenet_order_must_be_one_for_both_stages():
    def stage(i: int, lrn_first: bool) -> list[caffe.CaffeLayer]:
        norm = caffe.CaffeLayer(f"norm{i}", "LRN", lrn=(5, 1e-4, 0.75, 0, 1.0))
        pool = caffe.CaffeLayer(f"pool{i}", "Pooling", pool=(0, 3, 2, 0))
        return [
            caffe.CaffeLayer(f"conv{i}", "Convolution"),
            *([norm, pool][:: 1 if lrn_first else -1]),
        ]

    conv3 = [caffe.CaffeLayer("conv3", "Convolution")]
    for lrn_first in (False, True):
        sequence = [*stage(1, lrn_first), *stage(2, lrn_first), *conv3]
        assert caffe.model_lrn_before_pool(sequence, Path("m"), "caffenet") is lrn_first
    with pytest.raises(caffe._Mismatch, match="one order after conv1 and in the other"):
        caffe.model_lrn_before_pool(
            [*stage(1, True), *stage(2, False), *conv3], Path("m"), "caffenet"
        )


def test_caffenet_order_needs_the_layers_without_weights(tmp_path):
    """A file holding only the layers with weights cannot tell CaffeNet from BVLC AlexNet."""
    model = write_caffemodel(tmp_path / "c.caffemodel", known_layers("caffenet"), v1=False)
    message = _caffenet_error(model, tmp_path / "x.pt")
    assert "cannot tell CaffeNet (pool, then norm) from BVLC AlexNet (norm, then pool)" in message


@pytest.mark.parametrize("v1", [True, False], ids=["V1-layers", "layer"])
@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (
            {"lrn": {"local_size": 5}},
            "layer norm1 is LRN WITHIN_CHANNEL local_size 5, alpha 5e-05, beta 0.75, k 1; the "
            "zf5 trunk needs WITHIN_CHANNEL local_size 3, alpha 5e-05, beta 0.75, k 1",
        ),
        ({"lrn": {"alpha": 1e-4}}, "layer norm1 is LRN WITHIN_CHANNEL local_size 3, alpha 0.0001"),
        ({"lrn": {"norm_region": 0}}, "layer norm1 is LRN ACROSS_CHANNELS local_size 3"),
        (
            {"pool": {"kernel_size": 2}},
            "layer pool1 pools MAX 2×2 stride 2 pad 0; the zf5 trunk needs MAX 3×3 stride 2 pad 0",
        ),
        ({"pool": {"stride": 1}}, "layer pool1 pools MAX 3×3 stride 1 pad 0; the zf5 trunk"),
        ({"pool": {"pool": 1}}, "layer pool1 pools AVE 3×3 stride 2 pad 0; the zf5 trunk"),
        (
            {"lrn_before_pool": False},
            "layer pool1 comes before norm1; the zf5 trunk has norm, then pool, after conv1",
        ),
    ],
    ids=[
        "lrn-size", "lrn-alpha", "lrn-region", "pool-kernel", "pool-stride", "pool-average",
        "pool-before-norm",
    ],
)  # fmt: skip
def test_zf5_other_lrn_or_pooling_names_the_layer(tmp_path, v1, change, fragment):
    model = write_zf5(tmp_path / "zf5.caffemodel", known_layers("zf5"), v1, **change)
    out = tmp_path / "x.pt"
    result = convert([str(model), "--backbone", "zf5", "--out", str(out)])
    assert_one_line_error(result, f"{model}: does not fit --backbone zf5: {fragment}")
    assert "; its conv weights fit, but the zf5 trunk would not run it as it was trained" in (
        result.output
    )
    assert not out.exists()


def test_zf5_second_stage_is_checked_too(tmp_path):
    sequence = caffe.read_caffemodel(
        write_zf5(tmp_path / "zf5.caffemodel", known_layers("zf5"), v1=False)
    )[2]
    assert caffe.model_lrn_before_pool(sequence, Path("m"), "zf5") is True
    norm2 = next(i for i, layer in enumerate(sequence) if layer.name == "norm2")
    other = list(sequence)
    other[norm2] = caffe.CaffeLayer("norm2", "LRN", lrn=(3, 5e-5, 0.75, 1, 2.0))  # k 2
    with pytest.raises(caffe._Mismatch, match=r"layer norm2 is LRN WITHIN_CHANNEL .* k 2; the zf5"):
        caffe.model_lrn_before_pool(other, Path("m"), "zf5")
    del other[norm2]
    with pytest.raises(caffe._Mismatch, match=r"between conv2 and conv3 .* the file has pool2 "):
        caffe.model_lrn_before_pool(other, Path("m"), "zf5")


def test_first_mismatching_layer_is_named(tmp_path):
    layers = known_layers("zf5")
    layers["conv4"][0] = layers["conv4"][0][:, :100]  # conv4 reads 100 channels, not 384
    model = write_caffemodel(tmp_path / "zf5.caffemodel", layers, v1=False)
    result = convert([str(model), "--backbone", "zf5", "--out", str(tmp_path / "x.pt")])
    assert_one_line_error(result, "layer conv4 has weight (384, 100, 3, 3)")
    layers = known_layers("zf5")
    layers["fc7"][0] = layers["fc7"][0][:, :5]
    model = write_caffemodel(tmp_path / "zf5.caffemodel", layers, v1=False)
    result = convert([str(model), "--backbone", "zf5", "--out", str(tmp_path / "x.pt")])
    assert_one_line_error(result, "layer fc7 has weight (16, 5)")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--mean", "1,2"], "--mean 1,2: expected three numbers"),
        (["--mean-file", "absent.binaryproto"], "mean file not found"),
        (["--mean", "1,2,3", "--mean-file", "m"], "give one of them"),
    ],
    ids=["mean-two-values", "mean-file-missing", "mean-and-mean-file"],
)
def test_bad_mean_options(tmp_path, args, fragment):
    model = write_caffemodel(tmp_path / "zf5.caffemodel", known_layers("zf5"), v1=False)
    result = convert([str(model), "--backbone", "zf5", "--out", str(tmp_path / "x.pt"), *args])
    assert_one_line_error(result, fragment)


def test_missing_model_and_missing_protobuf(tmp_path, monkeypatch):
    result = convert([str(tmp_path / "absent.caffemodel"), "--backbone", "zf5", "--out", "x.pt"])
    assert_one_line_error(result, "Caffe model not found")
    (tmp_path / "empty.caffemodel").write_bytes(b"")
    result = convert([str(tmp_path / "empty.caffemodel"), "--backbone", "zf5", "--out", "x.pt"])
    assert_one_line_error(result, "no layer with weights")
    monkeypatch.setitem(sys.modules, "google.protobuf", None)  # import now fails
    caffe.caffe_messages.cache_clear()
    try:
        with pytest.raises(UserError, match=r"pip install 'spp-detect\[caffe\]'"):
            caffe.read_caffemodel(Path(__file__))
    finally:
        caffe.caffe_messages.cache_clear()


def test_blob_with_too_few_values_is_one_line(tmp_path):
    messages = caffe.caffe_messages()
    net = messages.NetParameter()
    blob = net.layer.add(name="conv1").blobs.add()
    blob.shape.dim.extend([2, 3])
    blob.data.extend([1.0] * 5)
    model = tmp_path / "damaged.caffemodel"
    model.write_bytes(net.SerializeToString())
    result = convert([str(model), "--backbone", "zf5", "--out", str(tmp_path / "x.pt")])
    assert_one_line_error(result, "layer conv1: a blob holds 5 values for shape (2, 3)")


def test_bad_mean_file_and_bad_stored_mean(tmp_path):
    model = write_caffemodel(tmp_path / "zf5.caffemodel", known_layers("zf5"), v1=False)
    not_a_mean = tmp_path / "mean.binaryproto"
    not_a_mean.write_bytes(_blob(np.zeros((2, 3), np.float32), v1=False).SerializeToString())
    args = [str(model), "--backbone", "zf5", "--out", str(tmp_path / "x.pt")]
    result = convert([*args, "--mean-file", str(not_a_mean)])
    assert_one_line_error(result, "not a Caffe mean image")

    state = dict(build_backbone("zf5", "none").state_dict())
    state[CAFFE_MEAN_KEY] = torch.tensor([1.0, float("nan"), 3.0])
    torch.save(state, tmp_path / "bad_mean.pt")
    with pytest.raises(UserError, match="must hold 3 finite BGR values"):
        build_backbone("zf5", str(tmp_path / "bad_mean.pt"))
