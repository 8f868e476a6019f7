"""SPP-net (spp-detect) against torchvision's Faster R-CNN on the same trunk, data and CPU time.

Both detectors use the EfficientNet-Lite0 trunk with the packaged ImageNet weights
(``build_backbone("efficientnet_lite0", "imagenet")``, BatchNorm folded into the convs, to
stage5: 112 channels, stride 16). spp-detect runs its whole `run` (proposals, conv5 maps,
fine-tuning, SVMs, box regression, test and eval of both splits); Faster R-CNN is then trained
on the training split for the same wall time, tested on the test split, and scored with the
package's VOC07 11-point code (``voc_eval.evaluate_all_classes`` + ``summarize``).

Shapes: N images, G gt boxes of an image, M detections, K foreground classes.

spp-detect side:
  * ``spp-detect run`` (``python -m spp_detect run --device cpu --workers THREADS``, with
    OMP_NUM_THREADS=THREADS) in ``--spp-run-dir``; default settings: ``-c raccoon``, the CI
    setting (1 scale of 400 px, selective search on images shrunk to 400 px, fc6/fc7 of 512,
    300 fine-tuning iterations, trunk frozen); ``--spp-set`` adds overrides. A run dir that
    already has ``eval/test.json`` is reused as it is; the wall time this script measured for it
    is kept in ``RUN_DIR/bench_run_seconds.json``, or give ``--budget-seconds``. A run dir left
    half-done is resumed by `run`, so its measured time is only the rest: use a fresh one.
  * mAP: ``RUN_DIR/eval/test.json`` ("mAP_07", else "mAP"), over the whole test split.
  * seconds per test image: ``spp_detect.api.Detector.from_run`` on CPU (conv5 maps computed
    on the fly in float32), per image: read, selective search with the run's settings,
    ``detect``; "without proposals" leaves out the selective-search call. The mAP of these
    API detections on the timed images is in the JSON as a cross-check.

Faster R-CNN peer (torchvision ``FasterRCNN``):
  * backbone: the Lite0 trunk wrapped to return one map "0" (out_channels 112); stem, stage1
    and stage2 frozen, trainable from ``--train-from`` (default stage3, i.e. stride 8 on: the
    analogue of torchvision's default of freezing a ResNet's conv1 and layer1); no BN to freeze.
  * RPN anchors ``AnchorGenerator(sizes=((32, 64, 128, 256, 512),), aspect_ratios=((0.5, 1.0,
    2.0),))``; ``MultiScaleRoIAlign(["0"], 7, sampling_ratio=2)``; torchvision's default
    TwoMLPHead (fc 1024, 1024), RPN and RoI sampling settings; ``num_classes = K + 1``.
  * pixels: images are resized here exactly as spp-detect's trunk sees them
    (``image.resize_short_side``: shorter side ``--min-size``, default 400 = the CI scale,
    longer side capped at ``--max-size``, 0 = no cap as ``extract.max_long_side``), then given
    to the model as 0–1 RGB with ``image_mean = 127/255``, ``image_std = 128/255``, so that the
    trunk sees (x − 127) / 128, spp-detect's "rgb127" (checked against ``image_to_tensor`` at
    start). The model's own ``GeneralizedRCNNTransform`` gets the same min/max size, so its
    resize is the identity.
  * training: SGD, momentum 0.9, weight decay 1e-4, batch of 2 images, horizontal flips
    (p = 0.5), lr ``--lr`` (0.0025: torchvision's 0.02 for 16 images, scaled to 2) after a
    linear warm-up from lr/1000 over 100 iterations or a quarter of the training time
    (whichever ends first), then constant, ×0.1 once 2/3 of the training time has passed;
    difficult gt left out.
    The budget clock starts before the training images are read (model building and image
    loading count) and no iteration starts that would, at the last iteration's pace, end past
    it. Its test is not in the budget (neither is spp-detect's re-timing by the API).
  * test: ``model.eval()``, ``box_score_thresh`` 0.001, 100 detections per image,
    torchvision's NMS 0.5; per image: read, resize, forward (RPN included), boxes mapped back
    to the original pixels; median seconds over the images after 1 warm-up.
  * loss: logged every ``--log-every`` iterations; every iteration's losses and seconds go to
    ``OUT_loss.json`` and (matplotlib) ``OUT_loss.png``; the means of the first and last 50
    iterations are printed and must fall (else exit status 1).

Both sides use ``--threads`` torch (and OpenCV) threads on the CPU, for training and test.

Full run (the raccoon CI setting; minutes on 2 cores):

    python scripts/bench_vs_faster_rcnn.py --root ../shared/datasets/raccoon --threads 2

Quick check (a small spp run, 2 minutes of Faster R-CNN, 5 test images):

    python scripts/bench_vs_faster_rcnn.py --threads 1 --spp-limit 20 --budget-seconds 120 \\
        --limit-test 5 --spp-run-dir runs/bench_vs_faster_rcnn/spp_smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from _bench_common import DEFAULT_ROOT, REPO, machine_header, markdown_table, write_json
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign

from spp_detect.api import Detector
from spp_detect.config import Config, load_config
from spp_detect.data.image import (
    LITE_PIXEL_MEAN,
    LITE_PIXEL_STD,
    image_to_tensor,
    read_image,
    resize_short_side,
)
from spp_detect.data.proposals import propose_image
from spp_detect.evaluation.voc_eval import evaluate_all_classes, summarize
from spp_detect.models.backbones import Backbone
from spp_detect.models.weights import build_backbone
from spp_detect.runtime.run_dir import RunDir
from spp_detect.stages.context import split_records
from spp_detect.structures import Detections, ImageDetections, ImageRecord

TRUNK = "efficientnet_lite0"  # extract.backbone's default (spp_detect/config.py)
TRUNK_WEIGHTS = "imagenet"  # the packaged ImageNet weights (weights.PACKAGED_WEIGHTS)
# Standard Faster R-CNN anchors on one map (torchvision's AnchorGenerator defaults, py-faster-rcnn)
ANCHOR_SIZES = ((32, 64, 128, 256, 512),)
ASPECT_RATIOS = ((0.5, 1.0, 2.0),)
ROI_SIZE, ROI_SAMPLING = 7, 2  # RoIAlign output and sampling ratio (torchvision Faster R-CNN)
# The model gets 0–1 RGB; these make its normalisation spp-detect's "rgb127", (x − 127) / 128
IMAGE_MEAN = [LITE_PIXEL_MEAN / 255.0] * 3
IMAGE_STD = [LITE_PIXEL_STD / 255.0] * 3
NO_CAP = 1_000_000  # a max_size that never binds (spp-detect's extract.max_long_side = 0)
# SGD recipe of torchvision's references/detection (momentum, weight decay, linear warm-up from
# lr × WARMUP_FACTOR): 100 iterations here, as the budget is minutes, or a quarter of the
# training time, whichever ends first (at 1-3 s an iteration on 2 shared CPU cores, 100
# iterations can be most of the budget). The first version counted the warm-up from the budget's
# start, image loading included, so the rate reached 0.01 within ten iterations and diverged.
MOMENTUM, WEIGHT_DECAY = 0.9, 1e-4
WARMUP_ITERS, WARMUP_FACTOR, WARMUP_MAX_SHARE = 100, 1e-3, 0.25
# torchvision's references: lr 0.02 for 16 images a batch; linearly scaled to our 2
DEFAULT_LR = 0.02 * 2 / 16
LR_DROP_AT, LR_DROP = 2 / 3, 0.1  # one 10× step at 2/3 of the training time
BATCH = 2  # images per iteration (torchvision's reference: 2 per GPU)
FLIP_PROB = 0.5
SCORE_THRESH = 0.001  # test: keep low-score boxes for the PR curve (mAP)
DETECTIONS_PER_IMAGE = 100  # test: the torchvision default, also COCO's
LOSS_WINDOW = 50  # iterations averaged for the first / last loss
WARMUP_IMAGES = 1  # untimed test images first
# `spp-detect run` settings: the bundled raccoon config, the CI setting of tests/test_pipeline.py
SPP_CONFIG = "raccoon"
SPP_CI_SETTINGS = ()
RUN_SECONDS_FILE = "bench_run_seconds.json"  # in the spp run dir: its measured `run` wall time
DEFAULT_RUN_DIR = REPO / "runs/bench_vs_faster_rcnn/spp"
DEFAULT_OUT = REPO / "runs/bench_vs_faster_rcnn.json"


# ---------------------------------------------------------------- options


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--root", type=Path, default=DEFAULT_ROOT, help="VOC-layout dataset")
    add("--threads", type=int, default=2, help="torch and OpenCV threads (and spp workers)")
    add(
        "--budget-seconds",
        type=float,
        default=None,
        help="Faster R-CNN training wall time; default: spp-detect's measured `run` time",
    )
    add(
        "--spp-run-dir",
        type=Path,
        default=DEFAULT_RUN_DIR,
        help="reused when it has eval/test.json, else `spp-detect run` runs there",
    )
    add("--spp-config", default=SPP_CONFIG, help="config of the spp run (-c)")
    add(
        "--spp-set",
        action="append",
        default=None,
        metavar="SECTION.KEY=VALUE",
        help="spp run overrides (repeatable); replace the CI setting, data.root is added",
    )
    add("--spp-limit", type=int, default=None, help="spp run --limit (quick checks only)")
    add("--min-size", type=int, default=400, help="shorter image side, px (the CI scale)")
    add("--max-size", type=int, default=0, help="cap on the longer side, px; 0 = none")
    add("--train-from", default="stage3", help="first trainable trunk stage; none = frozen")
    add("--lr", type=float, default=DEFAULT_LR, help="base rate (2 images a batch)")
    add("--log-every", type=int, default=20, help="iterations between loss lines")
    add("--seed", type=int, default=0)
    add("--limit-test", type=int, default=None, help="first N test images only (quick check)")
    add("--out", type=Path, default=DEFAULT_OUT, help="JSON report; OUT_loss.json/.png beside")
    return parser.parse_args()  # fmt: skip


# ---------------------------------------------------------------- the spp-detect side


def spp_command(args: argparse.Namespace, run_dir: Path) -> list[str]:
    """`spp-detect run` on ``--root`` into ``run_dir``, on the CPU with ``--threads`` workers."""
    settings = SPP_CI_SETTINGS if args.spp_set is None else args.spp_set
    command = [sys.executable, "-m", "spp_detect", "run", "-c", args.spp_config]
    command += ["--run-dir", str(run_dir), "--device", "cpu", "--workers", str(args.threads)]
    command += ["--set", f"data.root={args.root.resolve()}"]
    for setting in settings:
        command += ["--set", setting]
    if args.spp_limit:
        command += ["--limit", str(args.spp_limit)]
    return command


def ensure_spp_run(args: argparse.Namespace) -> dict[str, Any]:
    """The spp run's dir, command and wall time (s): reused when it has eval/test.json, else
    run now and timed (the time kept in ``RUN_SECONDS_FILE``)."""
    run_dir = args.spp_run_dir.resolve()
    record_path = run_dir / RUN_SECONDS_FILE
    if RunDir(run_dir).eval_path("test").is_file():
        recorded = json.loads(record_path.read_text()) if record_path.is_file() else {}
        print(f"reusing the spp run in {run_dir}")
        return {"run_dir": str(run_dir), "reused": True, **recorded}
    command = spp_command(args, run_dir)
    print("running:", " ".join(command), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO, env=env)
    seconds = time.perf_counter() - started
    recorded = {"run_seconds": seconds, "command": command, "threads": args.threads}
    record_path.write_text(json.dumps(recorded, indent=1) + "\n")
    return {"run_dir": str(run_dir), "reused": False, **recorded}


def spp_eval_map(run_dir: Path) -> float:
    """VOC07 11-point mAP of the run's test split (``eval/test.json``), 0–1."""
    report = json.loads(RunDir(run_dir).eval_path("test").read_text())
    return float(report.get("mAP_07", report["mAP"]))


@torch.inference_mode()
def time_spp(run_dir: Path, records: Sequence[ImageRecord]) -> dict[str, Any]:
    """Seconds per test image of ``api.Detector`` (with / without its selective search),
    medians after ``WARMUP_IMAGES``, and its detections (for the cross-check mAP)."""
    detector = Detector.from_run(run_dir, device="cpu")
    with_props, without_props, found = [], [], []
    for record in records:
        started = time.perf_counter()
        pixels = read_image(record.path)
        read = time.perf_counter()
        boxes = propose_image(pixels, **detector.proposal_settings)
        proposed = time.perf_counter()
        found.append(detector.detect(pixels, boxes))
        done = time.perf_counter()
        with_props.append(done - started)
        without_props.append(done - proposed + read - started)
    return {
        "s_per_image": median_after_warmup(with_props),
        "s_per_image_without_proposals": median_after_warmup(without_props),
        "detections": found,
    }


def median_after_warmup(seconds: Sequence[float]) -> float:
    timed = seconds[WARMUP_IMAGES:] or seconds
    return float(statistics.median(timed))


# ---------------------------------------------------------------- the Faster R-CNN peer


class LiteTrunk(nn.Module):
    """The spp-detect trunk as a torchvision detection backbone:
    (N, 3, H, W) normalised → {"0": (N, 112, H/16, W/16)}."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.body = backbone
        self.out_channels = backbone.channels

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return {"0": self.body(images)}


def build_trunk(train_from: str) -> Backbone:
    """The Lite0 trunk with ImageNet weights, trainable from stage ``train_from`` ("none":
    frozen)."""
    backbone = build_backbone(TRUNK, TRUNK_WEIGHTS)
    if train_from != "none":
        if train_from not in backbone.layers:
            raise SystemExit(f"--train-from {train_from}: one of {list(backbone.layers)} or none")
        backbone.features[backbone.layers[train_from] :].requires_grad_(True)
    return backbone


def build_faster_rcnn(backbone: Backbone, num_classes: int, min_size: int, max_size: int):
    """torchvision FasterRCNN on ``backbone`` for K = ``num_classes`` foreground classes."""
    return FasterRCNN(
        LiteTrunk(backbone),
        num_classes=num_classes + 1,
        min_size=min_size,
        max_size=max_size or NO_CAP,
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
        rpn_anchor_generator=AnchorGenerator(sizes=ANCHOR_SIZES, aspect_ratios=ASPECT_RATIOS),
        box_roi_pool=MultiScaleRoIAlign(["0"], output_size=ROI_SIZE, sampling_ratio=ROI_SAMPLING),
        box_score_thresh=SCORE_THRESH,
        box_detections_per_img=DETECTIONS_PER_IMAGE,
    )


def check_normalisation(model: FasterRCNN, backbone: Backbone) -> None:
    """The model's normalisation of 0–1 pixels is spp-detect's ``image_to_tensor``."""
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    ours = model.transform.normalize(to_unit_tensor(pixels))
    theirs = image_to_tensor(pixels, backbone.normalization)
    assert torch.allclose(ours, theirs, atol=1e-5), "Faster R-CNN input != spp-detect's"


def to_unit_tensor(image: np.ndarray) -> Tensor:
    """uint8 (H, W, 3) RGB → float32 (3, H, W) in 0–1."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0


def resize_for_model(image: np.ndarray, min_size: int, max_size: int):
    """uint8 (H, W, 3) → resized (H', W', 3) as spp-detect's trunk sees it, and the box scale
    (W'/W, H'/H, W'/W, H'/H) float32 (4,)."""
    resized = resize_short_side(image, min_size, max_size)
    (height, width), (new_h, new_w) = image.shape[:2], resized.shape[:2]
    return resized, np.array([new_w / width, new_h / height] * 2, np.float32)


@dataclass(frozen=True)
class TrainImage:
    """One training image as the model takes it: pixels uint8 (H', W', 3) RGB, resized; boxes
    float32 (G, 4) in its pixels; labels int64 (G,) in 1..K (0 = background)."""

    pixels: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray


def load_train_images(
    records: Sequence[ImageRecord], min_size: int, max_size: int
) -> list[TrainImage]:
    """The training split, decoded and resized once (difficult gt left out)."""
    images = []
    for record in records:
        pixels, scale = resize_for_model(read_image(record.path), min_size, max_size)
        keep = ~record.difficult
        labels = record.gt_labels[keep] + 1
        images.append(TrainImage(pixels, record.gt_boxes[keep] * scale, labels))
    return images


def sample_batches(count: int, rng: np.random.Generator) -> Iterator[list[int]]:
    """Endless batches of ``BATCH`` image indices, each epoch a fresh permutation."""
    while True:
        order = rng.permutation(count)
        for start in range(0, count - BATCH + 1, BATCH):
            yield order[start : start + BATCH].tolist()


def model_input(image: TrainImage, flip: bool) -> tuple[Tensor, dict[str, Tensor]]:
    """(3, H', W') 0–1 pixels and the target dict, flipped horizontally when ``flip``."""
    pixels, boxes = to_unit_tensor(image.pixels), torch.from_numpy(image.boxes.copy())
    if flip:
        pixels = pixels.flip(-1)
        width = pixels.shape[-1]
        boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
    return pixels, {"boxes": boxes.reshape(-1, 4), "labels": torch.from_numpy(image.labels)}


def learning_rate(base: float, iteration: int, elapsed: float, budget: float) -> float:
    """Linear warm-up from ``base × WARMUP_FACTOR`` over ``WARMUP_ITERS`` iterations or
    ``WARMUP_MAX_SHARE`` of the training time, whichever ends first; then ``base``;
    ×``LR_DROP`` after ``LR_DROP_AT`` of it (``elapsed`` seconds of ``budget`` spent training)."""
    lr = base * (LR_DROP if elapsed >= LR_DROP_AT * budget else 1.0)
    alpha = min(1.0, max(iteration / WARMUP_ITERS, elapsed / (WARMUP_MAX_SHARE * budget)))
    return lr * (WARMUP_FACTOR * (1 - alpha) + alpha)


def batch_inputs(
    images: Sequence[TrainImage], batch: Sequence[int], rng: np.random.Generator
) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """The model's inputs for one batch: pixels and targets, each image flipped with
    probability ``FLIP_PROB``."""
    pairs = [model_input(images[i], rng.random() < FLIP_PROB) for i in batch]
    return [pixels for pixels, _ in pairs], [target for _, target in pairs]


def train(
    model: FasterRCNN,
    images: Sequence[TrainImage],
    args: argparse.Namespace,
    budget: float,
    clock_start: float,
) -> list[dict[str, float]]:
    """SGD until ``budget`` seconds since ``clock_start`` (no iteration starts that would end
    past it at the last one's pace); one dict per iteration (iteration, seconds, lr, each
    loss, total "loss"). Stops early on a non-finite loss (its row has no "seconds")."""
    rng = np.random.default_rng(args.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    model.train()
    curve, last_step = [], 0.0
    training_start = time.perf_counter()
    training_budget = budget - (training_start - clock_start)
    for iteration, batch in enumerate(sample_batches(len(images), rng)):
        step_start = time.perf_counter()
        if step_start - clock_start + last_step > budget:
            break
        lr = learning_rate(args.lr, iteration, step_start - training_start, training_budget)
        for group in optimizer.param_groups:
            group["lr"] = lr
        losses = model(*batch_inputs(images, batch, rng))
        total = sum(losses.values())
        if not torch.isfinite(total):
            print(f"iteration {iteration}: loss {float(total.detach())}, stopping (diverged)")
            curve.append({"iteration": iteration, "loss": float(total.detach())})
            break
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        last_step = time.perf_counter() - step_start
        row = {"iteration": iteration, "seconds": time.perf_counter() - clock_start, "lr": lr}
        row.update({name: value.item() for name, value in losses.items()}, loss=total.item())
        curve.append(row)
        if iteration % args.log_every == 0:
            log_losses(curve[-args.log_every :])
    return curve


def log_losses(rows: Sequence[dict[str, float]]) -> None:
    """One line: the last row's iteration, time and lr, the rows' mean losses."""
    last = rows[-1]
    names = [key for key in last if key.startswith("loss")]
    means = "  ".join(f"{name} {np.mean([r[name] for r in rows]):.3f}" for name in names)
    print(
        f"it {last['iteration']:5d}  {last['seconds']:7.1f} s  lr {last['lr']:.5f}  {means}",
        flush=True,
    )


def loss_trend(curve: Sequence[dict[str, float]]) -> dict[str, Any]:
    """Mean total loss of the first and last ``LOSS_WINDOW`` iterations (half the run each
    when shorter), and whether it fell."""
    losses = [row["loss"] for row in curve]
    window = max(1, min(LOSS_WINDOW, len(losses) // 2))
    first, last = float(np.mean(losses[:window])), float(np.mean(losses[-window:]))
    fell = bool(np.isfinite(losses).all() and len(losses) >= 2 and last < first)
    return {"window": window, "first": first, "last": last, "fell": fell}


@torch.inference_mode()
def test_faster_rcnn(
    model: FasterRCNN, records: Sequence[ImageRecord], min_size: int, max_size: int
) -> tuple[list[ImageDetections], list[float]]:
    """Each test image's detections (original pixels, labels 0..K−1) and seconds (read,
    resize, forward, boxes mapped back)."""
    model.eval()
    found, seconds = [], []
    for record in records:
        started = time.perf_counter()
        pixels, scale = resize_for_model(read_image(record.path), min_size, max_size)
        output = model([to_unit_tensor(pixels)])[0]
        boxes = output["boxes"].numpy() / scale
        seconds.append(time.perf_counter() - started)
        labels = output["labels"].numpy() - 1
        found.append(ImageDetections(boxes, output["scores"].numpy(), labels))
    return found, seconds


# ---------------------------------------------------------------- evaluation and report


def voc07_map(config: Config, records: Sequence[ImageRecord], found: Sequence[ImageDetections]):
    """VOC07 11-point mAP (0–1) of per-image detections on ``records``, the package's code."""
    detections = Detections.from_images([r.image_id for r in records], found)
    classes = config.data.classes
    results = evaluate_all_classes(detections, records, len(classes), config.eval.iou_thresh)
    return summarize(results, classes, True, config.eval.iou_thresh, len(records))["mAP"]


def save_loss_curve(curve: Sequence[dict[str, float]], out: Path) -> dict[str, str]:
    """``OUT_loss.json`` and, when matplotlib imports, ``OUT_loss.png``; their paths."""
    stem = out.with_suffix("")
    paths = {"json": str(stem) + "_loss.json"}
    write_json(Path(paths["json"]), {"iterations": list(curve)})
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return paths
    rows = [row for row in curve if "seconds" in row]
    figure, axis = plt.subplots(figsize=(7, 4))
    for name in [key for key in rows[0] if key.startswith("loss")] if rows else []:
        axis.plot([r["iteration"] for r in rows], smooth([r[name] for r in rows]), label=name)
    axis.set(xlabel="iteration", ylabel=f"loss (mean of {LOSS_WINDOW // 2})", yscale="log")
    axis.set_title("Faster R-CNN (EfficientNet-Lite0) training loss")
    axis.legend()
    paths["png"] = str(stem) + "_loss.png"
    figure.savefig(paths["png"], dpi=100, bbox_inches="tight")
    plt.close(figure)
    return paths


def smooth(values: Sequence[float]) -> np.ndarray:
    """Trailing moving average over up to ``LOSS_WINDOW // 2`` values."""
    width = LOSS_WINDOW // 2
    sums = np.cumsum(np.concatenate([[0.0], values]))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(0, ends - width)
    return (sums[ends] - sums[starts]) / (ends - starts)


def report_table(spp: dict[str, Any], frcnn: dict[str, Any]) -> str:
    headers = (
        "detector",
        "training wall time (s)",
        "VOC07 mAP (%)",
        "s / test image",
        "s / test image without proposals",
    )
    rows = [
        (
            "SPP-net (spp-detect), whole `run`",
            f"{spp['run_seconds']:.0f}",
            f"{100 * spp['mAP']:.1f}",
            f"{spp['s_per_image']:.3f}",
            f"{spp['s_per_image_without_proposals']:.3f}",
        ),
        (
            "Faster R-CNN (torchvision)",
            f"{frcnn['train_seconds']:.0f}",
            f"{100 * frcnn['mAP']:.1f}",
            f"{frcnn['s_per_image']:.3f}",
            "(RPN inside)",
        ),
    ]
    return markdown_table(headers, rows)


def settings_lines(args, spp: dict[str, Any], frcnn: dict[str, Any], tested: int) -> str:
    trend = frcnn["loss_trend"]
    command = " ".join(spp.get("command", ["(reused run, command unknown)"]))
    return "\n".join([
        f"- trunk: {TRUNK} ({TRUNK_WEIGHTS} weights) for both; data {args.root}",
        f"- spp-detect: `{command}`; mAP from {spp['run_dir']}/eval/test.json "
        f"(all test images); API mAP on the {tested} timed images "
        f"{100 * spp['api_mAP']:.1f}",
        f"- Faster R-CNN: budget {frcnn['budget_seconds']:.0f} s, {frcnn['iterations']} "
        f"iterations of {BATCH} images, lr {args.lr} (warm-up {WARMUP_ITERS} it or "
        f"{WARMUP_MAX_SHARE:.0%} of the training time, ×{LR_DROP} "
        f"at {LR_DROP_AT:.0%} of it), trunk trainable from {args.train_from}, "
        f"shorter side {args.min_size}, max side {args.max_size or 'uncapped'}; loss "
        f"{trend['first']:.3f} → {trend['last']:.3f} (first / last {trend['window']} it)",
        f"- test: {tested} images, medians after {WARMUP_IMAGES} warm-up; "
        f"{args.threads} torch/OpenCV thread(s), CPU",
    ])  # fmt: skip


# ---------------------------------------------------------------- main


def run_faster_rcnn(args, config: Config, budget: float, test_records) -> dict[str, Any]:
    """Build, train for ``budget`` seconds, test; the figures and loss curve."""
    torch.manual_seed(args.seed)
    clock_start = time.perf_counter()
    backbone = build_trunk(args.train_from)
    model = build_faster_rcnn(backbone, len(config.data.classes), args.min_size, args.max_size)
    check_normalisation(model, backbone)
    records = split_records(config, config.data.train_split)
    images = load_train_images(records, args.min_size, args.max_size)
    print(f"Faster R-CNN: {len(images)} training images loaded, training for {budget:.0f} s")
    curve = train(model, images, args, budget, clock_start)
    train_seconds = time.perf_counter() - clock_start
    found, seconds = test_faster_rcnn(model, test_records, args.min_size, args.max_size)
    return {
        "budget_seconds": budget,
        "train_seconds": train_seconds,
        "iterations": sum("seconds" in row for row in curve),
        "loss_trend": loss_trend(curve),
        "mAP": voc07_map(config, test_records, found),
        "s_per_image": median_after_warmup(seconds),
        "loss_files": save_loss_curve(curve, args.out),
    }


def spp_side(args: argparse.Namespace) -> tuple[dict[str, Any], Config, list[ImageRecord]]:
    """The spp run (made or reused), its figures, its config and the test records timed."""
    spp = ensure_spp_run(args)
    if args.budget_seconds is None and "run_seconds" not in spp:
        raise SystemExit(f"{args.spp_run_dir}: reused run of unknown duration; --budget-seconds")
    spp.setdefault("run_seconds", args.budget_seconds)  # given as the run's time
    run_dir = Path(spp["run_dir"])
    config = load_config(RunDir(run_dir).config_path, [f"data.root={args.root.resolve()}"])
    test_records = split_records(config, config.data.test_split, args.limit_test)
    timing = time_spp(run_dir, test_records)
    found = timing.pop("detections")
    spp.update(timing, mAP=spp_eval_map(run_dir), api_mAP=voc07_map(config, test_records, found))
    return spp, config, test_records


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    header = machine_header(torch.device("cpu"))
    spp, config, test_records = spp_side(args)
    budget = float(args.budget_seconds or spp["run_seconds"])
    frcnn = run_faster_rcnn(args, config, budget, test_records)
    table = report_table(spp, frcnn)
    settings = settings_lines(args, spp, frcnn, len(test_records))
    print(f"\n{header}\n{settings}\n\n{table}\n")
    trend = frcnn["loss_trend"]
    verdict = "falls" if trend["fell"] else "DOES NOT FALL (a bug in the peer)"
    print(
        f"Faster R-CNN loss, mean of the first {trend['window']} iterations {trend['first']:.3f}"
        f", of the last {trend['window']} {trend['last']:.3f}: {verdict}"
    )
    arguments = {key: str(value) for key, value in vars(args).items()}
    report = {"args": arguments, "machine": header, "table": table}
    write_json(args.out, {**report, "spp": spp, "faster_rcnn": frcnn})
    print(f"wrote {args.out}, {', '.join(frcnn['loss_files'].values())}")
    return 0 if trend["fell"] else 1


if __name__ == "__main__":
    sys.exit(main())
