"""Conv trunks (efficientnet_lite0/1/2, zf5, alexnet, vgg16, caffenet) with their total stride
and receptive-field centre.

Shapes: N images, C channels of the last conv layer, H'/W' its map size.

Each trunk ends at its last conv layer + ReLU (conv5 features are post-ReLU). Its geometry is
derived from its own layer list by :func:`receptive_center`, not typed in: ZF-5 → stride 16,
offset0 21; torchvision AlexNet → 16, 16; VGG16 → 16, 8.5; CaffeNet → 16, 18
(docs/method.md#conv-trunks, docs/method.md#projection). The EfficientNet-Lite trunks
(``spp_detect.models.efficientnet_lite``) end at stride 16 (the end of the 112-channel stage,
the analogue of conv5) or, with ``extract.last_stage``, at another stage; their geometry comes
from the same walk, through the blocks.

``caffenet`` is BVLC's AlexNet-family Caffe network (bvlc_reference_caffenet, R-CNN's model, and
bvlc_alexnet): grouped conv2/4/5, across-channel LRN. The two models differ only in the order of
pool and norm after conv1 and conv2; a converted file records it
(``weights.LRN_BEFORE_POOL_KEY``), so one name runs both.

Every trunk is built here with seeded random weights; ``spp_detect.models.weights`` loads real
ones into it (and names where they come from).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spp_detect.data.image import ILSVRC_2012_BGR_MEAN, caffe_bgr_normalization
from spp_detect.errors import UserError
from spp_detect.models import efficientnet_lite as lite

logger = logging.getLogger(__name__)

CONVERTIBLE = ("zf5", "alexnet", "vgg16", "caffenet")  # the trunks a Caffe model converts to
BACKBONES = (*lite.VARIANTS, *CONVERTIBLE)
# Where a Lite trunk ends by default: stage 5 (112 channels, stride 16), SPP-net's conv5 analogue;
# stage 7 (320 channels, stride 32) measured worse on raccoon (BENCHMARKS.md)
LITE_LAST_STAGE = "stage5"
RANDOM_INIT_SEED = 0  # random ("none") weights are seeded: extract and later stages must agree
# The pixels each trunk's own weights expect (image.image_to_tensor): ZF-5 and CaffeNet are
# Caffe models (BGR 0–255 minus their release's mean: 128; the ILSVRC 2012 mean image's
# per-channel means, as float32 like a converted file stores them), the others torchvision's.
# A weights file holding weights.CAFFE_MEAN_KEY overrides it.
DEFAULT_NORMALIZATION = {
    "zf5": "caffe_bgr",
    "alexnet": "imagenet",
    "vgg16": "imagenet",
    "caffenet": caffe_bgr_normalization(
        torch.tensor(ILSVRC_2012_BGR_MEAN, dtype=torch.float32).tolist()
    ),
    # TensorFlow's EfficientNet-Lite preprocessing; checked on photos (docs/method.md#conv-trunks)
    **dict.fromkeys(lite.VARIANTS, "rgb127"),
}

# ZF-5 local response normalisation (docs/method.md#conv-trunks, Zeiler_conv5.prototxt norm1/2).
ZF5_LRN_SIZE = 3
ZF5_LRN_ALPHA = 5e-5
ZF5_LRN_BETA = 0.75
# CaffeNet / BVLC AlexNet norm1/norm2 (their deploy.prototxt): ACROSS_CHANNELS, k = 1.
CAFFENET_LRN_SIZE = 5
CAFFENET_LRN_ALPHA = 1e-4
CAFFENET_LRN_BETA = 0.75


class WithinChannelLRN(nn.Module):
    """Caffe's WITHIN_CHANNEL LRN: x · (1 + α/size² · Σ_{size×size} x²)^(−β).

    The sum runs over the spatial neighbourhood with zero padding and the divisor is always
    size² (CAFFE-SPP ``lrn_layer.cpp``: AVE pooling with pad, counted over the padded window),
    which is ``avg_pool2d(count_include_pad=True)``.
    """

    def __init__(self, size: int, alpha: float, beta: float) -> None:
        super().__init__()
        self.size, self.alpha, self.beta = size, alpha, beta

    def forward(self, x: Tensor) -> Tensor:
        # float32 under autocast too: x² of ZF-5's conv1 outputs overflows float16
        x32 = x.float()
        mean_square = F.avg_pool2d(
            x32 * x32, self.size, stride=1, padding=(self.size - 1) // 2, count_include_pad=True
        )
        # in place on the temporary: large maps (scale 1200) would otherwise hold three copies
        return (x32 * mean_square.mul_(self.alpha).add_(1.0).pow_(-self.beta)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"size={self.size}, alpha={self.alpha}, beta={self.beta}"


class AcrossChannelLRN(nn.Module):
    """Caffe's ACROSS_CHANNELS LRN: x_c · (k + α/size · Σ_{|c'−c| ≤ (size−1)/2} x_c'²)^(−β).

    Channels outside 0 … C−1 count as zero and the divisor is always ``size`` (BVLC
    ``lrn_layer.cpp``: ``alpha_over_size`` times the sum over a zero-padded window). This is
    ``nn.LocalResponseNorm(size, alpha, beta, k)`` for odd sizes (tests/test_backbones.py checks
    both against a loop), computed in float32 by summing shifted channel slices, about twice
    as fast on the CPU as torch's 3-d average pooling.
    """

    def __init__(self, size: int, alpha: float, beta: float, k: float = 1.0) -> None:
        super().__init__()
        if size % 2 != 1:
            raise ValueError(f"across-channel LRN size must be odd, got {size}")
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k

    def forward(self, x: Tensor) -> Tensor:
        # float32 under autocast too: x² of conv1 outputs overflows float16
        x32 = x.float()
        channels, half = x32.shape[1], (self.size - 1) // 2
        padded = F.pad(x32 * x32, (0, 0, 0, 0, half, half))
        total = padded[:, :channels] + padded[:, 1 : channels + 1]
        for shift in range(2, self.size):
            total += padded[:, shift : shift + channels]
        del padded
        return (x32 * total.mul_(self.alpha / self.size).add_(self.k).pow_(-self.beta)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"size={self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}"


class Backbone(nn.Module):
    """A conv trunk: ``forward`` (N, 3, H, W) normalised images → (N, C, H', W') post-ReLU maps.

    Attributes: ``name``; ``stride`` (input pixels per map cell); ``channels`` (C); ``offset0``
    (1-based input pixel at the centre of map cell 1); ``normalization`` ("rgb127" for the
    EfficientNet-Lite trunks, "caffe_bgr" for zf5, "imagenet" for the torchvision trunks,
    "caffe_bgr:B,G,R" for caffenet and for weights converted from Caffe; see
    ``image.image_to_tensor``); ``layers``: the index in ``features`` where each named layer or
    stage starts (what ``finetune.conv_from`` names), in order.
    """

    def __init__(
        self, name: str, features: nn.Sequential, normalization: str, layers: dict[str, int]
    ) -> None:
        super().__init__()
        self.name = name
        # channels-last: ZF-5's LRN and ceil-mode pooling run faster on the CPU in this layout
        # (docs/benchmarks-history.md), and pooling reads the maps channel-last anyway
        self.features = features.to(memory_format=torch.channels_last)
        self.normalization = normalization
        self.layers = layers
        self.stride, self.offset0 = receptive_center(features)
        self.channels = [m for m in features.modules() if isinstance(m, nn.Conv2d)][-1].out_channels

    def forward(self, images: Tensor) -> Tensor:
        return self.features(images.contiguous(memory_format=torch.channels_last))

    def output_hw(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """(H', W') of the map of an (H, W) input, by the layers' size arithmetic."""
        return output_hw(self.features, image_hw)


def _pair(value: int | Sequence[int]) -> int:
    """One side of a square kernel/stride/padding (all trunks here use square ones)."""
    return int(value[0]) if isinstance(value, tuple | list) else int(value)


def _geometry(layer: nn.Module) -> tuple[int, int, int] | None:
    """(effective kernel, stride, padding) of a layer that moves the grid, else None."""
    if isinstance(layer, nn.Conv2d):
        kernel = (_pair(layer.kernel_size) - 1) * _pair(layer.dilation) + 1
        return kernel, _pair(layer.stride), _pair(layer.padding)
    if isinstance(layer, nn.MaxPool2d | nn.AvgPool2d):
        dilation = _pair(getattr(layer, "dilation", 1))
        kernel = (_pair(layer.kernel_size) - 1) * dilation + 1
        return kernel, _pair(layer.stride or layer.kernel_size), _pair(layer.padding)
    return None


def _grid_layers(layers: Iterable[nn.Module]) -> Iterator[nn.Module]:
    """The layers that move the grid, in forward order, looking inside blocks (an MBConv's
    residual keeps its grid: its stride is 1 and its padding symmetric)."""
    for layer in layers:
        if _geometry(layer) is not None:
            yield layer
        else:
            yield from _grid_layers(layer.children())


def receptive_center(layers: Sequence[nn.Module]) -> tuple[int, float]:
    """(total stride, offset0): offset0 is the 1-based input pixel at the centre of map cell 1.

    Cell 0 of a layer with kernel k and padding p covers its input cells −p … k−1−p, so its
    centre sits ((k−1)/2 − p) input cells right of the input's cell 0; in image pixels that is
    times the input's stride. Summing over the layers gives the 0-based centre; +1 makes it
    1-based as in docs/method.md#projection (ZF-5: 20 → 21).
    """
    stride, center = 1, 0.0
    for layer in _grid_layers(layers):
        kernel, layer_stride, padding = _geometry(layer)
        center += ((kernel - 1) / 2 - padding) * stride
        stride *= layer_stride
    return stride, center + 1.0


def output_hw(layers: Sequence[nn.Module], image_hw: tuple[int, int]) -> tuple[int, int]:
    """Map size after ``layers``: floor for conv, ceil or floor for pooling (PyTorch rules)."""
    sides = list(image_hw)
    for layer in _grid_layers(layers):
        kernel, stride, padding = _geometry(layer)
        ceil_mode = bool(getattr(layer, "ceil_mode", False))
        sides = [_pooled_side(side, kernel, stride, padding, ceil_mode) for side in sides]
    return sides[0], sides[1]


def _pooled_side(side: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> int:
    span = side + 2 * padding - kernel
    if span < 0:
        return 0
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= side + padding:
        out -= 1  # the last window must start inside the input (PyTorch and Caffe agree)
    return out


def _zf5_features() -> nn.Sequential:
    """ZF-5 conv1–conv5 exactly as docs/method.md#conv-trunks (Zeiler_conv5.prototxt): LRN,
    ceil-mode pooling."""

    def lrn() -> WithinChannelLRN:
        return WithinChannelLRN(ZF5_LRN_SIZE, ZF5_LRN_ALPHA, ZF5_LRN_BETA)

    return nn.Sequential(
        nn.Conv2d(3, 96, 7, stride=2, padding=1), nn.ReLU(inplace=True), lrn(),
        nn.MaxPool2d(3, stride=2, ceil_mode=True),
        nn.Conv2d(96, 256, 5, stride=2, padding=0), nn.ReLU(inplace=True), lrn(),
        nn.MaxPool2d(3, stride=2, ceil_mode=True),
        nn.Conv2d(256, 384, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 384, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
    )  # fmt: skip


def _caffenet_features(lrn_before_pool: bool = False) -> nn.Sequential:
    """CaffeNet conv1–conv5 (bvlc_reference_caffenet deploy.prototxt; docs/method.md#conv-trunks):
    conv2, conv4, conv5 in two groups, across-channel LRN and ceil-mode pooling after conv1 and
    conv2, pool before norm; ``lrn_before_pool`` puts norm before pool as bvlc_alexnet does.
    The conv layers sit at the same indices either way, so both load the same state dicts."""

    def lrn_pool() -> list[nn.Module]:
        lrn = AcrossChannelLRN(CAFFENET_LRN_SIZE, CAFFENET_LRN_ALPHA, CAFFENET_LRN_BETA)
        pool = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        return [lrn, pool] if lrn_before_pool else [pool, lrn]

    return nn.Sequential(
        nn.Conv2d(3, 96, 11, stride=4, padding=0), nn.ReLU(inplace=True), *lrn_pool(),
        nn.Conv2d(96, 256, 5, padding=2, groups=2), nn.ReLU(inplace=True), *lrn_pool(),
        nn.Conv2d(256, 384, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 384, 3, padding=1, groups=2), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, 3, padding=1, groups=2), nn.ReLU(inplace=True),
    )  # fmt: skip


def lrn_before_pool(backbone: Backbone) -> bool:
    """Whether the trunk's first across-channel LRN comes before its first max-pool
    (bvlc_alexnet's order); False in CaffeNet's order and for trunks without one."""
    kinds = [type(m) for m in backbone.features if isinstance(m, AcrossChannelLRN | nn.MaxPool2d)]
    return bool(kinds) and kinds[0] is AcrossChannelLRN


def _init_he(features: nn.Sequential) -> None:
    """He-normal weights, zero bias: activations keep their scale through the five layers."""
    for layer in features:
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)


def _torchvision_features(name: str) -> nn.Sequential:
    """torchvision's ``features`` up to the last conv + ReLU (the final max-pool dropped)."""
    import torchvision

    model = getattr(torchvision.models, name)(weights=None)
    layers = list(model.features)
    last_conv = max(i for i, layer in enumerate(layers) if isinstance(layer, nn.Conv2d))
    # keep module indices so torchvision state-dict keys (features.<i>.*) load unchanged
    return nn.Sequential(*layers[: last_conv + 2])


def random_trunk(name: str, last_stage: str = "") -> Backbone:
    """The ``name`` trunk with seeded random weights (He-normal for the conv trunks)."""
    if name == "caffenet":
        return caffenet_trunk(lrn_before_pool=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        if name in lite.VARIANTS:
            stage = lite.STAGE_NAMES.index(last_stage or LITE_LAST_STAGE)
            features, stages = lite.lite_features(lite.VARIANTS[name], stage)
            _init_he(features)
            return Backbone(name, features, DEFAULT_NORMALIZATION[name], stages)
        features = _zf5_features() if name == "zf5" else _torchvision_features(name)
        if name == "zf5":
            _init_he(features)
        return Backbone(name, features, DEFAULT_NORMALIZATION[name], _conv_starts(name, features))


def caffenet_trunk(lrn_before_pool: bool) -> Backbone:
    """The caffenet trunk in either order, seeded He-normal weights (the same in both)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        features = _caffenet_features(lrn_before_pool)
        _init_he(features)
        starts = _conv_starts("caffenet", features)
        return Backbone("caffenet", features, DEFAULT_NORMALIZATION["caffenet"], starts)


def _conv_starts(name: str, features: nn.Sequential) -> dict[str, int]:
    convs = [i for i, module in enumerate(features) if isinstance(module, nn.Conv2d)]
    return dict(zip(CONV_LAYERS[name], convs, strict=True))


# The conv layers of each trunk in order, by their usual names (the first trainable one is
# finetune.conv_from); VGG16 numbers them per block as its papers do.
CONV_LAYERS = {
    "zf5": ("conv1", "conv2", "conv3", "conv4", "conv5"),
    "alexnet": ("conv1", "conv2", "conv3", "conv4", "conv5"),
    "caffenet": ("conv1", "conv2", "conv3", "conv4", "conv5"),
    "vgg16": tuple(
        f"conv{block}_{i}"
        for block, count in enumerate((2, 2, 3, 3, 3), start=1)
        for i in range(1, count + 1)
    ),
}


def trainable_layers(backbone_name: str, last_stage: str = "") -> tuple[str, ...]:
    """What ``finetune.conv_from`` may name for a trunk: its conv layers, or for a Lite trunk
    its stem and stages up to where it ends (``extract.last_stage``)."""
    if backbone_name in lite.VARIANTS:
        end = lite.STAGE_NAMES.index(last_stage or LITE_LAST_STAGE)
        return lite.STAGE_NAMES[: end + 1]
    return CONV_LAYERS[backbone_name]


def check_last_stage(backbone_name: str, last_stage: str) -> None:
    """UserError unless ``extract.last_stage`` is "" or a stage of a Lite trunk."""
    if not last_stage:
        return
    if backbone_name not in lite.VARIANTS:
        raise UserError(
            f"extract.last_stage: {backbone_name} always ends at its last conv layer; "
            'set extract.last_stage: "" (it applies to the efficientnet_lite trunks)'
        )
    if last_stage not in lite.STAGE_NAMES[1:]:
        raise UserError(
            f"extract.last_stage: {backbone_name} has no stage {last_stage!r}; use one of "
            f"{', '.join(lite.STAGE_NAMES[1:])} (stage5: stride 16, the default; stage7: 32)"
        )


def check_conv_layer(backbone_name: str, layer: str, last_stage: str = "") -> None:
    """UserError naming the valid layers when ``finetune.conv_from`` names none of the trunk."""
    valid = trainable_layers(backbone_name, last_stage)
    if layer not in valid:
        kind = "stage" if backbone_name in lite.VARIANTS else "conv layer"
        raise UserError(
            f"finetune.conv_from: {backbone_name} has no {kind} {layer!r}; use one of "
            f'{", ".join(valid)}, or "" to keep the conv layers frozen'
        )


@cache
def conv_layout(name: str) -> tuple[tuple[str, str, tuple[int, ...], tuple[int, ...]], ...]:
    """The conv layers of the ``name`` trunk in order, each as (its name in ``CONV_LAYERS``,
    its state-dict prefix ``features.<i>``, weight shape (out, in, kh, kw), bias shape (out,)):
    what a weights file must hold (data/README.md)."""
    check_backbone_name(name)
    with torch.device("meta"):  # shapes only: no memory, no random init of VGG16's 138M weights
        trunk = random_trunk(name)
    convs = [(i, m) for i, m in enumerate(trunk.features) if isinstance(m, nn.Conv2d)]
    return tuple(
        (layer, f"features.{i}", tuple(conv.weight.shape), tuple(conv.bias.shape))
        for layer, (i, conv) in zip(CONV_LAYERS[name], convs, strict=True)
    )


def conv_layer_index(backbone: Backbone, layer: str) -> int:
    """Index in ``backbone.features`` where the layer or stage named ``layer`` starts."""
    if layer not in backbone.layers:
        check_conv_layer(backbone.name, layer)  # names the valid ones
    return backbone.layers[layer]


def check_backbone_name(name: str) -> None:
    if name not in BACKBONES:
        raise UserError(
            f"extract.backbone: unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}"
        )
