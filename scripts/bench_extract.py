"""Benchmark conv5 extraction and SPP pooling (issue 4 figures).

Measures, for a backbone (default zf5, random weights) on VOC-layout images (default the raccoon
set at ../shared/datasets/raccoon):
  1. seconds per image for the conv pass at 1 scale (688) and at the paper's 5 scales;
  2. the trunk on two same-size images one by one against one batch of 2;
  3. cache bytes per image at 1 and 5 scales (float16 .npz, uncompressed and zlib) and write time;
  4. time to pool N windows (default 2,000) spread over the 5 scales: ``pool_windows`` with
     each engine (block-max, and torchvision's ``roi_pool`` on the exact levels) against the
     slow reference ``spp_detect.testing.reference_pool`` (Python loops), all checked equal;
  5. a test-like loop over cached images (read the maps, pool the windows), with and without
     the next image's maps prefetched in the background (``FeatureSource.prefetch``);
  6. peak resident memory after each phase (ru_maxrss, monotonic).

Steps 1, 2, 4 and 5 run on ``--device`` (default cuda when available), timed with the device
synchronised; the cache files are written and read on the CPU.

Example: python scripts/bench_extract.py --images 10 --windows 2000
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _bench_common import add_scale_options, scale_list, write_json

from spp_detect.data.image import read_image
from spp_detect.models.features import FeatureSource, cache_arrays, compute_maps, prefetching
from spp_detect.models.weights import build_backbone
from spp_detect.ops.spp import PoolGeometry, pool_engine, pool_windows, select_scale, window_cells
from spp_detect.runtime.artifacts import save_npz
from spp_detect.runtime.device import resolve_device
from spp_detect.structures import ImageRecord
from spp_detect.testing import random_boxes, reference_pool

REPO = Path(__file__).resolve().parents[1]

LEVELS = (6, 3, 2, 1)
OFFSET = 6.5  # docs/method.md#projection
MIN_SIDE = 20  # px, of the random proposal-like windows (propose.min_size)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def image_paths(root: Path, count: int) -> list[Path]:
    paths = sorted((root / "JPEGImages").glob("*.jpg"))[:count]
    if not paths:
        raise SystemExit(f"{root}: no JPEGImages/*.jpg")
    return paths


def bench_conv(backbone, images, scales, device) -> tuple[float, list[list[torch.Tensor]]]:
    """Seconds per image for one forward pass per scale; the maps of every image."""
    all_maps = []
    with torch.inference_mode():
        compute_maps(backbone, images[0], scales)  # warm-up (allocator, kernels)
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for image in images:
            maps = compute_maps(backbone, image, scales)
            all_maps.append([m.cpu() for m in maps])  # the extract stage copies them out too
        if device.type == "cuda":
            torch.cuda.synchronize()
    return (time.perf_counter() - started) / len(images), all_maps


def bench_batching(backbone, sides, device, repeats: int) -> list[tuple[int, float, float]]:
    """(side, seconds of two batch-1 passes, seconds of one batch-2 pass) of the trunk on
    side × 4/3·side inputs, best of ``repeats``: whether extraction gains from batching
    images of one size (or an image with its mirror)."""
    rows = []
    with torch.inference_mode():
        for side in sides:
            one = torch.rand(1, 3, side, side * 4 // 3, device=device)
            two = one.repeat(2, 1, 1, 1)
            backbone(two)  # warm-up
            singles, pairs = [], []
            for _ in range(repeats):
                started = _synchronized(device)
                backbone(one), backbone(one)
                singles.append(_synchronized(device) - started)
                started = _synchronized(device)
                backbone(two)
                pairs.append(_synchronized(device) - started)
            rows.append((side, min(singles), min(pairs)))
    return rows


def _synchronized(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def bench_cache(all_maps, scales, image_hws) -> dict[str, float]:
    """Mean bytes and write seconds per image, uncompressed and zlib-compressed."""
    result = {}
    with tempfile.TemporaryDirectory() as folder:
        for compress in (False, True):
            sizes, seconds = [], []
            for index, (maps, hw) in enumerate(zip(all_maps, image_hws, strict=True)):
                arrays = cache_arrays(maps, None, scales, hw, "bench")
                path = Path(folder) / f"{index}_{compress}.npz"
                started = time.perf_counter()
                save_npz(path, compress=compress, **arrays)
                seconds.append(time.perf_counter() - started)
                sizes.append(path.stat().st_size)
            key = "zlib" if compress else "raw"
            result[f"{key}_bytes"] = float(np.mean(sizes))
            result[f"{key}_write_s"] = float(np.mean(seconds))
        started = time.perf_counter()
        for index in range(len(all_maps)):
            with np.load(Path(folder) / f"{index}_False.npz") as data:
                [torch.from_numpy(data[f"fmap_{k}"]).float() for k in range(len(scales))]
        result["raw_read_s"] = (time.perf_counter() - started) / len(all_maps)
    return result


def bench_prefetch(all_maps, scales, records, backbone, windows: int, repeats: int, device) -> dict:
    """Seconds per image of a test-like loop over cached images (read the maps, pool
    ``windows`` random windows), in turn or with ``FeatureSource.prefetch``, with the cache
    files in the page cache ("warm") and evicted from it before each loop ("cold": a VOC cache
    of 43 GB at 5 scales does not fit in memory); best of ``repeats``, the modes alternating."""
    geometry = PoolGeometry(backbone.stride, backbone.offset0, OFFSET, LEVELS, 224.0)
    rng = np.random.default_rng(0)
    boxes = [random_boxes(rng, windows, r.image_hw, min_side=MIN_SIDE) for r in records]
    times: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        paths = [Path(folder) / f"{record.image_id}.npz" for record in records]
        for maps, record, path in zip(all_maps, records, paths, strict=True):
            save_npz(path, **cache_arrays(maps, None, scales, record.image_hw, "bench"))
        for _ in range(repeats):
            for cache, mode in itertools.product(("warm", "cold"), ("in turn", "prefetch")):
                if cache == "cold":
                    evict_from_page_cache(paths)
                source = FeatureSource(
                    scales, geometry, backbone.channels, device,
                    cache_path=lambda image_id: Path(folder) / f"{image_id}.npz",
                )  # fmt: skip
                loop = prefetching(source, records) if mode == "prefetch" else records
                started = _synchronized(device)
                for record, image_boxes in zip(loop, boxes, strict=True):
                    source.pool(record, image_boxes, keep_order=False)
                seconds = (_synchronized(device) - started) / len(records)
                times.setdefault((cache, mode), []).append(seconds)
    return {key: min(values) for key, values in times.items()}


def evict_from_page_cache(paths) -> None:
    for path in paths:
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
            # a sandboxed kernel (gVisor, on some GPU machines) may refuse the advice: "cold"
            # then reads from the page cache too
            with contextlib.suppress(OSError):
                os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def bench_pool(maps, image_hw, scales, stride, offset0, windows, repeats, reference_windows):
    """Seconds to pool ``windows`` random windows from ``maps`` (on the device they are on) with
    each engine of ``spp.pool_windows`` (auto, block-max, roi_pool), from float32 and float16
    maps, and with the slow reference, all checked equal."""
    rng = np.random.default_rng(0)
    boxes = random_boxes(rng, windows, image_hw, min_side=MIN_SIDE)
    index = select_scale(boxes, image_hw, scales)
    geometry = PoolGeometry(stride, offset0, OFFSET, LEVELS, 224.0)
    args = (boxes, image_hw, scales, index, geometry)
    times, pooled = time_pool(maps, args, repeats)
    result = {
        "engine": pool_engine(maps[0], LEVELS),  # what "auto" takes here
        "windows": windows,
        "per_scale": np.bincount(index.numpy(), minlength=len(scales)).tolist(),
        "vectorised_s": min(times),
        "vectorised_median_s": float(np.median(times)),
    }
    for engine in ("blockmax", "roi_pool"):
        engine_times, engine_pooled = time_pool(maps, args, repeats, engine=engine)
        assert torch.equal(engine_pooled, pooled), f"{engine} differs"
        result[f"{engine}_s"] = min(engine_times)
    half_maps = [m.half() for m in maps]  # as read from the float16 cache
    half_times, from_half = time_pool(half_maps, args, repeats, out_dtype=torch.float32)
    assert torch.equal(from_half, pool_windows([m.float() for m in half_maps], *args)[0])
    result["float16_maps_s"] = min(half_times)
    cells = window_cells(boxes, image_hw, scales, index, [m.shape[1:] for m in maps], geometry)
    subset = slice(0, reference_windows)
    started = time.perf_counter()
    expected = np.concatenate([
        reference_pool(maps[k].cpu().numpy(), cells[subset][index[subset] == k].tolist(), LEVELS)
        for k in range(len(scales))
    ])  # fmt: skip
    reference_s = time.perf_counter() - started
    order = torch.cat([torch.nonzero(index[subset] == k).flatten() for k in range(len(scales))])
    assert torch.equal(pooled[subset][order].cpu(), torch.from_numpy(expected)), "reference differs"
    result["reference_windows"] = reference_windows
    result["reference_s"] = reference_s
    result["reference_s_per_2000"] = reference_s * 2000 / reference_windows
    return result


def time_pool(maps, args, repeats, **options) -> tuple[list[float], torch.Tensor]:
    """Seconds of each of ``repeats`` ``pool_windows(maps, *args, **options)`` calls after a
    warm-up, the device synchronised, and the pooled windows."""
    device = maps[0].device
    pooled, _ = pool_windows(maps, *args, **options)
    times = []
    for _ in range(repeats):
        started = _synchronized(device)
        pooled, _ = pool_windows(maps, *args, **options)
        times.append(_synchronized(device) - started)
    return times, pooled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO.parent / "shared/datasets/raccoon")
    parser.add_argument("--backbone", default="zf5")
    parser.add_argument("--weights", default="none")
    parser.add_argument("--images", type=int, default=10, help="images for the conv timing")
    parser.add_argument("--windows", type=int, default=2000)
    parser.add_argument("--reference-windows", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = default")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--batch-sides", type=scale_list, default=(240, 480, 688),
        help="shorter sides of the batch-of-2 comparison, comma-separated (px)",
    )  # fmt: skip
    add_scale_options(parser)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    backbone = build_backbone(args.backbone, args.weights).to(device)
    images = [read_image(p) for p in image_paths(args.root, args.images)]
    hws = [image.shape[:2] for image in images]
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M')}, {platform.node()}, {os.cpu_count()} cores, "
        f"load {os.getloadavg()[0]:.1f}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), device {device}"
    )
    print(f"images: {len(images)} from {args.root}, median size {np.median(hws, axis=0).tolist()}")
    print(f"peak RSS after loading: {peak_rss_mib():.0f} MiB")

    settings = {"1 scale": args.one_scale, "5 scales": args.multi_scales}
    figures = {label: {"scales": list(scales)} for label, scales in settings.items()}
    conv = {}
    for label, scales in settings.items():
        seconds, conv[label] = bench_conv(backbone, images, scales, device)
        figures[label]["conv_s"] = seconds
        print(f"conv pass, {label} {scales}: {seconds:.3f} s/image; RSS {peak_rss_mib():.0f} MiB")

    for side, singles, pair in bench_batching(backbone, args.batch_sides, device, 3):
        print(
            f"conv of two {side}-px images: {singles * 1000:.0f} ms one by one, {pair * 1000:.0f}"
            f" ms as one batch of 2 ({singles / pair:.2f}x)"
        )

    for label, scales in settings.items():
        c = bench_cache(conv[label], scales, hws)
        print(
            f"cache, {label}: {c['raw_bytes'] / 2**20:.2f} MiB/image uncompressed (write "
            f"{c['raw_write_s']:.3f} s, read {c['raw_read_s']:.3f} s); "
            f"{c['zlib_bytes'] / 2**20:.2f} MiB/image zlib (write {c['zlib_write_s']:.3f} s)"
        )

    for label, scales in settings.items():
        reference_windows = min(args.reference_windows, args.windows)
        p = bench_pool(
            [m.to(device) for m in conv[label][0]], hws[0], scales, backbone.stride,
            backbone.offset0, args.windows, args.repeats, reference_windows,
        )  # fmt: skip
        figures[label].update(
            pool_s=p["vectorised_s"], blockmax_s=p["blockmax_s"], roi_pool_s=p["roi_pool_s"]
        )
        print(
            f"pool {p['windows']} windows, {label} {p['per_scale']}: {p['engine']} (auto) "
            f"{p['vectorised_s'] * 1000:.1f} ms (median {p['vectorised_median_s'] * 1000:.1f}), "
            f"from float16 maps {p['float16_maps_s'] * 1000:.1f} ms; engines: block-max "
            f"{p['blockmax_s'] * 1000:.1f} ms, roi_pool {p['roi_pool_s'] * 1000:.1f} ms; "
            f"slow reference {p['reference_s']:.1f} s for {p['reference_windows']} windows; "
            "outputs equal"
        )
    no_boxes = (np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, bool))
    records = [
        ImageRecord(path.stem, path, *image.shape[:2], *no_boxes)
        for path, image in zip(image_paths(args.root, args.images), images, strict=True)
    ]
    for label, scales in settings.items():
        t = bench_prefetch(
            conv[label], scales, records, backbone, args.windows, args.repeats, device
        )
        figures[label]["read_pool_prefetch_s"] = t[("warm", "prefetch")]
        for cache in ("warm", "cold"):
            plain, ahead = t[(cache, "in turn")], t[(cache, "prefetch")]
            print(
                f"read cached maps ({cache} page cache) + pool {args.windows} windows, {label}: "
                f"{plain * 1000:.0f} ms/image in turn, {ahead * 1000:.0f} ms/image with the next "
                f"image's maps prefetched ({plain / ahead:.2f}x)"
            )
    write_json(args.json, figures)
    print(f"peak RSS at the end: {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
