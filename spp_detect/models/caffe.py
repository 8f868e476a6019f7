"""Caffe ``.caffemodel`` files → weights files that ``extract.weights`` loads.

``spp-detect convert-weights MODEL.caffemodel --backbone zf5|alexnet|vgg16|caffenet --out FILE.pt``.

A ``.caffemodel`` is a serialised ``caffe.NetParameter`` (BVLC/caffe
``src/caffe/proto/caffe.proto``). Its layers are either the current ``layer`` messages
(``LayerParameter``) or the older ``layers`` (``V1LayerParameter``, the format of 2014 models
such as SPP-net's ZF-5); each holds its parameters as ``BlobProto``s, weight then bias. The
schema here declares only the fields read, with caffe.proto's field numbers, and is built in
Python at run time, so no ``protoc`` is needed; every other field is skipped as unknown.

The conv layers map by name onto the trunk's ``features.<i>`` keys (``backbones.conv_layout``)
and must have exactly its shapes: Caffe and PyTorch both store conv weights as
(out, in, kh, kw), and the channels stay in the model's BGR order. fc6/fc7, when present and
usable, become ``fc6.*``/``fc7.*`` (what ``weights.load_classifier_state`` reads). The
pixel mean the model was trained with is written under ``weights.CAFFE_MEAN_KEY``, so
``extract`` feeds the trunk BGR 0–255 pixels minus that mean.

``zf5`` and ``caffenet`` are also checked beyond their conv shapes: the LRN and pooling layers
between conv1 and conv2 and between conv2 and conv3 must be the trunk's (max-pool 3×3 stride 2
pad 0 for both; zf5: within-channel LRN 3, α 5e-5, β 0.75, norm then pool; caffenet:
across-channel LRN 5, α 1e-4, β 0.75). caffenet's order — pool then norm (CaffeNet) or norm
then pool (BVLC AlexNet) — is read from the file and written under
``weights.LRN_BEFORE_POOL_KEY``, so the one trunk name runs either model as it was trained;
a caffenet file without its LRN and pooling layers is refused, a zf5 one converts unchecked.

Shapes: C conv5 channels, F fc width, n side of the pooled map fc6 reads, H/W a mean image.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from spp_detect.data.image import CAFFE_PIXEL_MEAN, FAST_RCNN_PIXEL_MEANS, ILSVRC_2012_BGR_MEAN
from spp_detect.errors import UserError
from spp_detect.models.backbones import (
    CAFFENET_LRN_ALPHA,
    CAFFENET_LRN_BETA,
    CAFFENET_LRN_SIZE,
    CONVERTIBLE,
    ZF5_LRN_ALPHA,
    ZF5_LRN_BETA,
    ZF5_LRN_SIZE,
    check_backbone_name,
    conv_layout,
)
from spp_detect.models.weights import CAFFE_MEAN_KEY, LRN_BEFORE_POOL_KEY
from spp_detect.runtime.artifacts import save_torch

logger = logging.getLogger(__name__)

# caffe.proto's field numbers for the fields read here (BVLC/caffe src/caffe/proto/caffe.proto).
# Each field: (name, number, type, repeated[, default]); a capitalised type is a scalar
# (FieldDescriptorProto.TYPE_<type>), any other a message of this schema. Enums are read as
# INT32 (the same varint on the wire): V1 LayerType, NormRegion, PoolMethod.
_SCHEMA = (
    ("BlobShape", (("dim", 1, "INT64", True),)),
    (
        "BlobProto",
        (
            ("num", 1, "INT32", False),  # num/channels/height/width: the legacy 4-d shape
            ("channels", 2, "INT32", False),
            ("height", 3, "INT32", False),
            ("width", 4, "INT32", False),
            ("data", 5, "FLOAT", True),
            ("shape", 7, "BlobShape", False),  # the shape since Caffe's N-d blobs (2015)
            ("double_data", 8, "DOUBLE", True),
        ),
    ),
    (
        "LRNParameter",
        (
            ("local_size", 1, "UINT32", False, "5"),
            ("alpha", 2, "FLOAT", False, "1"),
            ("beta", 3, "FLOAT", False, "0.75"),
            ("norm_region", 4, "INT32", False, "0"),  # ACROSS_CHANNELS 0, WITHIN_CHANNEL 1
            ("k", 5, "FLOAT", False, "1"),
        ),
    ),
    (
        "PoolingParameter",
        (
            ("pool", 1, "INT32", False, "0"),  # MAX 0, AVE 1, STOCHASTIC 2
            ("kernel_size", 2, "UINT32", False),
            ("stride", 3, "UINT32", False, "1"),
            ("pad", 4, "UINT32", False, "0"),
        ),
    ),
    (
        "LayerParameter",
        (
            ("name", 1, "STRING", False),
            ("type", 2, "STRING", False),  # "Convolution", "LRN", "Pooling", …
            ("blobs", 7, "BlobProto", True),
            ("lrn_param", 118, "LRNParameter", False),
            ("pooling_param", 121, "PoolingParameter", False),
        ),
    ),
    (
        "V1LayerParameter",
        (
            ("name", 4, "STRING", False),
            ("type", 5, "INT32", False),  # enum LayerType: LRN 15, POOLING 17
            ("blobs", 6, "BlobProto", True),
            ("lrn_param", 18, "LRNParameter", False),
            ("pooling_param", 19, "PoolingParameter", False),
        ),
    ),
    (
        "NetParameter",
        (
            ("name", 1, "STRING", False),
            ("layers", 2, "V1LayerParameter", True),  # deprecated V1 layout
            ("layer", 100, "LayerParameter", True),
        ),
    ),
)

# The (B, G, R) mean each backbone's released Caffe models expect; --mean/--mean-file override.
DEFAULT_BGR_MEANS = {
    "zf5": (CAFFE_PIXEL_MEAN,) * 3,  # SPP-net's release subtracts 128 (docs/method.md#image-scales)
    "alexnet": FAST_RCNN_PIXEL_MEANS,
    "vgg16": FAST_RCNN_PIXEL_MEANS,
    "caffenet": ILSVRC_2012_BGR_MEAN,
}
FC_LAYERS = ("fc6", "fc7")
# the backbones whose LRN and pooling layers after conv1 and conv2 are checked (trunk_lrn_pool)
LRN_POOL_CHECKED = ("zf5", "caffenet")
_V1_LAYER_TYPES = {15: "LRN", 17: "Pooling"}  # V1LayerParameter.LayerType values read here
_ACROSS_CHANNELS, _WITHIN_CHANNEL = 0, 1  # LRNParameter.NormRegion
_NORM_REGIONS = {_ACROSS_CHANNELS: "ACROSS_CHANNELS", _WITHIN_CHANNEL: "WITHIN_CHANNEL"}
_POOL_METHODS = {0: "MAX", 1: "AVE", 2: "STOCHASTIC"}  # PoolingParameter.PoolMethod
# PoolingParameter (pool, kernel_size, stride, pad) after conv1 and conv2 of zf5 and caffenet
_MAX_POOL_3X3_STRIDE_2 = (0, 3, 2, 0)


@dataclass(frozen=True)
class CaffeLayer:
    """One layer of a ``.caffemodel`` in file order: ``name``, ``kind`` (its type: "LRN",
    "Pooling", "Convolution", …; a V1 type other than LRN and POOLING as its number),
    ``lrn`` (local_size, alpha, beta, norm_region, k) of an LRN layer and ``pool`` (method,
    kernel_size, stride, pad) of a pooling layer, else None."""

    name: str
    kind: str
    lrn: tuple[int, float, float, int, float] | None = None
    pool: tuple[int, int, int, int] | None = None


class _Mismatch(Exception):
    """The file's layers do not fit the trunk; the message names the first layer that does not."""


def _protobuf() -> SimpleNamespace:
    """The protobuf modules used here, or one line saying how to install them."""
    try:
        from google.protobuf import descriptor_pb2, descriptor_pool, message, message_factory
    except ImportError:
        raise UserError(
            "protobuf: not installed, and convert-weights reads .caffemodel files with it; "
            "pip install 'spp-detect[caffe]' (or pip install protobuf)"
        ) from None
    return SimpleNamespace(
        descriptor_pb2=descriptor_pb2, pool=descriptor_pool, message=message,
        factory=message_factory,
    )  # fmt: skip


@cache
def caffe_messages() -> SimpleNamespace:
    """The message classes of the schema (``.NetParameter``, ``.LayerParameter``,
    ``.V1LayerParameter``, ``.BlobProto``, ``.BlobShape``, ``.LRNParameter``,
    ``.PoolingParameter``), built from ``_SCHEMA`` in a pool of their own (a real ``caffe_pb2``
    may be loaded in the same process)."""
    protobuf = _protobuf()
    field_type = protobuf.descriptor_pb2.FieldDescriptorProto
    file = protobuf.descriptor_pb2.FileDescriptorProto(
        name="spp_detect/caffe_subset.proto", package="caffe", syntax="proto2"
    )
    for message_name, fields in _SCHEMA:
        message = file.message_type.add(name=message_name)
        for name, number, kind, repeated, *default in fields:
            label = field_type.LABEL_REPEATED if repeated else field_type.LABEL_OPTIONAL
            field = message.field.add(name=name, number=number, label=label)
            if default:
                field.default_value = default[0]  # caffe.proto's [default = …]
            if kind.isupper():
                field.type = getattr(field_type, f"TYPE_{kind}")
                if repeated:
                    field.options.packed = True  # as caffe.proto declares its numeric arrays
            else:
                field.type, field.type_name = field_type.TYPE_MESSAGE, f".caffe.{kind}"
    pool = protobuf.pool.DescriptorPool()
    pool.Add(file)
    return SimpleNamespace(
        **{
            name: protobuf.factory.GetMessageClass(pool.FindMessageTypeByName(f"caffe.{name}"))
            for name, _ in _SCHEMA
        }
    )


def blob_array(blob) -> np.ndarray:
    """A ``BlobProto``'s values as float32 in its stored shape: ``shape.dim``, else the legacy
    (num, channels, height, width). ``double_data`` is cast: the trunks are float32.
    ValueError when the value count does not fit the shape."""
    if blob.HasField("shape"):
        shape = tuple(int(d) for d in blob.shape.dim)
    else:
        shape = (blob.num, blob.channels, blob.height, blob.width)
    values = blob.data if len(blob.data) else blob.double_data
    array = np.array(values, dtype=np.float32)
    if array.size != math.prod(shape):
        raise ValueError(f"{array.size} values for shape {shape}")
    return array.reshape(shape)


def read_caffemodel(
    path: Path,
) -> tuple[dict[str, list[np.ndarray]], str, tuple[CaffeLayer, ...]]:
    """The layers of a ``.caffemodel`` that hold blobs, name → blobs (float32, stored shapes),
    in file order (a repeated name keeps its first layer); the layout: "layer" or "V1 layers";
    and every layer, with or without blobs, in file order (``CaffeLayer``: the pooling and LRN
    settings that ``model_lrn_before_pool`` checks). UserError for a missing, truncated or
    damaged file, or one without weights."""
    if not path.is_file():
        raise UserError(f"{path}: Caffe model not found; check the path")
    protobuf, messages = _protobuf(), caffe_messages()
    net = messages.NetParameter()
    try:
        net.ParseFromString(path.read_bytes())
    except protobuf.message.DecodeError:
        raise UserError(
            f"{path}: not a readable Caffe model (the protobuf data is truncated or damaged); "
            "download the .caffemodel again (the binary model, not its .prototxt)"
        ) from None
    layout = "layer" if len(net.layer) else "V1 layers"
    layers: dict[str, list[np.ndarray]] = {}
    sequence = []
    for layer in net.layer if len(net.layer) else net.layers:
        sequence.append(_caffe_layer(layer))
        if not len(layer.blobs) or layer.name in layers:
            continue
        try:
            layers[layer.name] = [blob_array(blob) for blob in layer.blobs]
        except ValueError as exc:
            raise UserError(
                f"{path}: layer {layer.name}: a blob holds {exc}; the file is damaged, "
                "download it again"
            ) from None
    if not layers:
        raise UserError(
            f"{path}: no layer with weights; pass a binary .caffemodel (one older than 2014, "
            "with V0 layers, must first be upgraded with Caffe's upgrade_net_proto_binary)"
        )
    return layers, layout, tuple(sequence)


def _caffe_layer(layer) -> CaffeLayer:
    """A ``LayerParameter`` or ``V1LayerParameter`` as a ``CaffeLayer``."""
    kind = layer.type if isinstance(layer.type, str) else _V1_LAYER_TYPES.get(layer.type)
    kind = kind if kind is not None else str(layer.type)
    lrn = pool = None
    if kind == "LRN":
        p = layer.lrn_param
        lrn = (p.local_size, p.alpha, p.beta, p.norm_region, p.k)
    elif kind == "Pooling":
        p = layer.pooling_param
        pool = (p.pool, p.kernel_size, p.stride, p.pad)
    return CaffeLayer(layer.name, kind, lrn, pool)


def _strip_leading_ones(shape: Sequence[int]) -> tuple[int, ...]:
    """``shape`` without leading 1s: V1 blobs are always 4-d, so a bias is stored as
    (1, 1, 1, out) and an fc weight as (1, 1, out, in)."""
    shape = tuple(shape)
    while len(shape) > 1 and shape[0] == 1:
        shape = shape[1:]
    return shape


def _weight_bias(layers: Mapping[str, list[np.ndarray]], name: str) -> tuple[np.ndarray, ...]:
    """A layer's (weight, bias), shapes without leading 1s; _Mismatch when it has other blobs."""
    blobs = layers[name]
    if len(blobs) != 2:
        raise _Mismatch(f"layer {name} has {len(blobs)} blob(s), not a weight and a bias")
    return tuple(blob.reshape(_strip_leading_ones(blob.shape)) for blob in blobs)


def conv_state(layers: Mapping[str, list[np.ndarray]], backbone: str) -> dict[str, np.ndarray]:
    """``features.<i>.weight`` (out, in, kh, kw) and ``.bias`` (out,) of every conv layer of
    ``backbone``, taken from the Caffe layer of the same name (``backbones.CONV_LAYERS``);
    _Mismatch naming the first layer that is missing or has other shapes."""
    state = {}
    for layer, prefix, weight_shape, bias_shape in conv_layout(backbone):
        if layer not in layers:
            present = ", ".join(list(layers)[:8]) or "none"
            raise _Mismatch(f"no layer {layer} (layers with weights: {present})")
        weight, bias = _weight_bias(layers, layer)
        if weight.shape != weight_shape or bias.shape != bias_shape:
            raise _Mismatch(
                f"layer {layer} has weight {weight.shape} and bias {bias.shape}, the {backbone} "
                f"trunk needs {weight_shape} and {bias_shape}"
            )
        state[f"{prefix}.weight"], state[f"{prefix}.bias"] = weight, bias
    return state


def classifier_state(
    layers: Mapping[str, list[np.ndarray]], channels: int
) -> tuple[dict[str, np.ndarray], str]:
    """fc6/fc7 as ``load_classifier_state`` reads them: ``fc6.weight`` (F, C·n²),
    ``fc6.bias`` (F,), ``fc7.weight`` (F, F), ``fc7.bias`` (F,); or {} and why they are left
    out. _Mismatch when fc6 does not read C-channel conv5 cells or fc7 does not follow fc6."""
    if not all(name in layers for name in FC_LAYERS):
        return {}, "not in the file"
    fc6_weight, fc6_bias = _weight_bias(layers, "fc6")
    fc7_weight, fc7_bias = _weight_bias(layers, "fc7")
    if fc6_weight.ndim != 2 or fc6_bias.shape != fc6_weight.shape[:1]:
        raise _Mismatch(f"layer fc6 has weight {fc6_weight.shape} and bias {fc6_bias.shape}")
    width, inputs = fc6_weight.shape
    if inputs % channels:
        raise _Mismatch(f"layer fc6 reads {inputs} inputs, not cells of the {channels} channels")
    if fc7_weight.shape != (width, width) or fc7_bias.shape != (width,):
        raise _Mismatch(f"layer fc7 has weight {fc7_weight.shape}, fc6 needs {(width, width)}")
    cells = inputs // channels
    if math.isqrt(cells) ** 2 != cells:
        # SPP-net's own fc6 reads its whole pyramid (12,800 inputs for ZF-5): finetune can
        # start fc6 only from one n×n map (head.init_from_classifier), so it is not written
        return {}, f"left out, fc6 reads a pyramid ({cells} cells per channel), not one n×n map"
    state = {"fc6.weight": fc6_weight, "fc6.bias": fc6_bias}
    state.update({"fc7.weight": fc7_weight, "fc7.bias": fc7_bias})
    return state, ""


def trunk_lrn_pool(backbone: str) -> tuple[tuple, tuple, bool | None]:
    """The LRN (local_size, alpha, beta, norm_region, k) and pooling (method, kernel_size,
    stride, pad) settings that ``backbone``'s trunk has after conv1 and after conv2, and whether
    it normalises before it pools: True for zf5, None for caffenet (either, read from the file)."""

    trunks = {
        "zf5": ((ZF5_LRN_SIZE, ZF5_LRN_ALPHA, ZF5_LRN_BETA, _WITHIN_CHANNEL, 1.0), True),
        "caffenet": (
            (CAFFENET_LRN_SIZE, CAFFENET_LRN_ALPHA, CAFFENET_LRN_BETA, _ACROSS_CHANNELS, 1.0),
            None,
        ),
    }
    lrn, lrn_first = trunks[backbone]  # KeyError: a backbone not in LRN_POOL_CHECKED
    return lrn, _MAX_POOL_3X3_STRIDE_2, lrn_first


def model_lrn_before_pool(
    sequence: Sequence[CaffeLayer], model: Path, backbone: str
) -> bool | None:
    """Whether the model normalises before it pools (zf5 and bvlc_alexnet: conv, relu, norm,
    pool) or after (bvlc_reference_caffenet: conv, relu, pool, norm), read from the layers
    between conv1 and conv2 and between conv2 and conv3, whose settings and, for zf5, order
    must be the trunk's (``trunk_lrn_pool``). _Mismatch naming the layer that differs. A file
    holding only the layers with weights cannot be checked: None for zf5 (its order is fixed),
    UserError for caffenet (the order cannot be read)."""
    lrn_setting, pool_setting, fixed_order = trunk_lrn_pool(backbone)
    if not any(layer.kind in ("LRN", "Pooling") for layer in sequence):
        if fixed_order is not None:
            return None
        raise UserError(
            f"{model}: no LRN or pooling layers, only the layers with weights, so it cannot tell "
            "CaffeNet (pool, then norm) from BVLC AlexNet (norm, then pool); pass the "
            ".caffemodel as Caffe saved it"
        )
    names = [layer.name for layer in sequence]
    orders = []
    for first, second in (("conv1", "conv2"), ("conv2", "conv3")):
        between = sequence[names.index(first) + 1 : names.index(second)]
        lrns = [layer for layer in between if layer.kind == "LRN"]
        pools = [layer for layer in between if layer.kind == "Pooling"]
        if len(lrns) != 1 or len(pools) != 1:
            found = ", ".join(f"{layer.name} ({layer.kind})" for layer in lrns + pools)
            raise _Mismatch(
                f"between {first} and {second} the {backbone} trunk has one max-pool and one LRN "
                f"layer, the file has {found or 'neither'}"
            )
        lrn, pool = lrns[0], pools[0]
        if not all(
            math.isclose(a, b, rel_tol=1e-6) for a, b in zip(lrn.lrn, lrn_setting, strict=True)
        ):
            raise _Mismatch(
                f"layer {lrn.name} is LRN {_lrn_text(lrn.lrn, '.6g')}; the {backbone} trunk "
                f"needs {_lrn_text(lrn_setting, 'g')}"
            )
        if pool.pool != pool_setting:
            raise _Mismatch(
                f"layer {pool.name} pools {_pool_text(pool.pool)}; the {backbone} trunk needs "
                f"{_pool_text(pool_setting)}"
            )
        orders.append(between.index(lrn) < between.index(pool))
        if fixed_order is not None and orders[-1] != fixed_order:
            raise _Mismatch(
                f"layer {pool.name} comes before {lrn.name}; the {backbone} trunk has norm, "
                f"then pool, after {first}"
            )
    if orders[0] != orders[1]:
        raise _Mismatch(
            "norm and pool come in one order after conv1 and in the other after conv2; the "
            "caffenet trunk (CaffeNet or BVLC AlexNet) has the same order after both"
        )
    return orders[0]


def _lrn_text(setting: tuple, spec: str) -> str:
    size, alpha, beta, region, k = setting
    return (
        f"{_NORM_REGIONS.get(region, region)} local_size {size}, alpha {alpha:{spec}}, "
        f"beta {beta:{spec}}, k {k:{spec}}"
    )


def _pool_text(setting: tuple) -> str:
    method, kernel, stride, pad = setting
    return f"{_POOL_METHODS.get(method, method)} {kernel}×{kernel} stride {stride} pad {pad}"


def parse_bgr_mean(text: str) -> tuple[float, float, float]:
    """``--mean "B,G,R"`` as three finite floats; UserError otherwise."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise UserError(
            f"--mean {text}: expected three numbers B,G,R subtracted from 0–255 pixels "
            "(e.g. 102.98,115.95,122.77)"
        )
    return values


def read_mean_file(path: Path) -> tuple[float, float, float]:
    """The per-channel (B, G, R) mean of a Caffe mean image (``mean.binaryproto``: one
    ``BlobProto`` (1, 3, H, W) in Caffe's BGR order). SPP-net feeds whole images of any size,
    so the mean image cannot be subtracted pixel by pixel; its channel means are, as in Fast
    R-CNN (``FAST_RCNN_PIXEL_MEANS``)."""
    if not path.is_file():
        raise UserError(f"{path}: mean file not found; check --mean-file")
    protobuf, blob = _protobuf(), caffe_messages().BlobProto()
    try:
        blob.ParseFromString(path.read_bytes())
        image = blob_array(blob)
    except (protobuf.message.DecodeError, ValueError):
        image = np.zeros(0, dtype=np.float32)
    shape = _strip_leading_ones(image.shape)
    if len(shape) != 3 or shape[0] != 3 or image.size == 0:
        raise UserError(
            f"{path}: not a Caffe mean image (a BlobProto of shape (1, 3, H, W)); pass the "
            "model's mean.binaryproto, or --mean B,G,R"
        )
    means = image.reshape(shape).astype(np.float64).mean(axis=(1, 2))
    return tuple(float(v) for v in means)


def _bgr_mean(backbone: str, mean: str | None, mean_file: Path | None) -> tuple[float, ...]:
    if mean is not None and mean_file is not None:
        raise UserError("--mean and --mean-file: give one of them, not both")
    if mean is not None:
        return parse_bgr_mean(mean)
    if mean_file is not None:
        return read_mean_file(mean_file)
    return DEFAULT_BGR_MEANS[backbone]


def _mismatch_error(
    model: Path, backbone: str, layers: Mapping[str, list[np.ndarray]], why: str
) -> UserError:
    """One line naming the first mismatching layer and which --backbone, if any, fits."""
    with contextlib.suppress(_Mismatch):
        conv_state(layers, backbone)
        return UserError(  # the conv weights fit: another layer named in `why` does not
            f"{model}: does not fit --backbone {backbone}: {why}; its conv weights fit, but the "
            f"{backbone} trunk would not run it as it was trained"
        )
    fits = []
    for other in CONVERTIBLE:
        if other != backbone:
            try:
                conv_state(layers, other)
                fits.append(other)
            except _Mismatch:
                pass
    if fits:
        advice = f"it fits --backbone {fits[0]}"
        if fits[0] == "caffenet":
            advice += (
                " (BVLC's AlexNet and CaffeNet, grouped conv2/4/5; --backbone alexnet is "
                "torchvision's AlexNet)"
            )
    else:
        advice = f"it fits none of {', '.join(CONVERTIBLE)}; pass a model of one of them"
    return UserError(f"{model}: does not fit --backbone {backbone}: {why}; {advice}")


def convert_caffemodel(
    model: Path,
    backbone: str,
    out: Path,
    mean: str | None = None,
    mean_file: Path | None = None,
) -> str:
    """Write ``out``, a weights file for ``backbone`` made from the Caffe ``model``; returns a
    one-line summary. ``mean`` ("B,G,R") or ``mean_file`` (a ``mean.binaryproto``) replace
    the backbone's usual pixel mean (``DEFAULT_BGR_MEANS``)."""
    check_backbone_name(backbone)
    bgr_mean = _bgr_mean(backbone, mean, mean_file)
    layers, layout, sequence = read_caffemodel(model)
    try:
        arrays = conv_state(layers, backbone)
        checked = backbone in LRN_POOL_CHECKED
        lrn_first = model_lrn_before_pool(sequence, model, backbone) if checked else None
        channels = conv_layout(backbone)[-1][2][0]
        classifier, left_out = classifier_state(layers, channels)
    except _Mismatch as exc:
        raise _mismatch_error(model, backbone, layers, str(exc)) from None
    arrays.update(classifier)
    state = {key: torch.from_numpy(np.ascontiguousarray(a)) for key, a in arrays.items()}
    state[CAFFE_MEAN_KEY] = torch.tensor(bgr_mean, dtype=torch.float32)
    order = ""
    if backbone == "caffenet":
        state[LRN_BEFORE_POOL_KEY] = torch.tensor(lrn_first)
        order = (
            " (norm before pool: BVLC AlexNet's order)"
            if lrn_first
            else " (pool before norm: CaffeNet's order)"
        )
    elif checked and lrn_first is None:
        order = " (LRN and pooling settings not in the file, not checked)"
    save_torch(out, state)
    names = [layer for layer, *_ in conv_layout(backbone)]
    fc = "and fc6, fc7" if classifier else f"(fc6/fc7: {left_out})"
    mean_text = ", ".join(f"{v:g}" for v in bgr_mean)
    return (
        f"{out}: {backbone} {names[0]}…{names[-1]}{order} {fc} from {model} ({layout}); "
        f"pixels BGR minus ({mean_text}); use it with --set extract.weights={out}"
    )
