"""Benchmark `spp-detect propose`: seconds per image and recall per method, and worker speed-up.

Runs the real stage (worker processes, files, report) into fresh temporary run directories and
prints markdown tables. Example (the figures in the README / notes):

    python scripts/bench_proposals.py --root ../shared/datasets/raccoon --split test \
        --quality-limit 10
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

from spp_detect.config import load_config
from spp_detect.runtime.artifacts import load_json
from spp_detect.runtime.run_dir import RunDir
from spp_detect.stages.context import StageContext
from spp_detect.stages.propose import run_propose

TOP_N = ("100", "500", "1000", "2000", "all")
# (label, --set overrides) of each method measured
METHODS = {
    "fast": ("propose.method=selective_search", "propose.mode=fast"),
    "quality": ("propose.method=selective_search", "propose.mode=quality"),
    "edge_boxes": ("propose.method=edge_boxes",),
}


def run_once(args: argparse.Namespace, method: str, workers: int, limit: int | None) -> dict:
    """One fresh stage run; returns its report plus the wall-clock time."""
    overrides = [f"data.root={args.root}", f"data.classes={args.classes}", *METHODS[method]]
    load = os.getloadavg()[0]
    config = load_config(None, overrides)
    with tempfile.TemporaryDirectory(prefix="bench_proposals_") as tmp:
        ctx = StageContext(config, RunDir(Path(tmp)), "cpu", workers, limit, False)
        started = time.perf_counter()
        run_propose(ctx, args.split)
        wall = time.perf_counter() - started
        report = load_json(ctx.run_dir.proposals_dir(args.split) / "report.json")
    report.update(method=method, workers=workers, wall_seconds=wall, load_before=load)
    return report


def summary_table(reports: list[dict]) -> str:
    lines = [
        "| method | images | workers | boxes/image | s/image (one process) | wall s/image "
        "| recall@0.5 | recall@0.7 | AR 0.5:0.95 | load avg before |",
        "| --- | --: | --: | --: | --: | --: | --: | --: | --: | --: |",
    ]
    for r in reports:
        every = r["recall"]["all"]
        lines.append(
            f"| {r['method']} | {r['num_images']} | {r['workers']} | "
            f"{r['mean_boxes_per_image']:.0f} | {r['seconds_per_image']:.2f} | "
            f"{r['wall_seconds'] / r['num_images']:.2f} | {every['recall_0.5']:.3f} | "
            f"{every['recall_0.7']:.3f} | {every['average_recall']:.3f} | {r['load_before']:.2f} |"
        )
    return "\n".join(lines)


def top_n_table(reports: list[dict]) -> str:
    lines = [
        "| method | " + " | ".join(f"top {n}" for n in TOP_N) + " |",
        "| --- |" + " --: |" * len(TOP_N),
    ]
    for r in reports:
        cells = []
        for n in TOP_N:
            e = r["recall"][n]
            cells.append(
                f"{e['recall_0.5']:.3f} / {e['recall_0.7']:.3f} / {e['average_recall']:.3f}"
            )
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def speedup_table(pairs: list[tuple[dict, dict]]) -> str:
    lines = [
        "| method | images | wall s, 1 worker | wall s, 2 workers | speed-up "
        "| load avg before (1 / 2) |",
        "| --- | --: | --: | --: | --: | --: |",
    ]
    for one, two in pairs:
        lines.append(
            f"| {one['method']} | {one['num_images']} | {one['wall_seconds']:.1f} | "
            f"{two['wall_seconds']:.1f} | {one['wall_seconds'] / two['wall_seconds']:.2f}× | "
            f"{one['load_before']:.2f} / {two['load_before']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    repo = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(repo.parent / "shared/datasets/raccoon"))
    parser.add_argument("--classes", default="[raccoon]", help="data.classes (YAML list)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=None, help="images for fast and edge_boxes")
    parser.add_argument("--quality-limit", type=int, default=10, help="images for quality mode")
    parser.add_argument("--workers", type=int, default=2, help="workers of the recall runs")
    parser.add_argument("--methods", default="fast,quality,edge_boxes")
    parser.add_argument(
        "--speedup", default="fast,edge_boxes", help="methods also run with 1 worker (speed-up)"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="extra alternating 1-/2-worker pairs (shared CPUs)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    import torchvision.ops  # noqa: F401  (the report's import, paid once outside the timings)

    reports, pairs = [], []
    for method in args.methods.split(","):
        limit = args.quality_limit if method == "quality" else args.limit
        report = run_once(args, method, args.workers, limit)
        reports.append(report)
        if method in args.speedup.split(",") and args.workers == 2:
            pairs.append((run_once(args, method, 1, limit), report))
            for _ in range(args.repeats - 1):
                one = run_once(args, method, 1, limit)
                pairs.append((one, run_once(args, method, 2, limit)))
    print(f"\nSplit {args.split} of {args.root}; {os.cpu_count()} cores\n")
    print(summary_table(reports))
    print("\nRecall@0.5 / recall@0.7 / AR at the top N boxes (rank order of each method):\n")
    print(top_n_table(reports))
    if pairs:
        print("\nWorker speed-up on the same images:\n")
        print(speedup_table(pairs))


if __name__ == "__main__":
    main()
