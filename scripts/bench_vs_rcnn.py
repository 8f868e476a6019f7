"""SPP-net against R-CNN on the same backbone, images and proposals: the paper's Tables 9-10 here.

R-CNN (this script only, not in the package): every proposal is cropped from the image, warped
to 224×224 (the trunk's classification input; ``cv2.resize`` bilinear, no context padding),
normalised and run through the conv trunk in batches; its conv5 map (13×13 for zf5 and alexnet,
14×14 for efficientnet_lite0) goes through the classification net's pooling (zf5 and the Lite
trunks: the pyramid (6, 3, 2, 1) over the whole map, 12,800 and 5,600 dims; alexnet:
torchvision's 3×3/2 max-pool + 6×6 average pool, 9,216 dims), then fc6/fc7,
K SVMs, NMS, regression, clip + NMS (the package's ``inference.detect_image``). SPP: the
package's ``TrainedDetector.detect`` on a live ``FeatureSource`` (conv once per scale, pooling of
the distinct windows), timed in parts as in bench_test_time.py, at 1 scale (688) and 5 scales.
Extra rows ``SPP 1 scale, svd`` / ``int8`` run the same models with fc6/fc7 compressed
(``test.fc_compression``; their GFLOP columns count the uncompressed layers).

R-CNN's crop/warp, normalisation, conv and pooling are measured on the first ``--rcnn-windows``
proposals (default 128) of each image and **extrapolated linearly** to all R (default 2,000):
those steps cost the same for every window (same input size), so time ∝ windows. fc6/fc7, SVMs,
NMS and regression are measured on all R rows (the measured windows' pooled rows repeated: the
cost of a dense product does not depend on the values). Columns follow the paper: conv = image
→ conv5 (resize/crop/warp + trunk), fc = pooling + fc6/fc7 + SVM scores, other = projection,
NMS, regression (not in the paper's table); all per image, median over the timed images. With
``--proposal-source ss`` two more: selective search's seconds (as ``spp-detect propose`` runs it
by default) and the total a user waits for, proposals included.

Example (figures in BENCHMARKS.md and docs/benchmarks-history.md):

    python scripts/bench_vs_rcnn.py                       # zf5, 1 + 3 images, 2,000 proposals
    python scripts/bench_vs_rcnn.py --backbone alexnet
    python scripts/bench_vs_rcnn.py --backbone efficientnet_lite0 --weights imagenet \
        --proposal-source ss                              # BENCHMARKS.md's speed table
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from functools import partial

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from _bench_common import (
    SPP,
    TEST,
    Bench,
    BenchImage,
    Stopwatch,
    add_scale_options,
    base_parser,
    build_bench,
    calibrate,
    calibrated_detector,
    compressed,
    conv_gflop,
    describe_images,
    fc_gflop,
    group_parts,
    load_images,
    machine_header,
    markdown_table,
    medians,
    random_head,
    scales_label,
    setup,
    spp_conv_gflop,
    spp_test_image,
    timed_detections,
    timed_runs,
    write_json,
)
from torch import Tensor, nn

from spp_detect.data.image import image_to_tensor
from spp_detect.models.detector import TrainedDetector
from spp_detect.ops.spp import spatial_pyramid_pool

RCNN_INPUT = 224  # warped window side: the classification input of zf5 / torchvision trunks
# The paper's GPU seconds per image (Tables 9-10, docs/method.md#paper-figures-to-compare-with):
# R-CNN on the same ZF-5 net, and SPP.
PAPER = {
    "R-CNN": {"conv": 14.37, "fc": None, "total": 14.46},
    "SPP 1 scale": {"conv": 0.053, "fc": 0.089, "total": 0.142, "speedup": 102},
    "SPP 5 scales": {"conv": 0.293, "fc": 0.089, "total": 0.382, "speedup": 38},
}
EXTRAPOLATED = ("crop + warp", "normalise", "conv (trunk)", "pool")
TORCHVISION_TRUNKS = ("alexnet", "vgg16")  # R-CNN pools these as their classifiers do


# ---------------------------------------------------------------- the R-CNN path


def classifier_pool(bench: Bench) -> Callable[[Tensor], Tensor]:
    """conv5 maps (R, C, h, w) of warped windows → fc6 inputs (R, D_rcnn), as the
    classification net pools them."""
    name, levels = bench.backbone.name, SPP.levels
    if name not in TORCHVISION_TRUNKS:
        # zf5 was trained with this pyramid; a Lite trunk's classifier (global average pooling
        # after more stages) has no fc6 to feed, so R-CNN pools its stage-5 map as SPP does.
        # Adaptive max pooling's bins [⌊j·w/n⌋, ⌈(j+1)·w/n⌉) are the SPP bins
        # (docs/method.md#spatial-pyramid-pooling)
        return lambda maps: torch.cat(
            [F.adaptive_max_pool2d(maps, n).flatten(1) for n in levels], dim=1
        )
    import torchvision

    model = getattr(torchvision.models, name)(weights=None)
    return nn.Sequential(model.features[-1], model.avgpool, nn.Flatten()).to(bench.device).eval()


def check_pyramid(bench: Bench, pool: Callable[[Tensor], Tensor]) -> None:
    """The whole-map pyramid equals ``spatial_pyramid_pool`` of the full window."""
    if bench.backbone.name in TORCHVISION_TRUNKS:
        return
    maps = torch.rand(2, bench.backbone.channels, 13, 13, device=bench.device)
    full = torch.tensor([[0, 0, 12, 12]])
    expected = torch.cat([spatial_pyramid_pool(m, full, SPP.levels) for m in maps])
    assert torch.equal(pool(maps), expected), "whole-map pyramid differs from spp"


def warp_windows(image: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """uint8 (M, size, size, 3): each box's pixels [⌊x1⌋, ⌈x2⌉) × [⌊y1⌋, ⌈y2⌉), resized
    anisotropically (R-CNN's warp, without its 16 px context padding)."""
    out = np.empty((len(boxes), size, size, 3), np.uint8)
    for row, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        left, top = math.floor(x1), math.floor(y1)
        right, bottom = max(left + 1, math.ceil(x2)), max(top + 1, math.ceil(y2))
        crop = image[top:bottom, left:right]
        out[row] = cv2.resize(crop, (size, size), interpolation=cv2.INTER_LINEAR)
    return out


def normalise_batch(warped: np.ndarray, bench: Bench) -> Tensor:
    """uint8 (R, s, s, 3) → float (R, 3, s, s) (s the warp size), normalised as the package does
    one image: the batch goes through ``image_to_tensor`` as one (R·s, s, 3) image (per-channel
    ops only)."""
    count, size = warped.shape[:2]
    flat = image_to_tensor(
        warped.reshape(count * size, size, 3), bench.backbone.normalization, bench.device
    )
    return flat.view(3, count, size, size).transpose(0, 1).contiguous()


def rcnn_windows_pooled(
    bench: Bench, pool, image: np.ndarray, boxes: np.ndarray, batch: int, watch: Stopwatch
) -> Tensor:
    """fc6 inputs (M, D_rcnn) of M windows: crop + warp, normalise, trunk, pooling."""
    pooled = []
    for start in range(0, len(boxes), batch):
        with watch.part("crop + warp"):
            warped = warp_windows(image, boxes[start : start + batch], RCNN_INPUT)
        with watch.part("normalise"):
            pixels = normalise_batch(warped, bench)
        with watch.part("conv (trunk)"):
            maps = bench.backbone(pixels)
        with watch.part("pool"):
            pooled.append(pool(maps))
    return torch.cat(pooled)


def rcnn_test_image(
    spp: Bench, rcnn: TrainedDetector, pool, item: BenchImage, measured: int, batch: int
) -> tuple[dict[str, float], dict[str, int]]:
    """Seconds per part for all R windows (the per-window parts extrapolated from ``measured``)."""
    watch = Stopwatch(spp.device)
    count = len(item.boxes)
    with torch.inference_mode():
        pooled = rcnn_windows_pooled(spp, pool, item.image, item.boxes[:measured], batch, watch)
        factor = count / len(pooled)
        watch.seconds = {k: v * factor for k, v in watch.seconds.items()}
        every = pooled.repeat(math.ceil(factor), 1)[:count]  # R rows for the dense parts
        with watch.part("fc6/fc7"):
            fc7 = torch.cat([rcnn.head.features(p) for p in every.split(TEST.batch_windows)])
        inverse = torch.arange(count, device=spp.device)
        hw = item.record.image_hw
        counts = timed_detections(rcnn, every, fc7, inverse, item.boxes, hw, watch)
    counts.update(windows=count, measured=len(pooled))
    return watch.seconds, counts


def rcnn_detector(spp: Bench, pool, item: BenchImage, args) -> TrainedDetector:
    """R-CNN's head (fc6 of the classifier's input width), SVMs and regressors, calibrated on
    one image's windows like the SPP ones, in a package TrainedDetector."""
    with torch.inference_mode():
        sample = rcnn_windows_pooled(
            spp, pool, item.image, item.boxes[: args.rcnn_batch], args.rcnn_batch,
            Stopwatch(spp.device),
        )  # fmt: skip
    head = random_head(sample.shape[1], args.fc_dim, args.num_classes, spp.device)
    with torch.inference_mode():
        fc7 = head.features(sample)
        k, fraction = args.num_classes, args.pass_fraction
        return calibrated_detector(head, sample, fc7, k, fraction, spp.precision)


# ---------------------------------------------------------------- report


def seconds(value: float) -> str:
    return f"{value:.3f}"


def main_table(rows: dict[str, dict], proposal_s: float | None) -> str:
    """The paper's columns, with selective search's seconds and the total a user waits for
    (proposals + detection) where the proposals were timed."""
    rcnn_total = rows["R-CNN"]["grouped"]["total"]
    rcnn_conv = rows["R-CNN"]["grouped"]["conv"]
    waits = [] if proposal_s is None else ["proposals s", "with proposals s"]
    lines = []
    for label, r in rows.items():
        g = r["grouped"]
        speedup = "-" if label == "R-CNN" else f"**{rcnn_total / g['total']:.1f}×**"
        conv_speedup = "-" if label == "R-CNN" else f"{rcnn_conv / g['conv']:.0f}×"
        waited = []
        if proposal_s is not None:
            waited = [seconds(proposal_s), seconds(proposal_s + g["total"])]
        lines.append([
            label, seconds(g["conv"]), seconds(g["fc"]), seconds(g["other"]),
            seconds(g["total"]), *waited, speedup, conv_speedup, *paper_cells(label),
        ])  # fmt: skip
    return markdown_table(
        ["method", "conv s", "fc s", "other s", "total s", *waits, "speed-up (total)",
         "speed-up (conv)", "paper conv s (GPU)", "paper fc s", "paper total s",
         "paper speed-up", "paper conv speed-up"],
        lines,
    )  # fmt: skip


def median_proposal_seconds(images: list[BenchImage], warmup: int) -> float | None:
    """Selective search's median seconds over the timed images; None when they got random
    boxes (``--proposal-source random``)."""
    timed = [item.proposal_s for item in images[warmup:]]
    return None if None in timed else float(np.median(timed))


def paper_cells(label: str) -> list:
    """The paper's conv, fc and total seconds, speed-up and conv speed-up for ``label``; "-"
    where the paper has no such figure (or row: the compressed settings)."""
    paper = PAPER.get(label)
    if paper is None:
        return ["-"] * 5
    conv_speedup = "-" if label == "R-CNN" else f"{PAPER['R-CNN']['conv'] / paper['conv']:.0f}×"
    return [
        paper["conv"], paper["fc"] if paper["fc"] is not None else "-", paper["total"],
        f"{paper['speedup']}×" if "speedup" in paper else "-", conv_speedup,
    ]  # fmt: skip


def parts_table(rows: dict[str, dict]) -> str:
    names = list(dict.fromkeys(name for r in rows.values() for name in r["parts"]))
    lines = []
    for name in names:
        note = " (extrapolated)" if name in EXTRAPOLATED else ""
        cells = [seconds(r["parts"][name]) if name in r["parts"] else "" for r in rows.values()]
        lines.append([name + note, *cells])
    return markdown_table(["part, s per image", *rows], lines)


def flop_table(rows: dict[str, dict]) -> str:
    lines = []
    for label, r in rows.items():
        g = r["grouped"]
        lines.append([
            label, f"{r['conv_gflop']:.0f}", f"{r['conv_gflop'] / g['conv']:.0f}",
            f"{r['fc_gflop']:.0f}", f"{r['fc_gflop'] / r['parts']['fc6/fc7']:.0f}",
            f"{(r['conv_gflop'] + r['fc_gflop']) / g['total']:.0f}",
        ])  # fmt: skip
    return markdown_table(
        ["method", "conv GFLOP", "conv GFLOP/s", "fc6/fc7 GFLOP", "fc6/fc7 GFLOP/s",
         "GFLOP/s overall"],
        lines,
    )  # fmt: skip


def main() -> None:
    parser = base_parser(__doc__, images=3)
    parser.add_argument("--rcnn-windows", type=int, default=128, help="R-CNN windows measured")
    parser.add_argument("--rcnn-batch", type=int, default=32, help="warped windows per batch")
    parser.add_argument(
        "--compressions", type=lambda text: tuple(filter(None, text.split(","))), default=None,
        help="extra 1-scale rows with test.fc_compression (default: svd,int8 on the CPU, svd "
        "on cuda: int8 is CPU-only); empty for none",
    )  # fmt: skip
    add_scale_options(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    device = setup(args)
    images = load_images(args)
    spp = build_bench(args, device)
    calibrate(spp, images[0], args.multi_scales, args.pass_fraction)
    pool = classifier_pool(spp)
    check_pyramid(spp, pool)
    rcnn = rcnn_detector(spp, pool, images[0], args)

    print(f"## SPP vs R-CNN on the same {args.backbone} trunk (weights {args.weights})\n")
    print(machine_header(device))
    print(describe_images(images, args.warmup))
    print(
        f"- R-CNN: {RCNN_INPUT}×{RCNN_INPUT} warps in batches of {args.rcnn_batch}; crop/warp, "
        f"normalise, conv and pool measured on {args.rcnn_windows} windows per image and "
        f"**extrapolated linearly to {args.proposals}**; fc6 input {rcnn.head.in_dim} (SPP: "
        f"{spp.feature_dim}), fc width {args.fc_dim}, K = {args.num_classes}\n"
    )
    rows: dict[str, dict] = {}
    samples = timed_runs(
        images, args.warmup,
        lambda item: rcnn_test_image(spp, rcnn, pool, item, args.rcnn_windows, args.rcnn_batch),
    )  # fmt: skip
    rows["R-CNN"] = summarise([s[0] for s in samples], [s[1] for s in samples])
    rows["R-CNN"]["conv_gflop"] = args.proposals * conv_gflop(
        spp.backbone.features, (RCNN_INPUT, RCNN_INPUT)
    )
    rows["R-CNN"]["fc_gflop"] = fc_gflop(args.proposals, rcnn.head.in_dim, args.fc_dim)
    if args.compressions is None:
        args.compressions = ("svd", "int8") if device.type == "cpu" else ("svd",)
    settings = [("SPP 1 scale", spp, args.one_scale), ("SPP 5 scales", spp, args.multi_scales)]
    settings += [
        (f"SPP 1 scale, {name}", compressed(spp, name), args.one_scale)
        for name in args.compressions
    ]
    for label, bench, scales in settings:
        rows[label] = spp_row(bench, images, scales, args)
        distinct = rows[label]["counts"]["distinct"]
        print(f"- {label}: {scales_label(scales)}, median {distinct:.0f} distinct windows")
    print()
    proposal_s = median_proposal_seconds(images, args.warmup)
    print(main_table(rows, proposal_s))
    print()
    print(parts_table(rows))
    print()
    print(flop_table(rows))
    write_json(args.json, key_figures(rows, proposal_s))


def key_figures(rows: dict[str, dict], proposal_s: float | None) -> dict:
    """Per method: median seconds per image, in total and per column, the speed-up, and
    selective search's seconds (None when not timed)."""
    rcnn_total = rows["R-CNN"]["grouped"]["total"]
    return {
        label: {
            **{f"{column}_s": r["grouped"][column] for column in ("conv", "fc", "other", "total")},
            "speedup": rcnn_total / r["grouped"]["total"],
            "proposals_s": proposal_s,
        }
        for label, r in rows.items()
    }


def spp_row(bench: Bench, images: list[BenchImage], scales, args) -> dict:
    """Median parts, table columns and counts of SPP's test path at ``scales``, with the conv
    and (uncompressed) fc6/fc7 GFLOP per image."""
    samples = timed_runs(images, args.warmup, partial(spp_test_image, bench, scales=scales))
    row = summarise([s[0] for s in samples], [s[1] for s in samples])
    timed = images[args.warmup :]
    row["conv_gflop"] = float(
        np.median([spp_conv_gflop(bench.backbone, b.record.image_hw, scales) for b in timed])
    )
    row["fc_gflop"] = fc_gflop(int(row["counts"]["distinct"]), bench.feature_dim, args.fc_dim)
    return row


def summarise(parts: list[dict[str, float]], counts: list[dict[str, int]]) -> dict:
    return {
        "parts": medians(parts),
        "grouped": medians([group_rcnn(p) for p in parts]),
        "counts": medians(counts),
    }


def group_rcnn(parts: dict[str, float]) -> dict[str, float]:
    """Table columns of one image: R-CNN's crop/warp/normalise/trunk are conv and its pooling is
    fc (as SPP's); other keys as :func:`group_parts`."""
    if "conv (trunk)" not in parts:
        return group_parts(parts)
    conv = sum(parts.get(k, 0.0) for k in ("crop + warp", "normalise", "conv (trunk)"))
    fc = sum(parts.get(k, 0.0) for k in ("pool", "fc6/fc7", "SVM scores"))
    total = sum(parts.values())
    return {"conv": conv, "fc": fc, "other": total - conv - fc, "total": total}


if __name__ == "__main__":
    main()
