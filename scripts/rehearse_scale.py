"""Rehearse PASCAL VOC 2007 scale: each stage's peak memory, bytes written and wall time on a
synthetic VOC-sized dataset (issue 17; results in docs/benchmarks-history.md, "VOC-scale
rehearsal").

It drives the real stages through the real command (one process per stage, so that each
stage's peak RSS is its own, read from ``os.wait4``), on:

* a synthetic dataset in VOC layout with VOC 2007's object statistics: about 2.5 objects per
  image, the 20 classes at VOC 2007 trainval's class frequencies, VOC's image shapes and a wide
  spread of box sizes; the images are flat colour, so they cost nothing to decode;
* 2,000 proposal-like windows per image (jittered ground truth boxes and random boxes), read by
  `propose` through the R-CNN ``.mat`` path, so that selective search is not the cost;
* conv5 maps from a cheap synthetic trunk (one 16×16 stride-16 convolution and a ReLU) whose
  maps have the shape of a real trunk's at the same scale: 256 × 43 × 57 for a 500 × 375 image
  at scale 688, so window distinctness and pooling match the real case.

The dimensions default to the paper's (pool5 256 × 50 = 12,800, fc 4,096, 20 classes); on a
CPU the fc stages then cost seconds per image, so ``--channels`` and ``--fc-dim`` shrink them
for sweeps. Examples:

    python scripts/rehearse_scale.py --images 500 --work /tmp/rehearse
    python scripts/rehearse_scale.py --sweep 250,500,1000 --channels 64 --fc-dim 256 --out t.md
    python scripts/rehearse_scale.py --images 8 --test-images 4 --windows 200 --quick  # CI

The table has one row per stage and split: images, peak RSS, wall time and bytes written. With
``--sweep`` it adds, per stage, the growth of peak RSS per 1,000 images (least squares) and the
peak extrapolated to VOC 2007's counts.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

# VOC 2007 (devkit statistics): images per split and trainval object instances per class.
VOC07_TRAINVAL = 5011
VOC07_TEST = 4952
VOC07_INSTANCES = {
    "aeroplane": 306, "bicycle": 353, "bird": 486, "boat": 290, "bottle": 505, "bus": 229,
    "car": 1250, "cat": 376, "chair": 798, "cow": 259, "diningtable": 215, "dog": 510,
    "horse": 362, "motorbike": 339, "person": 4690, "pottedplant": 514, "sheep": 257,
    "sofa": 248, "train": 297, "tvmonitor": 324,
}  # fmt: skip
OBJECTS_PER_IMAGE = sum(VOC07_INSTANCES.values()) / VOC07_TRAINVAL  # 2.5
# Most VOC images are 500 px on the longer side: landscape 500 × 375, portrait 375 × 500 and
# the 500 × 333 of many Flickr photos (height, width; shares approximate).
IMAGE_SHAPES = ((375, 500), (500, 375), (333, 500))
IMAGE_SHARES = (0.6, 0.25, 0.15)
# Box side sqrt(w·h) as a fraction of sqrt(image area): VOC's boxes run from a few percent to
# the whole image; log-uniform over this range gives a similar spread of small and large.
BOX_SIDE_FRACTION = (0.06, 0.95)
BOX_ASPECT = (0.4, 2.5)  # width / height, log-uniform
JITTERED_PER_OBJECT = 40  # windows jittered around each object (selective search finds ~this)
JITTER = 0.15  # of the box side: most jittered windows overlap their object by IoU > 0.5
PROPOSAL_MIN_SIDE = 20  # px, as propose.min_size
WINDOWS = 2000  # proposals per image (the paper's "about 2,000")
# one colour (BGR) per class: hues around the colour wheel, two brightnesses
CLASS_COLOURS = [
    cv2.cvtColor(np.uint8([[[9 * k, 220, 120 + 100 * (k % 2)]]]), cv2.COLOR_HSV2BGR)[0, 0]
    for k in range(len(VOC07_INSTANCES))
]
STAGES = ("propose", "extract", "finetune", "train-svm", "train-bbox", "test", "eval")
SPLITS = ("trainval", "test")
SYNTHETIC = "synthetic"


@dataclass(frozen=True)
class Settings:
    """What one rehearsal uses: image counts and the dimensions."""

    train_images: int
    test_images: int
    windows: int
    channels: int  # conv5 channels of the synthetic trunk (pool5 dim = 50 × this)
    fc_dim: int
    scales: str  # extract.scales, YAML list
    iterations: int  # finetune.iterations: memory does not grow with them
    seed: int


# --- the synthetic dataset --------------------------------------------------------------------


def make_dataset(root: Path, settings: Settings) -> dict[str, tuple[int, int, np.ndarray]]:
    """Write the VOC-layout dataset; returns {image id: (height, width, gt (G, 4) 1-based)}."""
    rng = np.random.default_rng(settings.seed)
    classes = list(VOC07_INSTANCES)
    shares = np.array(list(VOC07_INSTANCES.values()), float)
    shares /= shares.sum()
    for folder in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    images: dict[str, tuple[int, int, np.ndarray]] = {}
    counts = {"trainval": settings.train_images, "test": settings.test_images}
    for split, count in counts.items():
        ids = [f"{split[:2]}{i:06d}" for i in range(count)]
        for image_id in ids:
            height, width = IMAGE_SHAPES[rng.choice(len(IMAGE_SHAPES), p=IMAGE_SHARES)]
            num = max(1, rng.poisson(OBJECTS_PER_IMAGE - 1) + 1)
            boxes = random_boxes(rng, height, width, num)
            labels = rng.choice(len(classes), size=num, p=shares)
            _write_image(root / "JPEGImages" / f"{image_id}.jpg", boxes, labels, height, width)
            xml = _annotation(image_id, height, width, boxes, [classes[k] for k in labels])
            (root / "Annotations" / f"{image_id}.xml").write_text(xml)
            images[image_id] = (height, width, boxes)
        (root / "ImageSets/Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return images


def random_boxes(rng: np.random.Generator, height: int, width: int, count: int) -> np.ndarray:
    """``count`` boxes (count, 4) [x1 y1 x2 y2], VOC 1-based inclusive pixels, with VOC-like
    sizes (``BOX_SIDE_FRACTION``) and shapes (``BOX_ASPECT``)."""
    side = np.sqrt(height * width) * np.exp(rng.uniform(*np.log(BOX_SIDE_FRACTION), count))
    aspect = np.exp(rng.uniform(*np.log(BOX_ASPECT), count))
    w = np.clip(side * np.sqrt(aspect), PROPOSAL_MIN_SIDE, width - 1)
    h = np.clip(side / np.sqrt(aspect), PROPOSAL_MIN_SIDE, height - 1)
    x1, y1 = rng.uniform(1, width - w), rng.uniform(1, height - h)
    return np.round(np.stack([x1, y1, x1 + w, y1 + h], axis=1)).astype(np.int64)


def _write_image(path: Path, boxes: np.ndarray, labels: np.ndarray, height: int, width: int):
    """A grey image with each object a rectangle of its class's colour: flat, so it costs
    little to decode, and the objects differ from the background and from each other, so the
    SVMs learn and evict negatives as they do on real data (a blank image would make every
    window a hard negative)."""
    image = np.full((height, width, 3), 128, np.uint8)
    for (x1, y1, x2, y2), label in zip(boxes, labels, strict=True):
        image[y1 - 1 : y2, x1 - 1 : x2] = CLASS_COLOURS[label]
    cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, 80])


def _annotation(image_id: str, height: int, width: int, boxes, names) -> str:
    objects = "".join(
        f"<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin>"
        f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for b, name in zip(boxes, names, strict=True)
    )
    size = f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"
    return f"<annotation><filename>{image_id}.jpg</filename>{size}{objects}</annotation>\n"


def proposal_windows(
    rng: np.random.Generator, height: int, width: int, gt: np.ndarray, count: int
) -> np.ndarray:
    """``count`` windows (count, 4) as an R-CNN ``.mat`` stores them: [y1 x1 y2 x2], 1-based,
    uint16. Jittered copies of each gt box first, random boxes for the rest."""
    jittered = np.repeat(gt.astype(float), JITTERED_PER_OBJECT, axis=0)[:count]
    sides = np.repeat(gt[:, 2:] - gt[:, :2], JITTERED_PER_OBJECT, axis=0)[: len(jittered)]
    jittered += rng.normal(0, JITTER, jittered.shape) * np.tile(sides, 2)
    random = random_boxes(rng, height, width, count - len(jittered))
    boxes = np.concatenate([jittered, random.astype(float)])
    x1 = np.clip(boxes[:, 0], 1, width - PROPOSAL_MIN_SIDE)
    y1 = np.clip(boxes[:, 1], 1, height - PROPOSAL_MIN_SIDE)
    x2 = np.clip(np.maximum(boxes[:, 2], x1 + PROPOSAL_MIN_SIDE), 1, width)
    y2 = np.clip(np.maximum(boxes[:, 3], y1 + PROPOSAL_MIN_SIDE), 1, height)
    return np.round(np.stack([y1, x1, y2, x2], axis=1)).astype(np.uint16)


def write_proposals(path: Path, images: dict, settings: Settings) -> None:
    """One R-CNN proposal ``.mat`` (``images``, ``boxes`` cells) for both splits."""
    import scipy.io

    rng = np.random.default_rng(settings.seed + 1)
    ids = list(images)
    names = np.empty(len(ids), dtype=object)
    cells = np.empty(len(ids), dtype=object)
    for i, image_id in enumerate(ids):
        height, width, gt = images[image_id]
        names[i] = image_id
        cells[i] = proposal_windows(rng, height, width, gt, settings.windows)
    scipy.io.savemat(path, {"images": names, "boxes": cells})


# --- the synthetic trunk (in the stage's own process) -----------------------------------------


def install_synthetic_trunk(channels: int) -> None:
    """Make ``extract.backbone: synthetic`` a trunk: a 16×16 stride-16 convolution to
    ``channels`` maps (stride 16 like ZF-5's conv5, so the maps have a real trunk's size)."""
    import torch
    from torch import nn

    from spp_detect.models import backbones, weights

    backbones.BACKBONES = (*backbones.BACKBONES, SYNTHETIC)
    backbones.DEFAULT_NORMALIZATION[SYNTHETIC] = "imagenet"
    original = backbones.random_trunk

    def random_trunk(name: str, last_stage: str = ""):
        if name != SYNTHETIC:
            return original(name, last_stage)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(backbones.RANDOM_INIT_SEED)
            features = nn.Sequential(nn.Conv2d(3, channels, 16, stride=16), nn.ReLU())
        return backbones.Backbone(SYNTHETIC, features, "imagenet", {"conv1": 0})

    # weights.build_backbone builds the trunk it loads weights into
    backbones.random_trunk = weights.random_trunk = random_trunk


def child_main(channels: int, argv: list[str]) -> None:
    """Run one `spp-detect` command with the synthetic trunk installed."""
    install_synthetic_trunk(channels)
    from spp_detect.cli import main

    sys.argv = ["spp-detect", *argv]
    main()


# --- measuring the stages ---------------------------------------------------------------------


def stage_sets(root: Path, mat: Path, settings: Settings) -> list[str]:
    sets = [
        f"data.root={root}", f"data.classes=[{','.join(VOC07_INSTANCES)}]",
        "propose.method=mat", f"propose.mat_file={mat}",
        f"extract.backbone={SYNTHETIC}", "extract.weights=none",
        f"extract.scales={settings.scales}",
        f"finetune.fc_dim={settings.fc_dim}", f"finetune.iterations={settings.iterations}",
        f"finetune.lr_steps=[{max(1, settings.iterations - 1)}]",
        f"finetune.checkpoint_every={settings.iterations}", "finetune.log_every=10",
    ]  # fmt: skip
    return [part for item in sets for part in ("--set", item)]


def run_stage(stage: str, split: str, run_dir: Path, sets: list[str], channels: int) -> dict:
    """One stage in its own process: peak RSS (bytes), wall seconds, bytes written."""
    argv = [stage, "--run-dir", str(run_dir), "--device", "cpu", "--workers", "1", *sets]
    if stage != "eval":
        argv += ["--split", split]
    command = [sys.executable, __file__, "--child", "--channels", str(channels), "--", *argv]
    before = _tree_bytes(run_dir)
    started = time.perf_counter()
    with open(run_dir.parent / f"{stage}.{split}.log", "w") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        tail = (run_dir.parent / f"{stage}.{split}.log").read_text()[-3000:]
        sys.exit(f"{stage} ({split}) failed with exit code {child.returncode}:\n{tail}")
    return {
        "stage": stage, "split": split, "peak_rss": usage.ru_maxrss * 1024, "wall": wall,
        "bytes": _tree_bytes(run_dir) - before,
    }  # fmt: skip


def _tree_bytes(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def rehearse(work: Path, settings: Settings, stages: tuple[str, ...]) -> list[dict]:
    """Make the dataset and proposals in ``work``, then run and measure every stage."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    root, mat, run_dir = work / "voc", work / "proposals.mat", work / "run"
    started = time.perf_counter()
    images = make_dataset(root, settings)
    write_proposals(mat, images, settings)
    print(f"dataset and proposals: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    sets = stage_sets(root, mat, settings)
    rows = []
    for stage in stages:
        splits = SPLITS if stage in ("propose", "extract") else (_split_of(stage),)
        for split in splits:
            row = run_stage(stage, split, run_dir, sets, settings.channels)
            row["images"] = settings.train_images if split == "trainval" else settings.test_images
            print(_row_text(row), file=sys.stderr)
            rows.append(row)
    return rows


def _split_of(stage: str) -> str:
    return "test" if stage in ("test", "eval") else "trainval"


# --- the tables -------------------------------------------------------------------------------


def _mib(count: float) -> str:
    return f"{count / 2**20:,.1f}"


def _row_text(row: dict) -> str:
    return (
        f"| {row['stage']} | {row['split']} | {row['images']:,} | {_mib(row['peak_rss'])} | "
        f"{row['wall']:.1f} | {_mib(row['bytes'])} |"
    )


def table(rows: list[dict]) -> str:
    lines = [
        "| stage | split | images | peak RSS (MiB) | wall (s) | written (MiB) |",
        "| --- | --- | --: | --: | --: | --: |",
    ]
    return "\n".join(lines + [_row_text(row) for row in rows])


def growth_table(rows: list[dict]) -> str:
    """Per stage and split: peak RSS against images, fitted by least squares, and the peak
    that fit gives at VOC 2007's count of that split."""
    lines = [
        "| stage | split | MiB per 1,000 images | fitted MiB at 0 images | at VOC07's count (MiB) "
        "| wall per 1,000 images (s) |",
        "| --- | --- | --: | --: | --: | --: |",
    ]
    keys = dict.fromkeys((row["stage"], row["split"]) for row in rows)
    for stage, split in keys:
        points = [row for row in rows if (row["stage"], row["split"]) == (stage, split)]
        images = np.array([row["images"] for row in points], float)
        if len(set(images)) < 2:
            continue
        slope, base = np.polyfit(images, [row["peak_rss"] for row in points], 1)
        wall_slope = np.polyfit(images, [row["wall"] for row in points], 1)[0]
        voc = VOC07_TRAINVAL if split == "trainval" else VOC07_TEST
        lines.append(
            f"| {stage} | {split} | {_mib(slope * 1000)} | {_mib(base)} | "
            f"{_mib(base + slope * voc)} | {wall_slope * 1000:.0f} |"
        )
    return "\n".join(lines)


def environment(settings: Settings) -> str:
    return (
        f"windows/image {settings.windows}, pool5 {settings.channels * 50:,} "
        f"({settings.channels} channels × 50 bins), fc {settings.fc_dim:,}, "
        f"{len(VOC07_INSTANCES)} classes, scales {settings.scales}, finetune "
        f"{settings.iterations} iterations; {os.cpu_count()} CPUs, "
        f"{time.strftime('%Y-%m-%d')}"
    )


# --- command line -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/rehearse_scale"))
    parser.add_argument("--images", type=int, default=VOC07_TRAINVAL, help="trainval images")
    parser.add_argument("--test-images", type=int, help="test images (default: as VOC07's ratio)")
    parser.add_argument("--sweep", help="comma-separated trainval counts, e.g. 500,1000,2500,5011")
    parser.add_argument("--windows", type=int, default=WINDOWS)
    parser.add_argument("--channels", type=int, default=256, help="256: pool5 12,800 (paper)")
    parser.add_argument("--fc-dim", type=int, default=4096, help="4,096: the paper's fc6/fc7")
    parser.add_argument("--scales", default="[688]", help="extract.scales (default 1 scale)")
    parser.add_argument("--iterations", type=int, default=20, help="finetune.iterations")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the markdown here")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def settings_for(args: argparse.Namespace, train_images: int) -> Settings:
    test = args.test_images or round(train_images * VOC07_TEST / VOC07_TRAINVAL)
    return Settings(
        train_images, test, args.windows, args.channels, args.fc_dim, args.scales,
        args.iterations, args.seed,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(args.channels, args.rest)
        return 0
    counts = [int(n) for n in args.sweep.split(",")] if args.sweep else [args.images]
    stages = tuple(args.stages.split(","))
    rows = []
    for count in counts:
        rows += rehearse(args.work / f"n{count}", settings_for(args, count), stages)
        if not args.keep:
            shutil.rmtree(args.work / f"n{count}", ignore_errors=True)
    parts = [f"Rehearsal: {environment(settings_for(args, counts[-1]))}", "", table(rows)]
    if len(counts) > 1:
        parts += ["", growth_table(rows)]
    text = "\n".join(parts) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"(the driver itself: peak RSS {_mib(own)} MiB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
