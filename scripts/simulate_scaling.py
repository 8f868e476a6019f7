"""Projected wall time of the VOC 2007 pipeline (ZF-5, 5 scales) under torchrun on 1 to 64 GPUs.

Arithmetic only, nothing runs: each stage's time is its per-image cost
(docs/benchmarks-history.md) over the images a rank gets, plus what does not shrink with more
ranks: the shared file system's bandwidth, gradient all-reduces, and the work rank 0 does alone
(the SVM solves). The constants below name their source; those marked ASSUMED are not measured
anywhere here. Prints two markdown tables (docs/benchmarks-history.md, "Beyond one machine"):
the code as it is, and with the fixes named there (node-local caches, image-sharded fine-tuning
blocks, class-parallel SVM solves):

    python scripts/simulate_scaling.py [--fs-gbps 2] [--gpus 1,8,16,64]
"""

from __future__ import annotations

import argparse
import math

TRAINVAL, TEST = 5011, 4952  # VOC 2007 images
GPUS_PER_NODE = 8
CORES_PER_GPU = 8  # ASSUMED: a 64-core node with 8 GPUs; selective search runs on the cores

# Measured on a 2-core VM, one thread (docs/benchmarks-history.md)
SS_FAST_S = 3.63  # selective search, fast mode, s/image/core ("Proposals")
CACHE_MB = 8.59 * 1.048576  # 5-scale conv5 maps, MB/image ("conv5 extraction")

# Expected per image on one H200, fp32 ("The GPU path", the middle of each range; estimates
# from FLOP counts, not measurements: no GPU was lent to this project's sessions so far)
EXTRACT_GPU_S = 0.009  # image prep 4-10 ms + conv 5 scales 1-3 ms
TEST_GPU_S = 0.021  # 13-30 ms
MINE_GPU_S = 0.0095  # pooling 2-6 ms + fc6/fc7 of 2,000 windows 4-7 ms
BBOX_GPU_S = 0.003  # ASSUMED: pool5 of an image's positive windows only

# Fine-tuning (config defaults): 90,000 iterations of 128 windows, blocks of 327 iterations
# (finetune.block_size at D = 12,800), each block's 41,856 windows spread over the split
ITERATIONS, BLOCK_ITERATIONS, BATCH = 90_000, 327, 128
STEP_GPU_S = 0.0013  # 53 GFLOP forward + backward of fc6/fc7/cls at ~40 TFLOP/s (fp32)
HEAD_PARAMS = 12_800 * 4_096 + 4_096 * 4_096 + 4_096 * 21  # gradients all-reduced per step

# ASSUMED network and file system
FS_GBPS = 2.0  # aggregate bandwidth of the shared file system (one NFS server, 25 GbE)
NVLINK_GBPS = 200.0  # all-reduce bus bandwidth inside a node
IB_GBPS = 25.0  # across nodes (200 Gb/s InfiniBand)
LAUNCH_S = 20.0  # interpreter, imports, rendezvous per command (15-20 s measured here)
LOCAL_GBPS = 3.0  # a node's local NVMe, for the fixes

# SVM solves on rank 0. ASSUMED: 20 classes retrained 10 times each over the pass (every
# 2,000 new hard negatives, svm.retrain_limit). Measured here (--measure-svm): one liblinear
# solve of 500 positives and 20,000 negatives, synthetic 4,096-d fc7-like features of mean
# norm 20, one thread: 8.7 s (5.2 s with 5,000 negatives).
SVM_SOLVES = 20 * 10
SVM_SOLVE_S = 8.7


def distinct_files_per_block(ranks: int) -> float:
    """Cache files all ranks read for one fine-tuning block: each rank pools its columns of
    every minibatch, so it opens every image one of its windows falls in (uniform draw)."""
    per_rank = BLOCK_ITERATIONS * BATCH / ranks
    return ranks * TRAINVAL * (1 - math.exp(-per_rank / TRAINVAL))


def allreduce_s(ranks: int, megabytes: float) -> float:
    """Ring all-reduce: 2 (N - 1) / N of the data over the slowest link."""
    if ranks == 1:
        return 0.0
    link = NVLINK_GBPS if ranks <= GPUS_PER_NODE else IB_GBPS
    return 2 * (ranks - 1) / ranks * megabytes / 1000 / link


def stage_seconds(ranks: int, fs_gbps: float) -> dict[str, float]:
    """Seconds of each stage on ``ranks`` GPUs as the code is (propose, extract: both
    splits). Every conv5 byte crosses the shared file system."""
    images = TRAINVAL + TEST
    fs = fs_gbps * 1000  # MB/s
    trainval_cache = TRAINVAL * CACHE_MB
    blocks = math.ceil(ITERATIONS / BLOCK_ITERATIONS)
    grads_mb = HEAD_PARAMS * 4 / 1e6
    return {
        "propose": images * SS_FAST_S / (ranks * CORES_PER_GPU),
        # computing overlaps writing (write-behind thread); the shared disk takes every byte
        "extract": max(images * EXTRACT_GPU_S / ranks, images * CACHE_MB / fs),
        "finetune": ITERATIONS * (STEP_GPU_S / ranks + allreduce_s(ranks, grads_mb))
        + blocks * distinct_files_per_block(ranks) * CACHE_MB / fs,
        "train-svm": max(TRAINVAL * MINE_GPU_S / ranks, trainval_cache / fs)
        + SVM_SOLVES * SVM_SOLVE_S,
        "train-bbox": max(TRAINVAL * BBOX_GPU_S, trainval_cache / fs),  # rank 0 alone
        "test": max(TEST * TEST_GPU_S / ranks, TEST * CACHE_MB / fs),
    }


def fixed_stage_seconds(ranks: int) -> dict[str, float]:
    """The same with the fixes: each node keeps the conv5 maps of its own images on its local
    disk and the stages send each image to the node that holds it; a fine-tuning block is
    pooled image-sharded (each file read once) and its pooled rows exchanged (all-to-all),
    with data-parallel SGD inside one node only; the 20 classes' SVMs mined and solved on 20
    ranks at once (classes are independent)."""
    images = TRAINVAL + TEST
    nodes = math.ceil(ranks / GPUS_PER_NODE)
    local = nodes * LOCAL_GBPS * 1000  # MB/s, all nodes together
    trainval_cache = TRAINVAL * CACHE_MB
    blocks = math.ceil(ITERATIONS / BLOCK_ITERATIONS)
    sgd_ranks = min(ranks, GPUS_PER_NODE)
    block_rows_mb = BLOCK_ITERATIONS * BATCH * 12_800 * 2 / 1e6  # float16 pooled rows
    exchange = 0.0 if ranks == 1 else block_rows_mb / 1000 / (IB_GBPS if nodes > 1 else 200)
    return {
        "propose": images * SS_FAST_S / (ranks * CORES_PER_GPU),
        "extract": max(images * EXTRACT_GPU_S / ranks, images * CACHE_MB / local),
        "finetune": ITERATIONS
        * (STEP_GPU_S / sgd_ranks + allreduce_s(sgd_ranks, HEAD_PARAMS * 4 / 1e6))
        + blocks * (trainval_cache / local + exchange),
        "train-svm": max(TRAINVAL * MINE_GPU_S / ranks, trainval_cache / local)
        + SVM_SOLVES * SVM_SOLVE_S / min(ranks, 20),
        "train-bbox": max(TRAINVAL * BBOX_GPU_S / ranks, trainval_cache / local),
        "test": max(TEST * TEST_GPU_S / ranks, TEST * CACHE_MB / local),
    }


def measure_svm_solve(positives: int = 500, negatives: tuple[int, ...] = (5000, 20000)) -> None:
    """Time ``svm.train_linear_svm`` (the config's defaults) on synthetic fc7-like features:
    ReLU of Gaussians, 200 dimensions shifted for the positives, scaled to mean norm 20."""
    import time

    import numpy as np

    from spp_detect.train.svm import SvmParams, train_linear_svm

    rng = np.random.default_rng(0)
    dim = 4096
    shift = np.zeros(dim, np.float32)
    shift[:200] = 0.5

    def features(count: int, offset: np.ndarray | float) -> np.ndarray:
        x = np.maximum(rng.standard_normal((count, dim), dtype=np.float32) + offset, 0)
        return x * (20.0 / np.linalg.norm(x, axis=1, keepdims=True).mean())

    params = SvmParams(C=1e-3, pos_weight=2.0, intercept_scaling=10.0, tol=0.1,
                       hard_thresh=-1.0001, evict_thresh=-1.2, retrain_limit=2000)  # fmt: skip
    for count in negatives:
        pos, neg = features(positives, shift), features(count, 0.0)
        started = time.perf_counter()
        train_linear_svm(pos, neg, params)
        print(f"SVM solve, {positives} + {count} examples: {time.perf_counter() - started:.1f} s")


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def print_table(title: str, table: dict[int, dict[str, float]]) -> None:
    counts = list(table)
    print(f"{title}\n")
    print("| stage | " + " | ".join(f"{n} GPU{'s' if n > 1 else ''}" for n in counts) + " |")
    print("| --- |" + " --: |" * len(counts))
    for stage in table[counts[0]]:
        print(f"| {stage} | " + " | ".join(hours(table[n][stage]) for n in counts) + " |")
    totals = {n: sum(table[n].values()) + LAUNCH_S * len(table[n]) for n in counts}
    print("| **total** (+ 20 s launch per stage) | "
          + " | ".join(f"**{hours(totals[n])}**" for n in counts) + " |")  # fmt: skip
    speed_ups = " | ".join(f"{totals[counts[0]] / totals[n]:.1f}×" for n in counts)
    print(f"| speed-up over 1 GPU | {speed_ups} |\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fs-gbps", type=float, default=FS_GBPS)
    parser.add_argument("--gpus", default="1,8,16,64")
    parser.add_argument("--measure-svm", action="store_true", help="time one SVM solve first")
    args = parser.parse_args()
    if args.measure_svm:
        measure_svm_solve()
    counts = [int(n) for n in args.gpus.split(",")]
    as_built = {n: stage_seconds(n, args.fs_gbps) for n in counts}
    print_table(f"As built, shared file system at {args.fs_gbps:g} GB/s:", as_built)
    print_table("With the fixes:", {n: fixed_stage_seconds(n) for n in counts})


if __name__ == "__main__":
    main()
