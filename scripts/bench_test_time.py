"""Per-image SPP test time, broken into parts, at 1 scale (688) and the paper's 5 scales.

The path is the test stage's: the package's ``Detector.detect`` on a live ``FeatureSource``
(conv5 maps computed on the fly), its parts timed as the package runs them: image read, resize
and normalise, all scales ("prep"), the conv trunk per scale ("conv"); in
``Detector.window_features`` scale choice, projection and dedup of the R windows,
``FeatureSource.pool`` of the U distinct windows and fc6/fc7; SVM scores of K classes; in
``inference.detect_image`` box regression of the kept windows and the rest (threshold,
per-class NMS, top-k, clip, NMS). Models have random weights of the paper's sizes (fc width
4,096, K = 20 SVMs and regressors; SVMs calibrated so that 10% of the windows pass the -1.5
threshold per class).
Each part is the median over the timed images, after warm-up. In the same run: a plain
``torch.mm`` of fc6's and fc7's shapes (the matrix-multiply reference) and ``Detector.detect``
end to end, untouched (its total should match the sum of the parts).

Example (figures in BENCHMARKS.md and docs/benchmarks-history.md):

    python scripts/bench_test_time.py                 # zf5, 1 + 5 warm-up/timed images
    python scripts/bench_test_time.py --backbone alexnet
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from _bench_common import (
    PREP,
    TEST,
    Bench,
    BenchImage,
    Stopwatch,
    add_scale_options,
    base_parser,
    build_bench,
    calibrate,
    describe_images,
    fc_gflop,
    group_parts,
    load_images,
    machine_header,
    markdown_table,
    medians,
    ms,
    percent,
    scales_label,
    setup,
    spp_conv_gflop,
    spp_test_image,
    timed_runs,
    write_json,
)

from spp_detect.models.features import FeatureSource
from spp_detect.runtime.device import AUTOCAST_DTYPES

POOLING_TARGET = 0.05  # issue 8: pooling at most 5% of the per-image test time (CPU)
FC_TARGET = 0.5  # issue 8: fc stage at least 50% of torch's matmul throughput


def matmul_reference(bench: Bench, rows: int) -> dict[str, float]:
    """Seconds of plain ``torch.mm`` with fc6's (rows×D @ D×F) and fc7's (rows×F @ F×F) shapes."""
    dim, fc_dim = bench.feature_dim, bench.detector.head.fc6.out_features
    device = bench.device
    x6, w6 = torch.rand(rows, dim, device=device), torch.randn(dim, fc_dim, device=device)
    x7, w7 = torch.rand(rows, fc_dim, device=device), torch.randn(fc_dim, fc_dim, device=device)
    watch = Stopwatch(device)
    with torch.inference_mode():
        with watch.part("mm fc6"):
            torch.mm(x6, w6)
        with watch.part("mm fc7"):
            torch.mm(x7, w7)
    return watch.seconds


def measure(bench: Bench, item: BenchImage, scales, source: FeatureSource | None) -> dict:
    parts, counts = spp_test_image(bench, item, scales)
    reference = matmul_reference(bench, counts["distinct"])
    result = {"parts": parts, "counts": counts, "mm": reference}
    if source is not None:
        watch = Stopwatch(bench.device)
        with watch.part("Detector.detect"):
            bench.detector.detect(source, item.record, item.boxes)
        result["package"] = watch.seconds
    return result


def run_setting(bench: Bench, images, scales, args) -> dict:
    source = bench.source(scales) if args.package_check else None
    samples = timed_runs(images, args.warmup, lambda item: measure(bench, item, scales, source))
    totals = [group_parts(s["parts"]) for s in samples]
    fc_rates, mm_rates = [], []
    for s in samples:
        gflop = fc_gflop(s["counts"]["distinct"], bench.feature_dim, args.fc_dim)
        fc_rates.append(gflop / s["parts"]["fc6/fc7"])
        mm_rates.append(gflop / (s["mm"]["mm fc6"] + s["mm"]["mm fc7"]))
    conv_gflop = [spp_conv_gflop(bench.backbone, item.record.image_hw, scales) for item in images]
    return {
        "scales": scales,
        "parts": medians([s["parts"] for s in samples]),
        "grouped": medians(totals),
        "counts": medians([s["counts"] for s in samples]),
        "mm": medians([s["mm"] for s in samples]),
        "package": medians([s["package"] for s in samples]) if args.package_check else {},
        "fc_gflops": float(np.median(fc_rates)),
        "mm_gflops": float(np.median(mm_rates)),
        "fc_ratio": float(np.median(np.array(fc_rates) / np.array(mm_rates))),
        "conv_gflop": float(np.median(conv_gflop[args.warmup :])),
    }


def parts_table(results: list[dict]) -> str:
    names = list(dict.fromkeys(name for r in results for name in r["parts"]))
    conv = sorted((n for n in names if n.startswith("conv ")), key=lambda n: int(n.split()[1]))
    rows = [["image read + prep (decode, resize, normalise), all scales", *_cells(results, [PREP])]]
    rows += [[f"{name} (trunk)", *_cells(results, [name])] for name in conv]
    rows += [[name, *_cells(results, [name])] for name in names if name not in (PREP, *conv)]
    rows.append(["**total** (median of per-image sums)"] + [
        cell for r in results for cell in (f"**{ms(r['grouped']['total'])}**", "100%")
    ])  # fmt: skip
    if results[0]["package"]:
        rows.append(["package `Detector.detect`, end to end (check)"] + [
            cell
            for r in results
            for cell in (ms(r["package"]["Detector.detect"]), "")
        ])  # fmt: skip
    headers = ["part"] + [h for r in results for h in (f"{scales_label(r['scales'])} ms", "share")]
    return markdown_table(headers, rows)


def _cells(results: list[dict], names: list[str]) -> list[str]:
    cells = []
    for r in results:
        if not any(name in r["parts"] for name in names):
            cells += ["", ""]
            continue
        seconds = sum(r["parts"].get(name, 0.0) for name in names)
        cells += [ms(seconds), percent(seconds, r["grouped"]["total"])]
    return cells


def summary_tables(results: list[dict], fc_dim: int) -> str:
    counts = markdown_table(
        ["setting", "windows R", "distinct U", "scores > -1.5", "kept after NMS/top-k",
         "detections"],
        [[scales_label(r["scales"]), *(f"{r['counts'][k]:.0f}" for k in
          ("windows", "distinct", "passing", "kept", "detections"))] for r in results],
    )  # fmt: skip
    rows = []
    for r in results:
        grouped, parts = r["grouped"], r["parts"]
        conv = grouped["conv"]
        rows.append([
            scales_label(r["scales"]), ms(conv), f"{r['conv_gflop']:.0f}",
            f"{r['conv_gflop'] / conv:.0f}", ms(parts["fc6/fc7"]), f"{r['fc_gflops']:.0f}",
            ms(r["mm"]["mm fc6"]), ms(r["mm"]["mm fc7"]), f"{r['mm_gflops']:.0f}",
            f"{100 * r['fc_ratio']:.0f}%",
        ])  # fmt: skip
    throughput = markdown_table(
        ["setting", "conv ms", "conv GFLOP", "conv GFLOP/s", "fc6/fc7 ms", "fc GFLOP/s",
         f"mm fc6 (U×D @ D×{fc_dim}) ms", f"mm fc7 (U×{fc_dim} @ {fc_dim}×{fc_dim}) ms",
         "mm GFLOP/s", "fc / mm throughput"],
        rows,
    )  # fmt: skip
    targets = []
    for r in results:
        pool_share = r["parts"]["pooling"] / r["grouped"]["total"]
        targets.append([
            scales_label(r["scales"]),
            f"{100 * pool_share:.1f}% ({'met' if pool_share <= POOLING_TARGET else 'NOT met'})",
            f"{100 * r['fc_ratio']:.0f}% ({'met' if r['fc_ratio'] >= FC_TARGET else 'NOT met'})",
        ])  # fmt: skip
    target_table = markdown_table(
        ["setting", f"pooling share (target ≤ {POOLING_TARGET:.0%})",
         f"fc / matmul throughput (target ≥ {FC_TARGET:.0%})"],
        targets,
    )  # fmt: skip
    return "\n\n".join([counts, throughput, target_table])


def main() -> None:
    parser = base_parser(__doc__, images=5)
    parser.add_argument(
        "--no-package-check", dest="package_check", action="store_false",
        help="skip timing the package's Detector.detect end to end",
    )  # fmt: skip
    parser.add_argument(
        "--precision", default="fp32", choices=tuple(AUTOCAST_DTYPES),
        help="autocast dtype of the conv trunk and fc6/fc7 (extract/test.precision)",
    )  # fmt: skip
    add_scale_options(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # random weights warn once per build
    device = setup(args)
    images = load_images(args)
    bench = build_bench(args, device, args.precision)
    calibrate(bench, images[0], args.multi_scales, args.pass_fraction)
    print(f"## Per-image SPP test time, {args.backbone} (weights {args.weights})\n")
    print(machine_header(device))
    print(describe_images(images, args.warmup))
    print(
        f"- models: pooled dim D = {bench.feature_dim}, fc width F = {args.fc_dim}, "
        f"K = {args.num_classes} SVMs and regressors; test settings {TEST}; "
        f"precision {args.precision}\n"
    )
    settings = (args.one_scale, args.multi_scales)
    results = [run_setting(bench, images, scales, args) for scales in settings]
    print(parts_table(results))
    print()
    print(summary_tables(results, args.fc_dim))
    write_json(args.json, key_figures(results, args.precision))


def key_figures(results: list[dict], precision: str) -> dict:
    """Per setting: median ms per image, in total and per part group (the device synchronised
    around each part), ``detect_ms`` of the package's ``Detector.detect`` end to end (maps
    computed on the fly, synchronised only around the call: the per-image time a user sees),
    and U."""
    return {
        "precision": precision,
        "settings": [
            {
                "scales": list(r["scales"]),
                "total_ms": 1000 * r["grouped"]["total"],
                "conv_ms": 1000 * r["grouped"]["conv"],
                "fc_ms": 1000 * r["grouped"]["fc"],
                "other_ms": 1000 * r["grouped"]["other"],
                "pooling_ms": 1000 * r["parts"]["pooling"],
                "fc6_fc7_ms": 1000 * r["parts"]["fc6/fc7"],
                "distinct": r["counts"]["distinct"],
                "detect_ms": 1000 * r["package"]["Detector.detect"] if r["package"] else None,
            }
            for r in results
        ],
    }


if __name__ == "__main__":
    main()
