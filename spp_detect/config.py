"""Typed defaults for every stage, YAML diffs over them, strict overrides and fingerprints.

The defaults are the paper's VOC 2007 setting
(docs/method.md; deviations in docs/method.md#where-we-differ-from-the-original).
A YAML file holds only what differs; ``--set section.key=value`` overrides it. Unknown keys and
wrong types fail with the valid keys named. Only ``cli.py`` and ``stages/`` see a :class:`Config`;
library functions take explicit arguments.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from spp_detect.errors import UserError

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
PAPER_SCALES = (480, 576, 688, 864, 1200)  # paper §4.3; the released code used 874 for 864
DEFAULT_SCALES = PAPER_SCALES[:3]  # extract.scales for your own data (BENCHMARKS.md)
# finetune.iterations SIZED (-1) sizes the head's training to the split (sized_finetune): this
# many SGD iterations per training image, within the bounds below. The paper's 90,000 on VOC 2007
# trainval are 18 an image for a 4,096-wide head; a 1,024-wide head on a pretrained trunk
# needs fewer (docs/method.md#where-the-defaults-differ-from-the-paper).
SIZED = -1  # finetune.iterations: sized to the training split
ITERATIONS_PER_IMAGE = 8
MIN_SIZED_ITERATIONS = 500
MAX_SIZED_ITERATIONS = 40000
LR_STEP_AT = 2 / 3  # sized schedules drop the rate once, two thirds of the way


SCORERS = ("svm", "softmax")  # test.scorer
DATA_FORMATS = ("voc", "coco")  # data.format
EVAL_METRICS = ("voc", "coco")  # eval.metric: coco adds the COCO figures to the VOC ones
REGRESSORS = ("ridge", "head")  # test.regressor
FC_COMPRESSIONS = ("none", "svd", "int8")  # test.fc_compression (spp_detect/models/head.py)


@dataclass(frozen=True)
class DataConfig:
    """Dataset and splits; labels as in docs/method.md#conventions-and-box-format."""

    root: str = (
        "data/VOCdevkit/VOC2007"  # VOC-layout folder: Annotations/, JPEGImages/, ImageSets/Main/
    )
    classes: tuple[str, ...] = (
        VOC_CLASSES  # foreground classes, label i = classes[i]; background = K
    )
    train_split: str = (
        "trainval"  # ImageSets/Main/<name>.txt used by propose/extract/finetune/svm/bbox
    )
    test_split: str = "test"  # ImageSets/Main/<name>.txt used by test/eval
    # voc: data.root is a VOC-layout folder | coco: data.root holds the images and each split is
    # a COCO JSON file; without data.classes, the classes are its categories (docs/coco.md)
    format: str = "voc"
    # coco: each split's annotation file, relative to data.root (or absolute); {split} is
    # replaced by the split name (COCO's own naming: annotations/instances_val2017.json)
    annotations: str = "annotations/instances_{split}.json"


@dataclass(frozen=True)
class ProposeConfig:
    """Proposal step: docs/method.md#proposals."""

    method: str = "selective_search"  # selective_search | edge_boxes | mat
    mode: str = "fast"  # selective search strategy: fast | quality (OpenCV ximgproc)
    base_k: int = 150  # graph-segmentation k of the first strategy (OpenCV default)
    inc_k: int = 150  # increment of k between strategies (OpenCV default)
    sigma: float = 0.8  # graph-segmentation Gaussian sigma (released code)
    edge_model: str = ""  # structured-edge model .yml.gz for edge_boxes; "" = gradient edges
    edge_max_boxes: int = 2000  # EdgeBoxes maxBoxes (paper: about 2,000 windows per image)
    mat_file: str = (
        ""  # R-CNN/SPP-net proposal .mat (method: mat); boxes stored [y1 x1 y2 x2] 1-based
    )
    min_size: int = 20  # drop boxes narrower or shorter than this, px (released code: BoxSize)
    max_per_image: int = 0  # keep at most this many boxes per image; 0 = keep all
    # downscale images whose longer side exceeds this for proposing (boxes scaled back), px;
    # 0 = never. Phone photos (4,000 px) take minutes each at full size; VOC's 500 px are below
    # it (the voc07_* configs set 0)
    max_side: int = 800


@dataclass(frozen=True)
class ExtractConfig:
    """Image pyramid and conv trunk: docs/method.md#image-scales, #conv-trunks."""

    # efficientnet_lite0 | efficientnet_lite1 | efficientnet_lite2 | zf5 | alexnet | vgg16 |
    # caffenet (the paper's trunks are in the voc07_* configs)
    backbone: str = "efficientnet_lite0"
    # imagenet (a Lite trunk's ImageNet weights, installed with the package), a torchvision
    # weights name, a local file, or none (random conv layers: for tests only)
    weights: str = "imagenet"
    # Lite trunks: the stage whose output is pooled, "" = stage5 (112 channels, stride 16);
    # stage7 (320 channels) pools at stride 32
    last_stage: str = ""
    # shorter image side per pyramid level, px: the paper's three smaller scales, about a third
    # of the five's conv time (the paper's five are in the voc07_* configs)
    scales: tuple[int, ...] = DEFAULT_SCALES
    max_long_side: int = 0  # cap on the resized longer side, px; 0 = no cap
    flip: bool = False  # also cache horizontally flipped maps of training splits
    cache: str = "disk"  # disk: float16 conv5 .npz per image | none: compute maps on the fly
    precision: str = "fp32"  # conv trunk: fp32 | bf16 | fp16 autocast (runtime/device.py)
    # images of the same size run through the trunk together, up to this many a pass (for GPUs;
    # 1: one image a pass, as before)
    batch_images: int = 1


@dataclass(frozen=True)
class SppConfig:
    """docs/method.md#scale-selection, #projection, #spatial-pyramid-pooling."""

    levels: tuple[int, ...] = (6, 3, 2, 1)  # pyramid bins per side, in output order (paper)
    target_size: float = 224.0  # window side aimed at by scale selection, px (paper; code: 208)
    offset: float = 6.5  # box shrink before projection, px (released code, spp_config.m)


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning the fc head: docs/method.md#fine-tuning-and-sampling."""

    fc_dim: int = 1024  # width of fc6 and fc7 (paper: 4,096; a quarter of the time on a CPU)
    dropout: float = 0.5  # dropout after fc6 and fc7 (paper)
    batch_size: int = 128  # windows per minibatch (released code)
    fg_fraction: float = 0.25  # foreground share of a minibatch: 32 of 128 (paper)
    fg_thresh: float = 0.5  # IoU >= this is foreground (paper)
    bg_thresh_lo: float = 0.1  # background IoU lower bound, inclusive (paper)
    bg_thresh_hi: float = 0.5  # background IoU upper bound, exclusive (paper)
    # SGD iterations, the last one kept (no test-set selection); -1 (SIZED): sized to the training
    # split; 0: none, fc6/fc7 as initialised (the paper's "no fine-tuning" rows)
    # (sized_finetune; the paper's 90,000 are in the voc07_* configs)
    iterations: int = SIZED
    lr: float = 1e-3  # base learning rate (released code; paper: 1e-4)
    # lr x0.1 at these iterations (released code: 30,000 and 60,000); with SIZED: at 2/3
    lr_steps: tuple[int, ...] = ()
    momentum: float = 0.9  # SGD momentum (released code)
    weight_decay: float = 5e-4  # L2 weight decay (released code)
    seed: int = 6  # RNG seed (released code: Caffe seed 6)
    checkpoint_every: int = 2000  # iterations between resumable checkpoints
    log_every: int = 100  # iterations between history entries
    val_split: str = ""  # held-out split for window accuracy in history; "" = none
    # first trainable conv layer for end-to-end fine-tuning from images, e.g. conv3 (zf5 and
    # alexnet: conv1…conv5; vgg16: conv1_1…conv5_3); "" keeps the conv layers frozen (paper)
    conv_from: str = ""
    images_per_batch: int = 2  # with conv_from: images per minibatch (Fast R-CNN: 2 × 64)
    conv_lr_mult: float = 1.0  # with conv_from: conv layers' rate / lr (Fast R-CNN: 1)
    # > 0: a box branch on the head trains with this weight on its smooth L1 loss (Fast R-CNN: 1);
    # used at test time with test.regressor=head. 0: no box branch (paper)
    bbox_loss_weight: float = 0.0


@dataclass(frozen=True)
class SvmConfig:
    """Per-class SVMs on fc7: docs/method.md#svm-training (all defaults: released code)."""

    C: float = 1e-3  # liblinear -c
    pos_weight: float = 2.0  # liblinear -w1: positive-class cost multiplier
    intercept_scaling: float = 10.0  # liblinear -B
    tol: float = 0.1  # liblinear eps for -s 3
    neg_iou: float = 0.3  # negatives have IoU < this with every gt of the class (paper: <=)
    hard_thresh: float = -1.0001  # mine negatives scoring above this
    evict_thresh: float = -1.2  # evict cached negatives scoring below this
    retrain_limit: int = 2000  # retrain after this many new negatives
    # GiB for all classes' negative caches together, i.e. ⌊cache_gib·2³⁰/(K·F·4)⌋ rows per class
    # (ours: the original has no cap; .inf = none)
    cache_gib: float = 3.0
    target_norm: float = 20.0  # fc7 scaled to this mean L2 norm
    norm_images: int = 200  # images sampled to estimate the mean norm
    norm_windows: int = 200  # windows per image for the mean norm
    seed: int = 3  # RNG seed for the norm estimate (rng seed 3)


@dataclass(frozen=True)
class BboxRegConfig:
    """Box regression on pool5: docs/method.md#bounding-box-regression (released code)."""

    ridge_lambda: float = 4000.0  # ridge penalty, bias included (released code; R-CNN used 1000)
    min_iou: float = 0.5  # train on windows whose best gt IoU is > this (R-CNN: 0.6)
    target_norm: float = 20.0  # pool5 features scaled to this mean L2 norm
    whiten_eps: float = 1e-3  # added to target covariance eigenvalues
    norm_images: int = 200  # images sampled to estimate the pool5 mean norm (as svm)
    norm_windows: int = 200  # windows per image for the mean norm (as svm)
    seed: int = 3  # RNG seed for the norm estimate (as svm: rng seed 3)


@dataclass(frozen=True)
class TestConfig:
    """Scoring, NMS and regression at test time: docs/method.md#test-time-detection."""

    score_thresh: float = -1.5  # keep windows scoring above this (released code)
    nms_thresh: float = 0.3  # per-class NMS IoU, before and after regression (released code)
    max_per_class: int = 100  # detections kept per class and image (released code)
    bbox_reg: bool = True  # apply the box regressors when trained (paper)
    batch_windows: int = 4096  # windows per fc6/fc7 batch
    precision: str = "fp32"  # fc6/fc7: fp32 | bf16 | fp16 autocast (runtime/device.py)
    # svm: per-class SVMs on fc7 (paper) | softmax: the fine-tuned head's classifier (Fast R-CNN)
    scorer: str = "svm"
    softmax_thresh: float = 0.05  # softmax scorer: keep windows above this (Fast R-CNN test_net)
    # with bbox_reg: ridge (train-bbox's regressors on pool5, paper) | head (the fine-tuned
    # head's box branch, finetune.bbox_loss_weight > 0, Fast R-CNN)
    regressor: str = "ridge"
    # fc6/fc7 at test time: none (paper) | svd: truncated to the ranks below (Fast R-CNN §3.1,
    # 1024 and 256) | int8: dynamic quantisation, CPU only (torch.ao.quantization)
    fc_compression: str = "none"
    svd_rank_fc6: int = 1024
    svd_rank_fc7: int = 256


@dataclass(frozen=True)
class EvalConfig:
    """VOC devkit rules: docs/method.md#evaluation-rules."""

    iou_thresh: float = 0.5  # a detection matches a gt at IoU >= this (VOC devkit)
    use_07_metric: bool = True  # headline AP: VOC07 11-point (True) or area under PR (False)
    # voc: VOC APs | coco: also AP@[.5:.95], AP50, AP75, small/medium/large (pycocotools)
    metric: str = "voc"


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    propose: ProposeConfig = field(default_factory=ProposeConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    spp: SppConfig = field(default_factory=SppConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    svm: SvmConfig = field(default_factory=SvmConfig)
    bbox_reg: BboxRegConfig = field(default_factory=BboxRegConfig)
    test: TestConfig = field(default_factory=TestConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    name: str = "default"  # used for the default run directory runs/<name>

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def dump(self, path: str | Path) -> None:
        from spp_detect.runtime.artifacts import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


SECTIONS = tuple(f.name for f in dataclasses.fields(Config) if f.name != "name")


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def sized_finetune(settings: FinetuneConfig, num_images: int) -> FinetuneConfig:
    """``settings`` with ``iterations`` and ``lr_steps`` sized to ``num_images`` training
    images when ``iterations`` is ``SIZED``; unchanged otherwise."""
    if settings.iterations != SIZED:
        return settings
    iterations = ITERATIONS_PER_IMAGE * num_images
    iterations = min(max(iterations, MIN_SIZED_ITERATIONS), MAX_SIZED_ITERATIONS)
    return dataclasses.replace(
        settings, iterations=iterations, lr_steps=(round(LR_STEP_AT * iterations),)
    )


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults, then the YAML diff at ``path``, then each ``section.key=value`` override."""
    tree: dict[str, Any] = {}
    name = "default"
    if path is not None:
        path = resolve_config_path(path)
        tree = _read_yaml(path)
        name = tree.pop("name", path.stem)
    for item in overrides:
        section, key, value = _parse_override(item)
        _build({section: {key: value}}, name="", origin=f"--set {item}")  # a typo names the --set
        if tree.get(section) is None:  # absent, or an empty "section:" line in the YAML
            tree[section] = {}
        tree[section][key] = value
    config = _build(tree, name=str(name), origin=str(path) if path else "--set")
    validate(config)
    return _classes_from_annotations(config, given="classes" in (tree.get("data") or {}))


def _classes_from_annotations(config: Config, given: bool) -> Config:
    """With data.format coco and no data.classes in the YAML or --set, the classes are the
    categories of the training split's file (docs/coco.md#classes)."""
    if config.data.format != "coco" or given:
        return config
    from spp_detect.data.coco import annotation_path, category_names

    data = config.data
    path = annotation_path(data.root, data.annotations, data.train_split)
    return dataclasses.replace(config, data=dataclasses.replace(data, classes=category_names(path)))


def bundled_configs() -> dict[str, Path]:
    """The configs shipped with the package (the repo's configs/), by name. Run from the source
    tree without installing (``PYTHONPATH=.``, as scripts/gpu_check.sh does), they are read from
    the repo's configs/ itself, which only an install maps to ``spp_detect.configs``."""
    from importlib.resources import files

    try:
        folder = files("spp_detect.configs")
    except ModuleNotFoundError:
        folder = Path(__file__).resolve().parents[1] / "configs"
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".yaml")}


def resolve_config_path(path: str | Path) -> Path:
    """A YAML file path, or the name of a bundled config such as ``toy`` or ``raccoon``."""
    path = Path(path)
    if path.is_file() or path.suffix:
        return path
    bundled = bundled_configs()
    if str(path) in bundled:
        return bundled[str(path)]
    raise UserError(
        f"{path}: no such config file or bundled config; bundled: {', '.join(sorted(bundled))}"
    )


class _DuplicateKey(yaml.YAMLError):
    """A key given twice in one YAML mapping (PyYAML would keep the last one silently)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in first_line:
                raise _DuplicateKey(
                    f"line {line}: key {key!r} is given twice (also on line {first_line[key]}), "
                    "and only the last would count; keep one"
                )
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path}: config file not found; pass an existing YAML file to -c")
    try:
        tree = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}  # a SafeLoader
    except _DuplicateKey as exc:
        raise UserError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise UserError(f"{path}: not valid YAML{where}; fix the syntax") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file; fix or replace it") from None
    if not isinstance(tree, dict):
        raise UserError(f"{path}: expected a mapping of sections ({', '.join(SECTIONS)})")
    return tree


def _parse_override(item: str) -> tuple[str, str, Any]:
    target, sep, raw = item.partition("=")
    section, dot, key = target.strip().partition(".")
    if not sep or not dot:
        raise UserError(
            f"--set {item!r}: expected section.key=value, e.g. --set test.nms_thresh=0.4"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return section, key, value


def _did_you_mean(name: str, valid: typing.Iterable[str], prefix: str = "") -> str:
    """ ", did you mean X?" for the closest valid name (any case), else ""."""
    by_lower = {option.lower(): option for option in valid}
    close = difflib.get_close_matches(str(name).lower(), list(by_lower), n=1, cutoff=0.6)
    return f" (did you mean {prefix}{by_lower[close[0]]}?)" if close else ""


def _build(tree: dict[str, Any], name: str, origin: str) -> Config:
    sections = {}
    for section, values in tree.items():
        if section not in SECTIONS:
            raise UserError(
                f"{origin}: unknown config section {section!r}{_did_you_mean(section, SECTIONS)}; "
                f"valid: {', '.join(SECTIONS)}"
            )
        if not isinstance(values, dict):
            raise UserError(f"{origin}: section {section!r} must be a mapping of keys")
        sections[section] = _build_section(section, values, origin)
    return Config(name=name, **sections)


def _build_section(section: str, values: dict[str, Any], origin: str) -> Any:
    cls = {f.name: f.type for f in dataclasses.fields(Config)}[section]
    cls = globals()[cls] if isinstance(cls, str) else cls
    hints = typing.get_type_hints(cls)
    valid = ", ".join(hints)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            guess = _did_you_mean(key, hints, f"{section}.")
            raise UserError(f"{origin}: unknown key {section}.{key}{guess}; valid keys: {valid}")
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}", origin)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str, origin: str) -> Any:
    """Check ``value`` against a field type; ints are accepted as floats, lists as tuples."""
    origin_type = typing.get_origin(hint)
    if origin_type is tuple:
        (item_type, _) = typing.get_args(hint)
        if isinstance(value, str) and value:
            # "classes: circle, square" is one string in YAML, not two classes
            as_list = "[" + ", ".join(part for part in re.split(r"[,\s]+", value) if part) + "]"
            raise UserError(
                f"{origin}: {key} must be a YAML list, got the string {value!r}; write "
                f"{key.split('.')[-1]}: {as_list}"
            )
        items = value if isinstance(value, list | tuple) else [value]
        return tuple(_coerce(v, item_type, key, origin) for v in items)
    if origin_type in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported config type {hint}")
    ok = isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # YAML reads split names such as 2007 as numbers
    if hint is float and isinstance(value, str):
        try:  # PyYAML (YAML 1.1) reads exponents without a dot, e.g. 1e-3, as strings
            return float(value)
        except ValueError:
            pass
    if not ok:
        raise UserError(
            f"{origin}: {key} must be {hint.__name__}, got {value!r} ({type(value).__name__})"
        )
    return value


# ------------------------------------------------------------------------------- value checks

# Seeds go to numpy and torch generators; this is the range every one of them accepts (numpy's
# legacy RandomState: 0 to 2**32 - 1).
MAX_SEED = 2**32 - 1
# Upper bounds of sizes: far beyond any real setting, low enough that a typo (an extra zero) is
# named at once instead of ending in an out-of-memory or disk-space error hours later.
MAX_IMAGE_SIDE = 10_000  # px: scales, caps and the window target
MAX_PYRAMID_LEVEL = 32  # bins per side of one pyramid level (the paper's largest: 6; VGG16: 7)
MAX_FC_DIM = 16_384  # fc6/fc7 width (the paper: 4,096)
MAX_BATCH = 65_536  # windows or images per batch
# Float keys for which infinity is a setting ("no cap"), documented with the key; NaN never is.
INFINITY_ALLOWED = ("svm.cache_gib",)

# (key, holds, requirement): every value a stage cannot work with, checked when the config loads
# so that a typo fails before any work, not after the proposals load. Every numeric key is here
# (tests/test_config.py checks it), but extract.scales and spp.levels (features.check_*).
_RANGES: tuple[tuple[str, typing.Callable[[Any], bool], str], ...] = (
    ("propose.base_k", lambda v: v >= 1, "at least 1"),
    ("propose.inc_k", lambda v: v >= 0, "at least 0"),
    ("propose.sigma", lambda v: v >= 0, "at least 0"),
    ("propose.min_size", lambda v: v >= 0, "at least 0"),
    ("propose.max_per_image", lambda v: v >= 0, "at least 0 (0 keeps all)"),
    ("propose.max_side", lambda v: 0 <= v <= MAX_IMAGE_SIDE, f"0 (never) to {MAX_IMAGE_SIDE} px"),
    ("propose.edge_max_boxes", lambda v: v >= 1, "at least 1"),
    (
        "extract.max_long_side",
        lambda v: 0 <= v <= MAX_IMAGE_SIDE,
        f"0 (no cap) to {MAX_IMAGE_SIDE}",
    ),
    ("extract.batch_images", lambda v: 1 <= v <= MAX_BATCH, f"1 to {MAX_BATCH}"),
    (
        "extract.scales",
        lambda v: max(v, default=0) <= MAX_IMAGE_SIDE,
        f"at most {MAX_IMAGE_SIDE} px",
    ),
    (
        "spp.levels",
        lambda v: max(v, default=0) <= MAX_PYRAMID_LEVEL,
        f"at most {MAX_PYRAMID_LEVEL} bins a side",
    ),
    ("spp.target_size", lambda v: 0 < v <= MAX_IMAGE_SIDE, f"positive, at most {MAX_IMAGE_SIDE}"),
    ("spp.offset", lambda v: v >= 0, "at least 0 (px)"),
    ("finetune.fc_dim", lambda v: 1 <= v <= MAX_FC_DIM, f"1 to {MAX_FC_DIM}"),
    ("finetune.batch_size", lambda v: 1 <= v <= MAX_BATCH, f"1 to {MAX_BATCH}"),
    ("finetune.checkpoint_every", lambda v: v >= 1, "at least 1"),
    ("finetune.log_every", lambda v: v >= 1, "at least 1"),
    ("finetune.iterations", lambda v: v >= SIZED, "-1 (sized to the split) or at least 0"),
    ("finetune.fg_fraction", lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    ("finetune.fg_thresh", lambda v: 0.0 <= v <= 1.0, "an IoU in [0, 1]"),
    ("finetune.bg_thresh_lo", lambda v: 0.0 <= v <= 1.0, "an IoU in [0, 1]"),
    ("finetune.bg_thresh_hi", lambda v: 0.0 <= v <= 1.0, "an IoU in [0, 1]"),
    ("finetune.dropout", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    ("finetune.lr", lambda v: v > 0, "positive"),
    ("finetune.momentum", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    ("finetune.weight_decay", lambda v: v >= 0, "at least 0"),
    ("finetune.lr_steps", lambda v: all(step >= 1 for step in v), "iterations of at least 1"),
    ("finetune.seed", lambda v: 0 <= v <= MAX_SEED, f"in [0, {MAX_SEED}]"),
    ("svm.C", lambda v: v > 0, "positive"),
    ("svm.pos_weight", lambda v: v > 0, "positive"),
    ("svm.intercept_scaling", lambda v: v > 0, "positive"),
    ("svm.tol", lambda v: v > 0, "positive"),
    ("svm.neg_iou", lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    ("svm.retrain_limit", lambda v: v >= 1, "at least 1"),
    ("svm.cache_gib", lambda v: v > 0, "positive"),
    ("svm.target_norm", lambda v: v > 0, "positive"),
    ("svm.norm_images", lambda v: v >= 1, "at least 1"),
    ("svm.norm_windows", lambda v: v >= 1, "at least 1"),
    ("svm.seed", lambda v: 0 <= v <= MAX_SEED, f"in [0, {MAX_SEED}]"),
    ("svm.hard_thresh", math.isfinite, "a finite score"),
    ("svm.evict_thresh", math.isfinite, "a finite score"),
    # positive: a zero penalty leaves the ridge system singular (Cholesky fails)
    ("bbox_reg.ridge_lambda", lambda v: v > 0, "positive"),
    ("bbox_reg.min_iou", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    ("bbox_reg.target_norm", lambda v: v > 0, "positive"),
    # positive: a target direction without variance would be whitened by 1/0
    ("bbox_reg.whiten_eps", lambda v: v > 0, "positive"),
    ("bbox_reg.norm_images", lambda v: v >= 1, "at least 1"),
    ("bbox_reg.norm_windows", lambda v: v >= 1, "at least 1"),
    ("bbox_reg.seed", lambda v: 0 <= v <= MAX_SEED, f"in [0, {MAX_SEED}]"),
    ("test.score_thresh", math.isfinite, "a finite score"),
    ("test.nms_thresh", lambda v: 0.0 <= v <= 1.0, "an IoU in [0, 1]"),
    ("test.max_per_class", lambda v: v >= 1, "at least 1"),
    ("test.batch_windows", lambda v: v >= 1, "at least 1"),
    ("test.softmax_thresh", lambda v: 0.0 <= v < 1.0, "a probability in [0, 1)"),
    ("test.svd_rank_fc6", lambda v: v >= 1, "at least 1"),
    ("test.svd_rank_fc7", lambda v: v >= 1, "at least 1"),
    ("finetune.images_per_batch", lambda v: 1 <= v <= MAX_BATCH, f"1 to {MAX_BATCH}"),
    ("finetune.conv_lr_mult", lambda v: v >= 0, "at least 0"),
    ("finetune.bbox_loss_weight", lambda v: v >= 0, "at least 0"),
    ("eval.iou_thresh", lambda v: 0.0 < v <= 1.0, "an IoU in (0, 1]"),
)


def validate(config: Config) -> None:
    """A :class:`UserError` naming every value of ``config`` that no stage can work with."""
    non_finite = _non_finite_keys(config)
    problems = [f"{key} must be a finite number, got {value}" for key, value in non_finite.items()]
    for key, holds, requirement in _RANGES:
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if key not in non_finite and not holds(value):
            problems.append(f"{key} must be {requirement}, got {value}")
    problems += _relation_problems(config)
    if problems:
        raise UserError("; ".join(problems))
    _check_choices(config)


def _non_finite_keys(config: Config) -> dict[str, float]:
    """The float keys (or list items) holding NaN or infinity, with that value: they pass no
    comparison, so a NaN threshold would silently keep nothing. The INFINITY_ALLOWED keys are
    left to their range check, which refuses NaN and allows infinity ("no cap")."""
    found = {}
    for section in SECTIONS:
        values = getattr(config, section)
        for item in dataclasses.fields(values):
            key = f"{section}.{item.name}"
            if key in INFINITY_ALLOWED:
                continue
            value = getattr(values, item.name)
            for number in value if isinstance(value, tuple) else (value,):
                if isinstance(number, float) and not math.isfinite(number):
                    found[key] = number
    return found


def _relation_problems(config: Config) -> list[str]:
    finetune, svm = config.finetune, config.svm
    problems = []
    classes = [name.strip() for name in config.data.classes]
    repeated = sorted({name for name in classes if classes.count(name) > 1})
    if repeated:
        problems.append(
            f"data.classes lists {', '.join(map(repr, repeated))} more than once; list each "
            "class once (labels and AP rows are one per name)"
        )
    if not finetune.bg_thresh_lo <= finetune.bg_thresh_hi <= finetune.fg_thresh:
        problems.append("finetune thresholds need bg_thresh_lo <= bg_thresh_hi <= fg_thresh")
    if svm.evict_thresh > svm.hard_thresh:
        problems.append("svm.evict_thresh must not exceed svm.hard_thresh")
    if finetune.lr_steps and finetune.iterations == SIZED:
        problems.append(
            "finetune.lr_steps needs finetune.iterations set (-1 sizes both to the "
            "split); set both or neither"
        )
    if finetune.conv_from and finetune.val_split:
        problems.append(
            "finetune.val_split is measured on cached features, so it works with frozen conv "
            "layers only; unset finetune.val_split or finetune.conv_from"
        )
    if config.test.scorer not in SCORERS:
        problems.append(
            f"test.scorer must be one of {', '.join(SCORERS)}, got {config.test.scorer!r}"
        )
    if config.data.format not in DATA_FORMATS:
        problems.append(
            f"data.format must be one of {', '.join(DATA_FORMATS)}, got {config.data.format!r}"
        )
    if config.data.format == "coco" and "{split}" not in config.data.annotations:
        problems.append("data.annotations must contain {split}, e.g. annotations/{split}.json")
    if config.eval.metric not in EVAL_METRICS:
        problems.append(
            f"eval.metric must be one of {', '.join(EVAL_METRICS)}, got {config.eval.metric!r}"
        )
    if config.test.regressor not in REGRESSORS:
        problems.append(
            f"test.regressor must be one of {', '.join(REGRESSORS)}, got {config.test.regressor!r}"
        )
    if config.test.fc_compression not in FC_COMPRESSIONS:
        problems.append(
            f"test.fc_compression must be one of {', '.join(FC_COMPRESSIONS)}, "
            f"got {config.test.fc_compression!r}"
        )
    if config.test.fc_compression == "int8" and config.test.precision != "fp32":
        problems.append("test.fc_compression=int8 needs test.precision=fp32")
    if finetune.images_per_batch >= 1 and finetune.batch_size % finetune.images_per_batch:
        problems.append("finetune.batch_size must be a multiple of finetune.images_per_batch")
    if config.test.bbox_reg and config.test.regressor == "head" and not finetune.bbox_loss_weight:
        problems.append("test.regressor=head needs a box branch: set finetune.bbox_loss_weight > 0")
    if config.propose.method == "mat" and not config.propose.mat_file:
        problems.append("propose.mat_file: empty; set it to the R-CNN/SPP-net proposal .mat file")
    return problems


def _check_choices(config: Config) -> None:
    """Names checked by the library modules that own them (each raises one UserError)."""
    from spp_detect.data.proposals import check_method
    from spp_detect.models.backbones import check_backbone_name, check_conv_layer, check_last_stage
    from spp_detect.models.features import check_extract_settings, check_levels
    from spp_detect.runtime.device import check_precision

    check_method(config.propose.method, config.propose.mode)
    extract = config.extract
    check_backbone_name(extract.backbone)
    check_last_stage(extract.backbone, extract.last_stage)
    if config.finetune.conv_from:
        check_conv_layer(extract.backbone, config.finetune.conv_from, extract.last_stage)
    check_extract_settings(extract.scales, extract.max_long_side, extract.cache, extract.precision)
    check_levels(config.spp.levels)
    check_precision(config.test.precision, "test.precision")
