"""Shared helpers of the test-time benchmarks (bench_test_time, bench_vs_rcnn, bench_scaling).

Shapes: R windows (proposals) of an image, U distinct windows (same conv5 cells at the same
scale), D pooled dim, F fc width, K classes, S scales.

What lives here: the common command-line options; raccoon loading; proposals of exactly R
windows per image; random models of the paper's sizes (trunk, fc6/fc7 of width 4,096, K = 20
SVMs and box regressors); the SPP test path of ``stages/test.py`` (``Detector.detect``) split
into timed parts; a stopwatch (device-synchronised), warm-up and medians; conv FLOP counts;
markdown tables and the machine header.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from spp_detect.backbones import Backbone, build_backbone, output_hw
from spp_detect.bbox_reg import BoxRegressors
from spp_detect.config import SppConfig, TestConfig
from spp_detect.features import PoolGeometry, resolve_device
from spp_detect.head import Head, init_random
from spp_detect.image import image_to_tensor, resize_short_side
from spp_detect.inference import finalize_detections, select_detections
from spp_detect.precision import autocast
from spp_detect.proposals import propose_image
from spp_detect.spp import dedup_keys, inverse_permutation, pool_windows, select_scale
from spp_detect.structures import ImageRecord
from spp_detect.voc import read_split
from spp_detect.window_features import distinct_windows

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = REPO.parent / "shared/datasets/raccoon"
ONE_SCALE = (688,)  # the paper's 1-scale setting (ARCHITECTURE §2)
NUM_CLASSES = 20  # VOC: the SVM and regressor count of the paper's Tables 9-10
FC_DIM = 4096  # fc6/fc7 width (SPEC §6)
MIN_BOX_SIDE = 20  # px, smallest proposal side kept (SPEC §11, propose.min_size)
PASS_FRACTION = 0.1  # share of windows per class that random SVMs score above the threshold
DELTA_STD = 0.1  # std of the random regressors' deltas (typical trained dx, dy, dw, dh scale)
MODEL_SEED = 0
TEST = TestConfig()  # score threshold, NMS, top-k and fc batch of the test stage (SPEC §9)
SPP = SppConfig()  # levels, target size and box shrink (SPEC §4-5)


# ---------------------------------------------------------------- options, machine, tables


def base_parser(doc: str, images: int, warmup: int = 1) -> argparse.ArgumentParser:
    """Options every script takes; ``images`` timed images after ``warmup`` untimed ones."""
    parser = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="VOC-layout dataset")
    parser.add_argument("--split", default="test")
    parser.add_argument("--classes", default="raccoon", help="comma-separated, to read the split")
    parser.add_argument("--backbone", default="zf5", choices=("zf5", "alexnet", "vgg16"))
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
    """Seconds per named part, accumulated; the device is synchronised around every part."""

    device: torch.device
    seconds: dict[str, float] = field(default_factory=dict)

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    @contextmanager
    def part(self, name: str):
        started = self.now()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + self.now() - started


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


def random_boxes(rng: np.random.Generator, count: int, image_hw: tuple[int, int]) -> np.ndarray:
    """Proposal-like boxes (count, 4): sides log-uniform from 20 px to the image side, anywhere
    inside (the distribution of scripts/bench_extract.py)."""
    height, width = image_hw
    w = np.exp(rng.uniform(np.log(MIN_BOX_SIDE), np.log(width), count))
    h = np.exp(rng.uniform(np.log(MIN_BOX_SIDE), np.log(height), count))
    x1, y1 = rng.uniform(0, width - w), rng.uniform(0, height - h)
    return np.stack([x1, y1, x1 + w, y1 + h], axis=1).astype(np.float32)


def make_proposals(image: np.ndarray, count: int, source: str, seed: int) -> tuple[np.ndarray, int]:
    """Exactly ``count`` boxes (R, 4) and how many are selective-search boxes."""
    rng = np.random.default_rng(seed)
    boxes = np.zeros((0, 4), np.float32)
    if source == "ss":
        boxes = propose_image(image, "selective_search", mode="fast", min_size=MIN_BOX_SIDE)
        boxes = boxes[:count]
    extra = random_boxes(rng, count - len(boxes), image.shape[:2])
    return np.concatenate([boxes, extra]).astype(np.float32), len(boxes)


def load_images(args: argparse.Namespace, count: int | None = None) -> list[BenchImage]:
    """The first ``count`` (default warm-up + timed) images of the split, with proposals."""
    from spp_detect.features import read_record_image

    count = args.warmup + args.images if count is None else count
    records = read_split(args.root, args.split, tuple(args.classes.split(",")))
    if len(records) < count:
        raise SystemExit(f"{args.root} {args.split}: {len(records)} images, {count} needed")
    images = []
    for index, record in enumerate(records[:count]):
        image = read_record_image(record)
        boxes, ss = make_proposals(image, args.proposals, args.proposal_source, args.seed + index)
        images.append(BenchImage(record, image, boxes, ss))
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
class Models:
    """A trunk and a head, SVMs and regressors of the paper's sizes, random weights."""

    backbone: Backbone
    geometry: PoolGeometry
    head: Head
    svm_weight: Tensor  # (F, K), already transposed as Detector keeps it
    svm_bias: Tensor  # (K,)
    regressors: BoxRegressors
    device: torch.device
    workspace: Tensor = field(default_factory=lambda: torch.empty(0))  # pooled rows, reused
    precision: str = "fp32"  # autocast of the trunk and fc6/fc7 (spp_detect/precision.py)

    @property
    def feature_dim(self) -> int:
        return self.head.in_dim


def random_head(in_dim: int, fc_dim: int, num_classes: int, device: torch.device) -> Head:
    head = Head(in_dim, fc_dim, num_classes)
    init_random(head, torch.Generator().manual_seed(MODEL_SEED))
    return head.requires_grad_(False).to(device).eval()


def build_models(args: argparse.Namespace, device: torch.device, precision: str = "fp32") -> Models:
    backbone = build_backbone(args.backbone, args.weights).to(device)
    geometry = PoolGeometry(
        backbone.stride, backbone.offset0, SPP.offset, tuple(SPP.levels), SPP.target_size
    )
    in_dim = geometry.feature_dim(backbone.channels)
    k = args.num_classes
    return Models(
        backbone=backbone,
        geometry=geometry,
        head=random_head(in_dim, args.fc_dim, k, device),
        svm_weight=torch.zeros((args.fc_dim, k), device=device),
        svm_bias=torch.zeros(k, device=device),
        regressors=BoxRegressors.identity(k, in_dim),
        device=device,
        precision=precision,
    )


def calibrated_svms(fc7: Tensor, num_classes: int, pass_fraction: float) -> tuple[Tensor, Tensor]:
    """Random SVMs (F, K), (K,) whose scores on ``fc7`` (U, F) exceed the test threshold for
    ``pass_fraction`` of the windows per class (so NMS sees a realistic number of boxes)."""
    generator = torch.Generator().manual_seed(MODEL_SEED + 1)
    weight = torch.randn((fc7.shape[1], num_classes), generator=generator).to(fc7.device)
    raw = fc7.float() @ weight
    weight /= raw.std(dim=0).clamp(min=1e-12)
    raw = fc7.float() @ weight
    bias = TEST.score_thresh - torch.quantile(raw, 1.0 - pass_fraction, dim=0)
    return weight, bias


def calibrated_regressors(pooled: Tensor, num_classes: int) -> BoxRegressors:
    """Random regressors (K, D, 4) whose deltas on ``pooled`` (U, D) have std ~ DELTA_STD."""
    generator = torch.Generator().manual_seed(MODEL_SEED + 2)
    dim = pooled.shape[1]
    weight = torch.randn((num_classes, dim, 4), generator=generator).to(pooled.device)
    mean_norm = float(pooled.float().norm(dim=1).mean().cpu())
    weight *= DELTA_STD / max(mean_norm, 1e-12)
    return BoxRegressors(weight.cpu().numpy(), np.zeros((num_classes, 4), np.float32))


def calibrate(models: Models, item: BenchImage, scales: Sequence[int], pass_fraction: float):
    """Set the random SVMs and regressors from one image's features (untimed)."""
    watch = Stopwatch(models.device)
    hw, k = item.record.image_hw, models.svm_bias.shape[0]
    with torch.inference_mode():
        maps = conv_maps(models, item.image, scales, watch)
        pooled, fc7, _ = spp_features(models, maps, hw, scales, item.boxes, watch)
        models.svm_weight, models.svm_bias = calibrated_svms(fc7, k, pass_fraction)
        models.regressors = calibrated_regressors(pooled, k)


# ---------------------------------------------------------------- the SPP test path, in parts


def conv_maps(
    models: Models, image: np.ndarray, scales: Sequence[int], watch: Stopwatch
) -> list[Tensor]:
    """``features.compute_maps`` with its two steps timed per scale: "prep <s>" (resize,
    normalise, copy to the device) and "conv <s>" (the trunk). S maps (C, H_k, W_k)."""
    maps = []
    for scale in scales:
        with watch.part(f"prep {scale}"):
            resized = resize_short_side(image, scale)
            pixels = image_to_tensor(resized, models.backbone.normalization, models.device)
        with watch.part(f"conv {scale}"), autocast(models.device, models.precision):
            maps.append(models.backbone(pixels[None])[0].float())
    return maps


def spp_features(
    models: Models,
    maps: Sequence[Tensor],
    image_hw: tuple[int, int],
    scales: Sequence[int],
    boxes: np.ndarray,
    watch: Stopwatch,
) -> tuple[Tensor, Tensor, Tensor]:
    """``Detector.window_features``: pool5 (U, D), fc7 (U, F), inverse (R,) into the U rows.

    Parts: "projection + dedup" (scale choice, conv5 window keys, distinct windows),
    "pooling" (``pool_windows(keep_order=False)`` of the distinct windows into a workspace kept
    across images), "fc6/fc7".
    """
    g = models.geometry
    with watch.part("projection + dedup"):
        scale_index = select_scale(boxes, image_hw, scales, g.target_size)
        keys = dedup_keys(boxes, image_hw, scales, scale_index, g.stride, g.offset0, g.offset)
        first, inverse = distinct_windows(keys)
    with watch.part("pooling"):
        dim = models.feature_dim
        if len(models.workspace) < len(first):
            models.workspace = torch.empty((len(first), dim), device=models.device)
        pooled, rows = pool_windows(
            maps, boxes[first.numpy()], image_hw, scales, scale_index[first], g.stride,
            g.offset0, g.offset, g.levels, out=models.workspace, keep_order=False,
        )  # fmt: skip
    with watch.part("fc6/fc7"), autocast(models.device, models.precision):
        parts = pooled.split(TEST.batch_windows)
        fc7 = torch.cat([models.head.features(part) for part in parts]).float()
    inverse = inverse_permutation(rows)[inverse]
    return pooled, fc7, inverse.to(pooled.device)


def detect_from_features(
    models: Models,
    pooled: Tensor,
    fc7: Tensor,
    inverse: Tensor,
    boxes: np.ndarray,
    image_hw: tuple[int, int],
    watch: Stopwatch,
) -> dict[str, int]:
    """``Detector.detect`` after the features: "SVM scores", "NMS + top-k", "regression",
    "clip + NMS". Returns counts: windows passing the threshold, kept, final detections."""
    with watch.part("SVM scores"):
        scores = (fc7 @ models.svm_weight + models.svm_bias)[inverse]
    with watch.part("NMS + top-k"):
        boxes_t = torch.as_tensor(boxes, device=scores.device)
        window_index, labels, kept_scores = select_detections(
            scores, boxes_t, TEST.score_thresh, TEST.nms_thresh, TEST.max_per_class
        )
    with watch.part("regression"):
        features = pooled[inverse[window_index]]
        regressed = models.regressors.apply(boxes_t[window_index], features, labels, image_hw)
    with watch.part("clip + NMS"):
        final = finalize_detections(regressed, kept_scores, labels, image_hw, TEST.nms_thresh)
    return {
        "passing": int((scores > TEST.score_thresh).sum()),
        "kept": len(window_index),
        "detections": len(final[0]),
    }


def spp_test_image(
    models: Models, item: BenchImage, scales: Sequence[int]
) -> tuple[dict[str, float], dict[str, int]]:
    """Seconds per part of one image's SPP test path, and counts (windows, distinct, ...)."""
    watch = Stopwatch(models.device)
    with torch.inference_mode():
        maps = conv_maps(models, item.image, scales, watch)
        hw = item.record.image_hw
        pooled, fc7, inverse = spp_features(models, maps, hw, scales, item.boxes, watch)
        counts = detect_from_features(models, pooled, fc7, inverse, item.boxes, hw, watch)
    counts.update(windows=len(item.boxes), distinct=len(pooled))
    return watch.seconds, counts


# Parts grouped as the paper's Table 9 columns: conv (image → conv5), fc (conv5 → class scores),
# and the rest (window bookkeeping and post-processing, not in the paper's table).
def group_parts(seconds: dict[str, float]) -> dict[str, float]:
    conv = sum(v for k, v in seconds.items() if k.startswith(("prep ", "conv ")))
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
    from spp_detect.image import resized_hw

    return sum(conv_gflop(backbone.features, resized_hw(image_hw, s)) for s in scales)


def scales_label(scales: Sequence[int]) -> str:
    return f"{len(scales)} scale{'s' if len(scales) > 1 else ''} {tuple(scales)}"
