"""How the SPP test time scales: with the number of proposals, with the number of scales, and
proposal throughput with the number of worker processes.

1. Test time per image against R ∈ {250, 500, 1000, 2000, 4000} proposals (the first R of one
   random list per image), at 1 scale (688) and 5 scales, with a least-squares line per part
   (slope in ms per 1,000 windows, intercept, R²).
2. Test time per image against the number of scales S = 1 … 5 (subsets of the paper's
   (480, 576, 688, 864, 1200), growing around 688) at R = 2,000, with lines of the total against
   S and of the conv time against the input pixels (Σ over scales of H_k·W_k).
   Each scale setting has its own ``FeatureSource``; its conv time is that source computing the
   image's maps (read, resize, trunk) once; the window parts then run on the kept maps.
3. Selective search (fast) images per second with 1 and 2 worker processes, through the propose
   stage's own worker pool and job (``workers.run_jobs`` of ``stages.propose.compute_proposals``:
   spawned processes, one .npz per image, written into a temporary folder); wall time includes
   starting the pool.

Models and parts as in bench_test_time.py (the package's ``Detector``, random weights of the
paper's sizes). Example (docs/benchmarks-history.md):

    python scripts/bench_scaling.py          # 1 warm-up + 3 images; 8 images for proposals
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _bench_common import (
    ONE_SCALE,
    Bench,
    BenchImage,
    Stopwatch,
    base_parser,
    build_bench,
    calibrate,
    describe_images,
    group_parts,
    load_images,
    machine_header,
    markdown_table,
    medians,
    ms,
    scales_label,
    setup,
    spp_test_image,
    timed_detections,
    timed_maps,
    timed_window_features,
)

from spp_detect.config import PAPER_SCALES
from spp_detect.data.image import resized_hw
from spp_detect.data.voc import read_split
from spp_detect.models.features import FeatureSource
from spp_detect.runtime.workers import run_jobs
from spp_detect.stages.propose import ProposalJob, compute_proposals

PROPOSAL_COUNTS = (250, 500, 1000, 2000, 4000)
# Scale subsets for S = 1 … 5: the 1-scale setting (688) and its neighbours added in turn.
SCALE_SUBSETS = (
    (688,),
    (576, 688),
    (576, 688, 864),
    (480, 576, 688, 864),
    PAPER_SCALES,
)
WORKERS = (1, 2)
SWEEP_PARTS = ("conv", "pooling", "fc6/fc7", "other", "total")


def line_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least-squares y ≈ slope·x + intercept; returns (slope, intercept, R²)."""
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (slope * x + intercept)
    spread = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((residual**2).sum()) / spread if spread > 0 else 1.0
    return float(slope), float(intercept), r2


# ---------------------------------------------------------------- measurements


def window_parts(bench: Bench, source: FeatureSource, item: BenchImage, count: int) -> dict:
    """Seconds of the window parts (projection … clip + NMS) for the first ``count`` proposals
    on the maps ``source`` keeps for the image."""
    watch = Stopwatch(bench.device)
    boxes, record = item.boxes[:count], item.record
    with torch.inference_mode():
        pooled, fc7, inverse = timed_window_features(bench.detector, source, record, boxes, watch)
        timed_detections(bench.detector, pooled, fc7, inverse, boxes, record.image_hw, watch)
    return watch.seconds


def sweep_image(bench: Bench, sources: dict, item: BenchImage, counts, subsets, sweep_count):
    """All measurements of one image: {("R", scales, R) or ("S", scales): grouped seconds};
    ``sources`` one FeatureSource per scale setting."""
    conv = {}
    for scales, source in sources.items():
        watch = Stopwatch(bench.device)
        with torch.inference_mode():
            timed_maps(bench, source, item.record, watch)
        conv[scales] = sum(watch.seconds.values())
    results = {}

    def measure(scales, count):
        parts = window_parts(bench, sources[scales], item, count)
        grouped = group_parts(parts)
        grouped["conv"] = conv[scales]
        grouped["pooling"], grouped["fc6/fc7"] = parts["pooling"], parts["fc6/fc7"]
        grouped["other"] = grouped["total"] - parts["pooling"] - parts["fc6/fc7"]
        grouped["total"] += grouped["conv"]
        return grouped

    for scales in (ONE_SCALE, PAPER_SCALES):
        for count in counts:
            results[("R", scales, count)] = measure(scales, count)
    for scales in subsets:
        results[("S", scales)] = measure(scales, sweep_count)
    return results


def proposal_throughput(args, workers: int, images: int) -> dict[str, float]:
    """Wall seconds and images/s of selective search (fast) over ``images`` images."""
    records = read_split(args.root, args.split, tuple(args.classes.split(",")))[:images]
    params = {"method": "selective_search", "mode": "fast"}
    with tempfile.TemporaryDirectory(prefix="bench_scaling_") as folder:
        jobs = [
            ProposalJob(r.image_id, str(r.path), str(Path(folder) / f"{r.image_id}.npz"), params)
            for r in records
        ]
        started = time.perf_counter()
        failures = run_jobs(jobs, workers, compute_proposals, desc=f"{workers} workers")
        wall = time.perf_counter() - started
        inside = []
        for job in jobs:
            with np.load(job.out_path, allow_pickle=False) as data:
                inside.append(float(data["seconds"]))
    if failures:
        raise SystemExit(f"proposals failed: {failures}")
    return {"wall": wall, "images": len(jobs), "inside": float(np.mean(inside))}


# ---------------------------------------------------------------- report


def fit_rows(label: str, x: np.ndarray, series: dict[str, np.ndarray], unit: float) -> list[list]:
    """One row per part: slope (ms per ``unit`` of x), intercept (ms), R²."""
    rows = []
    for part, y in series.items():
        slope, intercept, r2 = line_fit(x, y)
        rows.append([label, part, f"{slope * unit * 1000:.1f}", ms(intercept), f"{r2:.3f}"])
    return rows


def proposals_report(summary: dict, counts) -> str:
    tables, fits = [], []
    for scales in (ONE_SCALE, PAPER_SCALES):
        rows = [
            [count, *(ms(summary[("R", scales, count)][p]) for p in SWEEP_PARTS)]
            for count in counts
        ]
        tables.append(f"{scales_label(scales)}, ms per image:\n\n" + markdown_table(
            ["proposals R", *SWEEP_PARTS], rows
        ))  # fmt: skip
        x = np.array(counts, dtype=float)
        series = {p: np.array([summary[("R", scales, c)][p] for c in counts]) for p in SWEEP_PARTS}
        fits += fit_rows(scales_label(scales), x, series, 1000.0)
    fit_table = markdown_table(
        ["setting", "part", "slope, ms per 1,000 proposals", "intercept ms", "R²"], fits
    )
    return "\n\n".join([*tables, "Line fits against R:\n\n" + fit_table])


def scales_report(summary: dict, subsets, image_hws, sweep_count: int) -> str:
    rows, pixels = [], []
    for scales in subsets:
        g = summary[("S", scales)]
        megapixels = np.median([
            sum(np.prod(resized_hw(hw, s)) for s in scales) / 1e6 for hw in image_hws
        ])  # fmt: skip
        pixels.append(megapixels)
        rows.append([
            len(scales), str(scales), f"{megapixels:.2f}", *(ms(g[p]) for p in SWEEP_PARTS)
        ])  # fmt: skip
    table = markdown_table(["S", "scales", "input Mpx", *SWEEP_PARTS], rows)
    count = np.array([len(s) for s in subsets], dtype=float)
    total = np.array([summary[("S", s)]["total"] for s in subsets])
    conv = np.array([summary[("S", s)]["conv"] for s in subsets])
    fits = fit_rows("against S (ms per scale)", count, {"total": total, "conv": conv}, 1.0)
    fits += fit_rows("against input Mpx (ms per Mpx)", np.array(pixels), {"conv": conv}, 1.0)
    fit_table = markdown_table(["x", "part", "slope", "intercept ms", "R²"], fits)
    return f"R = {sweep_count} proposals, ms per image:\n\n{table}\n\nLine fits:\n\n{fit_table}"


def workers_report(results: dict[int, dict]) -> str:
    base = results[WORKERS[0]]["images"] / results[WORKERS[0]]["wall"]
    rows = []
    for workers, r in results.items():
        rate = r["images"] / r["wall"]
        rows.append([
            workers, r["images"], f"{r['wall']:.1f}", f"{rate:.2f}", f"{rate / base:.2f}×",
            f"{r['inside']:.2f}",
        ])  # fmt: skip
    return markdown_table(
        ["workers", "images", "wall s (pool start-up included)", "images/s", "speed-up",
         "s/image inside a worker"],
        rows,
    )  # fmt: skip


def main() -> None:
    parser = base_parser(__doc__, images=3)
    parser.add_argument(
        "--counts", default=",".join(map(str, PROPOSAL_COUNTS)), help="proposal counts swept"
    )
    parser.add_argument("--propose-images", type=int, default=8, help="images for throughput")
    parser.add_argument("--skip-propose", action="store_true", help="skip the worker benchmark")
    parser.set_defaults(proposals=2000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    counts = [int(c) for c in args.counts.split(",")]
    sweep_count = args.proposals
    args.proposals = max([*counts, sweep_count])  # one list per image; sweeps take prefixes
    device = setup(args)
    images = load_images(args)
    bench = build_bench(args, device)
    calibrate(bench, images[0], PAPER_SCALES, args.pass_fraction)
    print("## Scaling of the SPP test time and of proposal throughput\n")
    print(machine_header(device))
    print(describe_images(images, args.warmup))
    print(
        f"- backbone {args.backbone} (weights {args.weights}), random head F = {args.fc_dim}, "
        f"K = {args.num_classes}; warm-up: one full 5-scale test per warm-up image\n"
    )
    for item in images[: args.warmup]:
        spp_test_image(bench, item, PAPER_SCALES)
    timed = images[args.warmup :]
    settings = dict.fromkeys((ONE_SCALE, PAPER_SCALES, *SCALE_SUBSETS))
    sources = {scales: bench.source(scales) for scales in settings}
    samples = [
        sweep_image(bench, sources, item, counts, SCALE_SUBSETS, sweep_count) for item in timed
    ]
    summary = {key: medians([s[key] for s in samples]) for key in samples[0]}
    print("### Test time against the number of proposals\n")
    print(proposals_report(summary, counts))
    print("\n### Test time against the number of scales\n")
    print(scales_report(summary, SCALE_SUBSETS, [b.record.image_hw for b in timed], sweep_count))
    if not args.skip_propose:
        print("\n### Selective search (fast) throughput against worker processes\n")
        results = {w: proposal_throughput(args, w, args.propose_images) for w in WORKERS}
        print(workers_report(results))


if __name__ == "__main__":
    main()
