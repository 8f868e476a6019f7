"""End-to-end fine-tuning: seconds per SGD iteration and peak memory, per scale and first
trainable layer (docs/method.md#conv-fine-tuning).

Each setting runs a few iterations of the package's own step (``finetune_conv.end_to_end_step``:
2 images × 64 windows through the trainable conv layers, the pyramid and the paper-size head)
in a fresh process, so its peak RSS (and, on a GPU, peak allocated memory) is its own. Windows
are gt boxes plus proposal-like random boxes (``spp_detect.testing.random_boxes``).

    python scripts/bench_conv_finetune.py --scales 400 1200 --conv-from conv1 conv3 --iterations 4
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _bench_common import DEFAULT_ROOT, machine_header, markdown_table

from spp_detect.data.voc import read_split
from spp_detect.models.backbones import conv_layer_index
from spp_detect.models.weights import build_backbone
from spp_detect.ops.spp import PoolGeometry
from spp_detect.runtime.device import resolve_device
from spp_detect.testing import random_boxes
from spp_detect.train import finetune, finetune_conv
from spp_detect.train.sampling import build_window_pool

LEVELS = (6, 3, 2, 1)  # docs/method.md#spatial-pyramid-pooling
OFFSET, TARGET = 6.5, 224.0  # docs/method.md#projection, #scale-selection
WINDOWS_PER_IMAGE = 2000  # proposals per image, as selective search gives


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=str(DEFAULT_ROOT))
    parser.add_argument("--classes", default="raccoon")
    parser.add_argument("--backbone", default="zf5")
    parser.add_argument("--scales", type=int, nargs="+", default=[400, 1200])
    parser.add_argument("--conv-from", nargs="+", default=["conv1", "conv3"])
    parser.add_argument("--iterations", type=int, default=4, help="timed, after one warm-up")
    parser.add_argument("--fc-dim", type=int, default=4096)
    parser.add_argument("--max-long-side", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child process: one setting as JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_measure(args, **json.loads(args.one))))
        return
    rows = []
    for scale in args.scales:
        for layer in args.conv_from:
            setting = json.dumps({"scale": scale, "layer": layer})
            child = [sys.executable, __file__, *sys.argv[1:], "--one", setting]
            result = json.loads(subprocess.run(child, check=True, capture_output=True,
                                               text=True).stdout.splitlines()[-1])  # fmt: skip
            device_gib = f"{result['device_gib']:.2f}" if result["device_gib"] else "–"
            seconds, rss = f"{result['seconds']:.2f}", f"{result['rss_gib']:.2f}"
            rows.append([scale, layer, seconds, rss, device_gib])
    print(machine_header(resolve_device(args.device)))
    headers = ["shorter side", "conv_from", "s / iteration", "peak RSS GiB", "peak GPU GiB"]
    print(markdown_table(headers, rows))


def _measure(args: argparse.Namespace, scale: int, layer: str) -> dict:
    device = resolve_device(args.device)
    records = read_split(Path(args.root), "trainval", tuple(args.classes.split(",")))[:8]
    rng = np.random.default_rng(0)
    proposals = [random_boxes(rng, WINDOWS_PER_IMAGE, r.image_hw, 0.05, 0.9) for r in records]
    pool = build_window_pool(records, proposals, len(args.classes.split(",")), 0.5, 0.1, 0.5,
                             flip=True)  # fmt: skip
    trunk = build_backbone(args.backbone, "none").to(device)
    first = conv_layer_index(trunk, layer)
    finetune_conv.freeze_below(trunk, first)
    geometry = PoolGeometry(trunk.stride, trunk.offset0, OFFSET, LEVELS, TARGET)
    images = finetune_conv.TrainingImages.from_pool(records, pool, geometry)
    sampling = finetune_conv.ImageSampling(2, (scale,), args.max_long_side)
    model = finetune_conv.EndToEnd(trunk, first, images, sampling, device)
    schedule = finetune.SgdSchedule(args.iterations + 1, 128, 0.25, 1e-3, (), 0.9, 5e-4, 0, 10**9,
                                    10**9)  # fmt: skip
    shape = finetune.HeadShape(trunk.channels, LEVELS, args.fc_dim, pool.num_classes, 0.5)
    trainer = finetune.new_trainer(shape, schedule, None, {}, device, trunk=trunk)
    finetune_conv.add_trunk_to_optimizer(trainer.optimizer, trunk, first, 1.0)
    step = finetune_conv.end_to_end_step(trainer, model, schedule)
    step(0)  # warm-up
    _synchronize(device)
    started = time.perf_counter()
    for iteration in range(1, args.iterations + 1):
        step(iteration)
    _synchronize(device)
    seconds = (time.perf_counter() - started) / args.iterations
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    device_gib = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    return {"seconds": seconds, "rss_gib": rss_gib, "device_gib": device_gib}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
