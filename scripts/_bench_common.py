"""Shared helpers of the test-time benchmarks (bench_test_time, bench_vs_rcnn, bench_scaling).

Shapes: R windows (proposals) of an image, U distinct windows (same conv5 cells at the same
scale), D pooled dim, F fc width, K classes, S scales.

What lives here: the common command-line options; raccoon loading; proposals of exactly R windows
per image; the package's ``TrainedDetector`` with random weights of the paper's sizes (fc6/fc7 of
width 4,096, K = 20 SVMs and box regressors) and live ``FeatureSource``s on a random trunk; the test
path of ``stages/test.py`` (``TrainedDetector.detect``) timed in parts by timing the package's own
calls; a stopwatch (device-synchronised), warm-up and medians; conv FLOP counts; markdown tables and
the machine header.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from spp_detect.config import PAPER_SCALES, ProposeConfig, SppConfig, TestConfig
from spp_detect.data.proposals import propose_image
from spp_detect.data.voc import read_split
from spp_detect.models.backbones import BACKBONES, Backbone, output_hw
from spp_detect.models.detector import DetectionSettings, TrainedDetector
from spp_detect.models.features import FeatureSource
from spp_detect.models.head import Head, init_random
from spp_detect.models.inference import detect_image
from spp_detect.models.linear import BoxRegressors, SvmModel
from spp_detect.models.weights import build_backbone
from spp_detect.ops.spp import PoolGeometry
from spp_detect.runtime.device import resolve_device
from spp_detect.structures import ImageRecord
from spp_detect.testing import random_boxes

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = REPO.parent / "shared/datasets/raccoon"
ONE_SCALE = (688,)  # the paper's 1-scale setting (docs/method.md#image-scales)
NUM_CLASSES = 20  # VOC: the SVM and regressor count of the paper's Tables 9-10
FC_DIM = 4096  # fc6/fc7 width (docs/method.md#fine-tuning-and-sampling)
MIN_BOX_SIDE = 20  # px, propose.min_size (docs/method.md#proposals)
PASS_FRACTION = 0.1  # share of windows per class that random SVMs score above the threshold
DELTA_STD = 0.1  # std of the random regressors' deltas (typical trained dx, dy, dw, dh scale)
MODEL_SEED = 0
TEST = TestConfig()  # docs/method.md#test-time-detection
SPP = SppConfig()  # levels, target size, box shrink (docs/method.md#projection)
PROPOSE = ProposeConfig()  # what `spp-detect propose` does by default (docs/method.md#proposals)


# ---------------------------------------------------------------- options, machine, tables


def base_parser(doc: str, images: int, warmup: int = 1) -> argparse.ArgumentParser:
    """Options every script takes; ``images`` timed images after ``warmup`` untimed ones."""
    parser = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="VOC-layout dataset")
    parser.add_argument("--split", default="test")
    parser.add_argument("--classes", default="raccoon", help="comma-separated, to read the split")
    parser.add_argument("--backbone", default="zf5", choices=BACKBONES)
    parser.add_argument("--weights", default="none", help="trunk weights (none = random)")
    parser.add_argument("--images", type=int, default=images, help="timed images (median)")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed images first")
    parser.add_argument("--proposals", type=int, default=2000, help="windows per image (R)")
    parser.add_argument(
        "--proposal-source", choices=("random", "ss"), default="random",
        help="random: proposal-like random boxes; ss: selective search fast, truncated to R "
        "or topped up with random boxes",
    )  # fmt: skip
    parser.add_argument("--num-classes", type=int, default=NUM_CLASSES)
    parser.add_argument("--fc-dim", type=int, default=FC_DIM)
    parser.add_argument("--pass-fraction", type=float, default=PASS_FRACTION)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = default")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0, help="random proposals")
    return parser


def scale_list(text: str) -> tuple[int, ...]:
    """Shorter sides (px) from the command line: "480,576,688" → (480, 576, 688)."""
    return tuple(int(value) for value in text.split(","))


def add_scale_options(parser: argparse.ArgumentParser) -> None:
    """The two pyramid settings timed (default: the paper's 1 scale and 5 scales; smaller ones
    for a quick dry run), and a JSON file for the key figures (scripts/gpu_check.py reads it)."""
    parser.add_argument(
        "--one-scale", type=scale_list, default=ONE_SCALE, help="the 1-scale setting (px)"
    )
    parser.add_argument(
        "--multi-scales", type=scale_list, default=PAPER_SCALES,
        help="the multi-scale setting, comma-separated (px)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="also write key figures here")


def write_json(path: Path | None, payload: dict) -> None:
    """``payload`` as JSON at ``path`` (nothing when None)."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=1) + "\n")


def setup(args: argparse.Namespace) -> torch.device:
    if args.threads:
        torch.set_num_threads(args.threads)
    return resolve_device(args.device)


def _cpu_model() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    for line in lines.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def machine_header(device: torch.device) -> str:
    """Markdown lines: command, date, machine, load, torch threads, device."""
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return "\n".join([
        f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, host {platform.node()}",
        f"- CPU: {_cpu_model()}, {os.cpu_count()} logical CPUs; load average {load} (at start)",
        f"- torch {torch.__version__}, {torch.get_num_threads()} intra-op threads; "
        f"device {device}{gpu}",
    ])  # fmt: skip


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table; the first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(headers) + " |", "| --- |" + " --: |" * (len(headers) - 1)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def percent(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole > 0 else "-"


# ---------------------------------------------------------------- timing


@dataclass
class Stopwatch:
    """Seconds per named part, accumulated; the device is synchronised around every part.

    Parts may nest: a part's seconds exclude those of the parts opened inside it, so the sum of
    all parts is the wall time of the outermost ones.
    """

    device: torch.device
    seconds: dict[str, float] = field(default_factory=dict)
    _open: list[list] = field(default_factory=list)  # [name, started, seconds of inner parts]

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def start(self, name: str) -> None:
        self.seconds.setdefault(name, 0.0)  # parts listed in the order they start
        self._open.append([name, self.now(), 0.0])

    def stop(self) -> None:
        name, started, inner = self._open.pop()
        elapsed = self.now() - started
        self.seconds[name] += elapsed - inner
        if self._open:
            self._open[-1][2] += elapsed

    @contextmanager
    def part(self, name: str):
        self.start(name)
        try:
            yield
        finally:
            self.stop()


@contextmanager
def timed_calls(watch: Stopwatch, *targets: tuple[Any, str, str]):
    """While inside, every call of ``obj.method`` is timed as part ``name``, for each
    (obj, method, name) of ``targets`` (an instance attribute shadows the method; removed on
    exit). Times the package's own code without copying it."""
    for obj, method, name in targets:
        bound = getattr(obj, method)

        def timed(*args, _bound=bound, _name=name, **kwargs):
            with watch.part(_name):
                return _bound(*args, **kwargs)

        setattr(obj, method, timed)
    try:
        yield
    finally:
        for obj, method, _ in targets:
            delattr(obj, method)


@contextmanager
def timed_trunk(backbone: nn.Module, watch: Stopwatch):
    """While inside, each forward pass of ``backbone`` is timed as part "conv <s>", s the
    shorter side of its input (forward hooks)."""

    def before(module, inputs):
        watch.start(f"conv {min(inputs[0].shape[-2:])}")

    def after(module, inputs, output):
        watch.stop()

    handles = [backbone.register_forward_pre_hook(before), backbone.register_forward_hook(after)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def medians(samples: Sequence[dict[str, float]]) -> dict[str, float]:
    """Per-key median over samples (keys in first-seen order; a missing key counts as 0)."""
    keys = list(dict.fromkeys(key for sample in samples for key in sample))
    return {key: float(np.median([s.get(key, 0.0) for s in samples])) for key in keys}


def timed_runs(items: Sequence[Any], warmup: int, run: Callable[[Any], dict[str, float]]):
    """``run(item)`` on every item; the dicts of the items after the first ``warmup``."""
    results = []
    for position, item in enumerate(items):
        result = run(item)
        if position >= warmup:
            results.append(result)
    return results


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class BenchImage:
    record: ImageRecord
    image: np.ndarray  # uint8 (H, W, 3) RGB
    boxes: np.ndarray  # float32 (R, 4) proposals
    ss_boxes: int  # how many of them came from selective search
    proposal_s: float | None = None  # selective search's seconds on it (None: random boxes)


def make_proposals(
    image: np.ndarray, count: int, source: str, seed: int
) -> tuple[np.ndarray, int, float | None]:
    """Exactly ``count`` boxes (R, 4), how many are selective-search boxes, and the seconds
    selective search took (None for random boxes). Selective search runs as ``spp-detect
    propose`` does by default (fast mode, images shrunk to ``propose.max_side``)."""
    rng = np.random.default_rng(seed)
    boxes, seconds = np.zeros((0, 4), np.float32), None
    if source == "ss":
        started = time.perf_counter()
        boxes = propose_image(
            image, "selective_search", mode=PROPOSE.mode, min_size=MIN_BOX_SIDE,
            max_side=PROPOSE.max_side,
        )[:count]  # fmt: skip
        seconds = time.perf_counter() - started
    extra = random_boxes(rng, count - len(boxes), image.shape[:2], min_side=MIN_BOX_SIDE)
    return np.concatenate([boxes, extra]).astype(np.float32), len(boxes), seconds


def load_images(args: argparse.Namespace, count: int | None = None) -> list[BenchImage]:
    """The first ``count`` (default warm-up + timed) images of the split, with proposals."""
    from spp_detect.models.features import read_record_image

    count = args.warmup + args.images if count is None else count
    records = read_split(args.root, args.split, tuple(args.classes.split(",")))
    if len(records) < count:
        raise SystemExit(f"{args.root} {args.split}: {len(records)} images, {count} needed")
    images = []
    for index, record in enumerate(records[:count]):
        image = read_record_image(record)
        proposals = make_proposals(image, args.proposals, args.proposal_source, args.seed + index)
        images.append(BenchImage(record, image, *proposals))
    return images


def describe_images(images: Sequence[BenchImage], warmup: int) -> str:
    hws = np.array([b.record.image_hw for b in images])
    ss = sum(b.ss_boxes for b in images)
    total = sum(len(b.boxes) for b in images)
    return (
        f"- images: {len(images) - warmup} timed after {warmup} warm-up, sizes "
        f"{hws.min(axis=0).tolist()}-{hws.max(axis=0).tolist()} (H, W); {total // len(images)} "
        f"proposals each, {100 * ss / max(total, 1):.0f}% from selective search fast, the rest "
        "random (sides log-uniform from 20 px to the image side)"
    )


# ---------------------------------------------------------------- models


@dataclass
class Bench:
    """The package's TrainedDetector (random head, SVMs and regressors of the paper's sizes) and the
    random conv trunk of its live FeatureSources (trunk and fc6/fc7 in ``precision``)."""

    backbone: Backbone
    geometry: PoolGeometry
    detector: TrainedDetector
    device: torch.device
    precision: str = "fp32"

    @property
    def feature_dim(self) -> int:
        return self.detector.head.in_dim

    def source(self, scales: Sequence[int]) -> FeatureSource:
        """A FeatureSource computing the maps at ``scales`` on the fly (as ``spp-detect test``
        with ``extract.cache: none``)."""
        return FeatureSource(
            scales, self.geometry, self.backbone.channels, self.device,
            backbone=self.backbone, precision=self.precision,
        )  # fmt: skip


def random_head(in_dim: int, fc_dim: int, num_classes: int, device: torch.device) -> Head:
    head = Head(in_dim, fc_dim, num_classes)
    init_random(head, torch.Generator().manual_seed(MODEL_SEED))
    return head.requires_grad_(False).to(device).eval()


def detection_settings(precision: str) -> DetectionSettings:
    return DetectionSettings(
        TEST.score_thresh, TEST.nms_thresh, TEST.max_per_class, TEST.batch_windows, precision
    )


def build_bench(args: argparse.Namespace, device: torch.device, precision: str = "fp32") -> Bench:
    """Untrained: zero SVMs and identity regressors until :func:`calibrate`."""
    backbone = build_backbone(args.backbone, args.weights).to(device)
    geometry = PoolGeometry(
        backbone.stride, backbone.offset0, SPP.offset, tuple(SPP.levels), SPP.target_size
    )
    in_dim, k = geometry.feature_dim(backbone.channels), args.num_classes
    svms = SvmModel(np.zeros((k, args.fc_dim), np.float32), np.zeros(k, np.float32))
    head = random_head(in_dim, args.fc_dim, k, device)
    settings = detection_settings(precision)
    detector = TrainedDetector(head, svms, BoxRegressors.identity(k, in_dim), settings, device)
    return Bench(backbone, geometry, detector, device, precision)


def calibrated_svms(fc7: Tensor, num_classes: int, pass_fraction: float) -> SvmModel:
    """Random SVMs (weight (K, F), bias (K,)) whose scores on ``fc7`` (U, F) exceed the test
    threshold for ``pass_fraction`` of the windows per class (so NMS sees a realistic number of
    boxes)."""
    generator = torch.Generator().manual_seed(MODEL_SEED + 1)
    weight = torch.randn((fc7.shape[1], num_classes), generator=generator).to(fc7.device)
    raw = fc7.float() @ weight
    weight /= raw.std(dim=0).clamp(min=1e-12)
    raw = fc7.float() @ weight
    bias = TEST.score_thresh - torch.quantile(raw, 1.0 - pass_fraction, dim=0)
    return SvmModel(weight.T.cpu().numpy().copy(), bias.cpu().numpy())


def calibrated_regressors(pooled: Tensor, num_classes: int) -> BoxRegressors:
    """Random regressors (K, D, 4) whose deltas on ``pooled`` (U, D) have std ~ DELTA_STD."""
    generator = torch.Generator().manual_seed(MODEL_SEED + 2)
    dim = pooled.shape[1]
    weight = torch.randn((num_classes, dim, 4), generator=generator).to(pooled.device)
    mean_norm = float(pooled.float().norm(dim=1).mean().cpu())
    weight *= DELTA_STD / max(mean_norm, 1e-12)
    return BoxRegressors(weight.cpu().numpy(), np.zeros((num_classes, 4), np.float32))


def calibrated_detector(
    head: Head, pooled: Tensor, fc7: Tensor, num_classes: int, pass_fraction: float, precision
) -> TrainedDetector:
    """A TrainedDetector of ``head`` with SVMs and regressors calibrated on one image's pool5 (U, D)
    and fc7 (U, F)."""
    svms = calibrated_svms(fc7, num_classes, pass_fraction)
    regressors = calibrated_regressors(pooled, num_classes)
    return TrainedDetector(head, svms, regressors, detection_settings(precision), pooled.device)


def compressed(bench: Bench, compression: str) -> Bench:
    """``bench`` with fc6/fc7 compressed at test time (``test.fc_compression``: svd, int8);
    the same trunk, head, SVMs and regressors."""
    detector = bench.detector
    svms = SvmModel(detector.svm_weight.T.cpu().numpy().copy(), detector.svm_bias.cpu().numpy())
    settings = replace(detector.settings, fc_compression=compression)
    return replace(
        bench,
        detector=TrainedDetector(detector.head, svms, detector.regressors, settings, bench.device),
    )


def calibrate(bench: Bench, item: BenchImage, scales: Sequence[int], pass_fraction: float):
    """Set the random SVMs and regressors from one image's features (untimed)."""
    detector = bench.detector
    with torch.inference_mode():
        pooled, fc7, _ = detector.window_features(bench.source(scales), item.record, item.boxes)
        bench.detector = calibrated_detector(
            detector.head, pooled, fc7, detector.head.num_classes, pass_fraction, bench.precision
        )


# ---------------------------------------------------------------- the test path, timed in parts

PREP = "image read + prep"  # decode, resize, normalise, copy to the device (all scales)


def timed_maps(bench: Bench, source: FeatureSource, record: ImageRecord, watch: Stopwatch):
    """``source.maps(record)`` (kept by the source for the image's later calls), timed: PREP
    and "conv <s>" per scale (the trunk)."""
    with timed_trunk(bench.backbone, watch), watch.part(PREP):
        source.maps(record)


def timed_window_features(
    detector: TrainedDetector,
    source: FeatureSource,
    record: ImageRecord,
    boxes: np.ndarray,
    watch: Stopwatch,
) -> tuple[Tensor, Tensor, Tensor]:
    """``TrainedDetector.window_features``: pool5 (U, D), fc7 (U, F), each window's row (R,).

    Parts: "pooling" (its ``FeatureSource.pool`` call), "fc6/fc7" (its ``fc7_features``
    calls, compressed or not) and the rest, "projection + dedup" (scale choice, conv5 window
    keys, distinct windows).
    """
    targets = ((source, "pool", "pooling"), (detector, "fc7_features", "fc6/fc7"))
    with timed_calls(watch, *targets), watch.part("projection + dedup"):
        return detector.window_features(source, record, boxes)


def timed_detections(
    detector: TrainedDetector,
    pooled: Tensor,
    fc7: Tensor,
    inverse: Tensor,
    boxes: np.ndarray,
    image_hw: tuple[int, int],
    watch: Stopwatch,
) -> dict[str, int]:
    """The rest of ``TrainedDetector.detect``, from pool5 (U, D), fc7 (U, F) and the rows (R,):
    "SVM scores" (``TrainedDetector.class_scores``), then ``inference.detect_image``: "regression"
    (of the kept windows from their pool5, as ``TrainedDetector.detect`` passes it) and the rest,
    "NMS + top-k, clip + NMS". Returns counts: windows passing the threshold, kept, final
    detections."""
    with watch.part("SVM scores"):
        scores = detector.class_scores(fc7)[inverse]
    kept = []

    def regress(window_index: Tensor, labels: Tensor) -> Tensor:
        kept.append(len(window_index))
        with watch.part("regression"):
            features = pooled[inverse[window_index]]
            return detector.regressors.apply(boxes_t[window_index], features, labels, image_hw)

    s, has_regressors = detector.settings, detector.regressors is not None
    with watch.part("NMS + top-k, clip + NMS"):
        boxes_t = torch.as_tensor(boxes, device=scores.device)
        found = detect_image(
            scores, boxes_t, image_hw, s.score_thresh, s.nms_thresh, s.max_per_class,
            regress if has_regressors else None,
        )  # fmt: skip
    passing = int((scores > s.score_thresh).sum())
    return {"passing": passing, "kept": sum(kept), "detections": len(found)}


def spp_test_image(
    bench: Bench, item: BenchImage, scales: Sequence[int]
) -> tuple[dict[str, float], dict[str, int]]:
    """Seconds per part of one image's test path (``TrainedDetector.detect`` on a fresh live source,
    maps included), and counts (windows, distinct, passing, kept, detections)."""
    watch = Stopwatch(bench.device)
    source, detector, record, boxes = bench.source(scales), bench.detector, item.record, item.boxes
    with torch.inference_mode():
        timed_maps(bench, source, record, watch)
        pooled, fc7, inverse = timed_window_features(detector, source, record, boxes, watch)
        counts = timed_detections(detector, pooled, fc7, inverse, boxes, record.image_hw, watch)
    counts.update(windows=len(item.boxes), distinct=len(pooled))
    return watch.seconds, counts


# Parts grouped as the paper's Table 9 columns: conv (image → conv5), fc (conv5 → class scores),
# and the rest (window bookkeeping and post-processing, not in the paper's table).
def group_parts(seconds: dict[str, float]) -> dict[str, float]:
    conv = sum(v for k, v in seconds.items() if k == PREP or k.startswith("conv "))
    fc = sum(seconds.get(k, 0.0) for k in ("pooling", "fc6/fc7", "SVM scores"))
    total = sum(seconds.values())
    return {"conv": conv, "fc": fc, "other": total - conv - fc, "total": total}


# ---------------------------------------------------------------- arithmetic


def conv_gflop(layers: Sequence[nn.Module], input_hw: tuple[int, int]) -> float:
    """GFLOP (2 × multiply-adds) of the conv layers of ``layers`` on one (H, W) input."""
    total = 0.0
    for index, layer in enumerate(layers):
        if isinstance(layer, nn.Conv2d):
            height, width = output_hw(list(layers)[: index + 1], input_hw)
            kernel = math.prod(layer.kernel_size)
            per_output = layer.in_channels // layer.groups * kernel
            total += 2.0 * layer.out_channels * height * width * per_output
    return total / 1e9


def fc_gflop(rows: int, in_dim: int, fc_dim: int) -> float:
    """GFLOP of fc6 + fc7 on ``rows`` windows."""
    return 2.0 * rows * (in_dim * fc_dim + fc_dim * fc_dim) / 1e9


def spp_conv_gflop(backbone: Backbone, image_hw: tuple[int, int], scales: Sequence[int]) -> float:
    from spp_detect.data.image import resized_hw

    return sum(conv_gflop(backbone.features, resized_hw(image_hw, s)) for s in scales)


def scales_label(scales: Sequence[int]) -> str:
    return f"{len(scales)} scale{'s' if len(scales) > 1 else ''} {tuple(scales)}"
