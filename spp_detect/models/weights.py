"""Weights of the conv trunks: where they come from, loading them into a trunk, and saving a
trunk as a weights file (``build_backbone``, ``trunk_state``, ``load_classifier_state``).

Weights are ``imagenet`` (an EfficientNet-Lite trunk's packaged ImageNet weights, sha256
checked), ``none`` (random, seeded, so every stage and process sees the same network), a
torchvision weights name (``AlexNet_Weights.IMAGENET1K_V1`` or just ``IMAGENET1K_V1``; fetched
into the torch hub cache when online) or a local file loaded with ``weights_only=True``: the
trunk's own state dict or a full torchvision classification state dict (``features.*`` keys).
A file converted from Caffe (``spp_detect.models.caffe``) also holds its pixel mean
(``CAFFE_MEAN_KEY``), which sets the trunk's normalisation, and a caffenet file its pool/norm
order (``LRN_BEFORE_POOL_KEY``).

Shapes: F fc width, C channels of the last conv layer, n side of the pooled map fc6 reads.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from spp_detect.data.image import caffe_bgr_mean, caffe_bgr_normalization
from spp_detect.errors import UserError
from spp_detect.models import efficientnet_lite as lite
from spp_detect.models.backbones import (
    BACKBONES,
    DEFAULT_NORMALIZATION,
    RANDOM_INIT_SEED,
    Backbone,
    caffenet_trunk,
    check_backbone_name,
    check_last_stage,
    lrn_before_pool,
    random_trunk,
)

logger = logging.getLogger(__name__)


# extract.weights of a Lite trunk: the ImageNet file that its package ships
PACKAGED_WEIGHTS = "imagenet"


WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")  # names that can only be files


# (3,) float32 BGR mean in a weights file converted from Caffe: its trunk is fed BGR 0–255
# pixels minus this mean, as the Caffe model was trained (docs/contracts.md, data/README.md)
CAFFE_MEAN_KEY = "normalization.caffe_bgr_mean"


# () bool in a caffenet weights file: True for bvlc_alexnet (norm1 before pool1, norm2 before
# pool2), False for bvlc_reference_caffenet (pool, then norm). convert-weights reads the order
# from the model and always writes it; a file without it runs in CaffeNet's order.
LRN_BEFORE_POOL_KEY = "architecture.lrn_before_pool"


def build_backbone(name: str, weights: str, last_stage: str = "") -> Backbone:
    """The ``name`` trunk with ``weights`` ("imagenet" for a Lite trunk's packaged weights |
    torchvision name | local file | "none"), ending at ``last_stage`` (Lite trunks; "" = the
    default), eval mode.

    Raises UserError for an unknown name, a missing or unfit weights file (mismatched keys named),
    a missing or altered weights package, or a torchvision name that is neither cached nor
    downloadable.
    """
    check_backbone_name(name)
    check_last_stage(name, last_stage)
    backbone = random_trunk(name, last_stage)
    if is_random(weights):
        logger.warning(
            "RANDOM CONV WEIGHTS (extract.weights=none): the %s trunk is random (seed %d); "
            "fine for tests, not for detection: use extract.weights=%s",
            name, RANDOM_INIT_SEED, default_weights(name),
        )  # fmt: skip
    else:
        state, source = load_weights_state(name, weights)
        if name == "caffenet" and _stored_lrn_before_pool(state, source):
            backbone = caffenet_trunk(lrn_before_pool=True)
        if lite.is_package_state(state):
            state = _lite_trunk_state(name, state, source, backbone)
        _load_trunk(backbone, state, source)
        if CAFFE_MEAN_KEY in state:
            backbone.normalization = _caffe_normalization(state[CAFFE_MEAN_KEY], source)
    backbone.requires_grad_(False)
    return backbone.eval()


def is_random(weights: str) -> bool:
    """Whether ``extract.weights`` asks for random conv layers."""
    return weights.strip().lower() == "none"


def default_weights(name: str) -> str:
    """The pretrained weights to suggest for a trunk (what a user most likely wants)."""
    if name in lite.VARIANTS:
        return PACKAGED_WEIGHTS
    if name in ("alexnet", "vgg16"):
        return "IMAGENET1K_V1"
    return f"a converted {name} file (spp-detect convert-weights)"


def load_weights_state(name: str, weights: str) -> tuple[dict[str, Tensor], str]:
    """The full state dict behind ``weights`` and a description of where it came from."""
    if name in lite.VARIANTS and weights.strip().lower() == PACKAGED_WEIGHTS:
        variant = lite.VARIANTS[name]
        path = lite.package_weights_path(variant)
        return _read_state_file(path), f"{variant.package} ({path.name})"
    path = Path(weights).expanduser()
    if path.is_file():
        return _read_state_file(path), str(path)
    if path.exists() or _looks_like_path(weights):
        raise UserError(
            f"{weights}: weights file not found; fix extract.weights (a file, a torchvision "
            "weights name or none)"
        )
    return _torchvision_state(name, weights)


def _looks_like_path(weights: str) -> bool:
    return "/" in weights or "\\" in weights or weights.lower().endswith(WEIGHT_SUFFIXES)


def _read_state_file(path: Path) -> dict[str, Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        raise UserError(
            f"{path}: not a loadable weights file ({type(exc).__name__}); pass a state dict "
            "saved with torch.save"
        ) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(
            f"{path}: not a state dict of tensors; pass a state dict saved with torch.save"
        )
    return {key.removeprefix("module."): value for key, value in state.items()}


def _torchvision_state(name: str, weights: str) -> tuple[dict[str, Tensor], str]:
    if name in lite.VARIANTS:
        raise UserError(
            f"extract.weights: {weights!r} is not a file; {name} takes {PACKAGED_WEIGHTS} (its "
            f"ImageNet weights from {lite.VARIANTS[name].package}), a local file or none"
        )
    if name in ("zf5", "caffenet"):
        raise UserError(
            f"extract.weights: {weights!r} is not a file and {name} has no torchvision weights; "
            f"pass a local {name} state dict or none"
        )
    entry = _torchvision_weights(name, weights)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(entry.url).name
    if not cached.is_file():
        _download(entry, cached)
    return _read_state_file(cached), f"{type(entry).__name__}.{entry.name}"


def _torchvision_weights(name: str, weights: str):  # -> torchvision WeightsEnum member
    from torchvision.models import get_model_weights

    enum = get_model_weights(name)
    member = weights.split(".")[-1]
    owner = weights.rsplit(".", 1)[0] if "." in weights else enum.__name__
    valid = ", ".join(f"{enum.__name__}.{w.name}" for w in enum)
    if owner != enum.__name__ or (member not in enum.__members__ and member != "DEFAULT"):
        raise UserError(
            f"extract.weights: {weights!r} is not a file nor a weights name for {name}; "
            f"use one of {valid}, a local file or none"
        )
    return enum.DEFAULT if member == "DEFAULT" else enum[member]


def _download(entry, cached: Path) -> None:
    label = f"{type(entry).__name__}.{entry.name}"
    logger.info("downloading %s into %s", label, cached)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(entry.url, str(cached), progress=True)
    except Exception as exc:  # URLError, HTTPError, socket and SSL errors when offline
        raise UserError(
            f"extract.weights: {label} is not in the torch hub cache ({cached}) and could not be "
            f"downloaded ({type(exc).__name__}); run once with network access, or download "
            f"{entry.url} to {cached}, or pass a local weights file"
        ) from None


def _lite_trunk_state(
    name: str, state: Mapping[str, Tensor], source: str, backbone: Backbone
) -> dict[str, Tensor]:
    """A Lite package state dict as the trunk's folded ``features.*`` tensors; UserError
    naming both when the file is another trunk's."""
    variant = lite.package_variant(state)
    if variant is None or variant.name != name:
        _refuse_other_trunk(source, variant.name if variant else "EfficientNet (unknown)", name)
    stage = max(int(key[len("stage") :]) for key in backbone.layers if key != "stem")
    return lite.folded_state(state, variant, stage)


def _refuse_other_trunk(source: str, held: str, backbone: str) -> None:
    raise UserError(
        f"{source}: holds {held} weights but extract.backbone is {backbone}; "
        f"set extract.backbone={held} or pass {backbone} weights"
    )


def _weights_trunk(state: Mapping[str, Tensor]) -> str | None:
    """The trunk whose ``features.*`` shapes a state dict has, when it fits one exactly."""
    shapes = {k: tuple(v.shape) for k, v in state.items() if k.startswith("features.")}
    for name in BACKBONES:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in random_trunk(name).state_dict().items()}
        if shapes and all(expected.get(k) == shape for k, shape in shapes.items()):
            return name
    return None


def _load_trunk(backbone: Backbone, state: Mapping[str, Tensor], source: str) -> None:
    """Copy ``features.*`` tensors into the trunk; any key or shape mismatch is one UserError."""
    if not any(key.startswith("features.") for key in state):
        state = {f"features.{key}": value for key, value in state.items()}  # a bare Sequential
    trunk = {k: v for k, v in state.items() if k.startswith("features.")}
    expected = backbone.state_dict()
    problems = []
    missing = [key for key in expected if key not in trunk]
    unexpected = [key for key in trunk if key not in expected]
    shapes = [
        f"{key} {tuple(trunk[key].shape)} vs {tuple(value.shape)}"
        for key, value in expected.items()
        if key in trunk and trunk[key].shape != value.shape
    ]
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
        if items:
            shown = ", ".join(items[:4]) + (f" (+{len(items) - 4} more)" if len(items) > 4 else "")
            problems.append(f"{label} {shown}")
    if problems:
        held = _weights_trunk(trunk)
        if held is not None and held != backbone.name:
            _refuse_other_trunk(source, held, backbone.name)
        raise UserError(
            f"{source}: weights do not fit the {backbone.name} trunk ({'; '.join(problems)}); "
            f"pass weights made for extract.backbone={backbone.name}"
        )
    backbone.load_state_dict(trunk)
    logger.info("%s conv layers loaded from %s", backbone.name, source)


def _caffe_normalization(mean: Tensor, source: str) -> str:
    """The normalisation named by a weights file's ``CAFFE_MEAN_KEY`` (3,) BGR mean."""
    if mean.shape != (3,) or not bool(torch.isfinite(mean).all()):
        raise UserError(
            f"{source}: {CAFFE_MEAN_KEY} must hold 3 finite BGR values, got shape "
            f"{tuple(mean.shape)}; convert the Caffe model again with spp-detect convert-weights"
        )
    return caffe_bgr_normalization(mean.tolist())


def _stored_lrn_before_pool(state: Mapping[str, Tensor], source: str) -> bool:
    """A caffenet weights file's ``LRN_BEFORE_POOL_KEY``; False (CaffeNet's order) without it."""
    if LRN_BEFORE_POOL_KEY not in state:
        return False
    flag = state[LRN_BEFORE_POOL_KEY]
    if flag.numel() != 1 or float(flag.reshape(())) not in (0.0, 1.0):
        raise UserError(
            f"{source}: {LRN_BEFORE_POOL_KEY} must hold one value, 1 (norm before pool, "
            f"bvlc_alexnet) or 0 (pool before norm, CaffeNet), got shape {tuple(flag.shape)}; "
            "convert the Caffe model again with spp-detect convert-weights"
        )
    return bool(flag.reshape(()))


def trunk_state(backbone: Backbone) -> dict[str, Tensor]:
    """The trunk's tensors on the CPU, keyed ``features.<i>.*``: a weights file that
    ``build_backbone`` loads as a local path (a fine-tuned trunk saved ready to use).

    A trunk fed other pixels than its default (a converted Caffe model) keeps its mean under
    ``CAFFE_MEAN_KEY``, so the saved trunk is fed as it was trained; a caffenet trunk keeps its
    pool/norm order under ``LRN_BEFORE_POOL_KEY``, so it runs as it was trained.
    """
    state = {key: value.detach().cpu().clone() for key, value in backbone.state_dict().items()}
    mean = caffe_bgr_mean(backbone.normalization)
    if mean is not None and backbone.normalization != DEFAULT_NORMALIZATION[backbone.name]:
        state[CAFFE_MEAN_KEY] = torch.tensor(mean, dtype=torch.float32)
    if backbone.name == "caffenet":
        state[LRN_BEFORE_POOL_KEY] = torch.tensor(lrn_before_pool(backbone))
    return state


def load_classifier_state(name: str, weights: str) -> dict[str, Tensor] | None:
    """Pretrained fc6/fc7 behind ``weights``, or None when there are none.

    Returns ``fc6.weight`` (F, C·n²) in the classifier's own column order (torchvision flattens
    its n×n pooled map channel-major: n = 6 AlexNet, 7 VGG16), ``fc6.bias`` (F,), ``fc7.weight``
    (F, F), ``fc7.bias`` (F,). Source keys: ``fc6.*``/``fc7.*`` directly, or the first two linear
    layers of ``classifier.*`` (torchvision). None for "none", for the Lite trunks (no fc layers),
    for files without a classifier and for classifiers holding non-finite values (torchvision
    ``VGG16_Weights.IMAGENET1K_FEATURES``).
    """
    check_backbone_name(name)
    if is_random(weights) or name in lite.VARIANTS:
        return None
    state, source = load_weights_state(name, weights)
    if all(f"{layer}.{kind}" in state for layer in ("fc6", "fc7") for kind in ("weight", "bias")):
        result = {key: state[key] for key in ("fc6.weight", "fc6.bias", "fc7.weight", "fc7.bias")}
    else:
        linear = sorted(
            int(key.split(".")[1])
            for key, value in state.items()
            if key.startswith("classifier.") and key.endswith(".weight") and value.ndim == 2
        )
        if len(linear) < 2:
            return None
        result = {}
        for layer, index in zip(("fc6", "fc7"), linear[:2], strict=True):
            result[f"{layer}.weight"] = state[f"classifier.{index}.weight"]
            result[f"{layer}.bias"] = state[f"classifier.{index}.bias"]
    if not all(bool(torch.isfinite(value).all()) for value in result.values()):
        logger.info("%s: the classifier holds non-finite values; fc6/fc7 start at random", source)
        return None
    return {key: value.float() for key, value in result.items()}
