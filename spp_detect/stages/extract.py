"""`spp-detect extract`: conv5 maps of every image at every scale, cached as float16 .npz.

Steps: 1. check the settings and build the backbone; 2. log the projected cache size and stop
when what is left to write does not fit the free space (unless --force); 3. per
image, skip a file already made with the same settings (unless --force), else one forward pass
per scale (plus the mirrored image on training splits with ``extract.flip``) and an atomic write;
an image that runs out of GPU memory is redone on the CPU; 4. the manifest, last.
Cache layout: ``spp_detect.features`` (module docstring) and docs/contracts.md#artefacts.
"""

from __future__ import annotations

import copy
import functools
import logging
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from spp_detect.artifacts import check_free_space, clear_manifest, free_bytes, save_npz
from spp_detect.backbones import Backbone
from spp_detect.config import ExtractConfig
from spp_detect.features import (
    cache_arrays,
    check_scales_fit,
    compute_maps,
    read_record_image,
    resolve_device,
)
from spp_detect.image import flip_image, resized_hw
from spp_detect.stages.common import (
    StageContext,
    build_trunk,
    close_stage,
    format_bytes,
    items_to_do,
    locked,
    maps_origin,
    split_records,
    split_todo,
    trunk_digest,
    wait_for_shares,
)
from spp_detect.structures import ImageRecord

logger = logging.getLogger(__name__)

MAX_PENDING_WRITES = 2  # cache files being written in the background while the next image runs
FLOAT16_BYTES = 2


@locked("extract", sharded=True)
def run_extract(ctx: StageContext, split: str) -> str:
    """Cache the conv5 maps of ``split``; returns the one-line summary."""
    config = ctx.config
    settings = config.extract
    if settings.cache == "none":
        return "extract: extract.cache is none, later stages compute conv5 maps on the fly"
    device = resolve_device(ctx.device)
    records = split_records(config, split, ctx.limit)
    backbone = build_trunk(config, ctx.run_dir)
    digest = trunk_digest(config, ctx.run_dir)
    check_scales_fit(backbone, settings.scales)
    flip = settings.flip and split == config.data.train_split
    out_dir = ctx.run_dir.features_dir(split)
    clear_manifest(out_dir)
    path_of = functools.partial(ctx.run_dir.feature_path, split)
    todo_records, fingerprints = items_to_do(
        config, "extract", records, path_of, ctx.force, model=maps_origin(config, ctx.run_dir)
    )
    sizes = {
        r.image_id: _cache_bytes(r, backbone, settings.scales, settings.max_long_side, flip)
        for r in records
    }
    # under torchrun: rank 0's list, and this rank's share balanced by the maps' sizes
    todo_records, mine = split_todo(ctx.dist, records, todo_records, sizes)
    _check_projected_size(sizes, todo_records, out_dir, ctx.force)
    todo = [(record, path_of(record.image_id)) for record in mine]
    extractor = _Extractor(backbone, device, settings, flip)
    started = time.perf_counter()
    shown = len(records) - len(todo_records) + len(todo)  # the bar counts this rank's images
    bytes_written = _extract_all(extractor, todo, fingerprints, shown, split)
    done = len(todo)
    if ctx.dist.active:  # every rank's maps are written before rank 0 closes the stage
        done, _ = wait_for_shares(ctx.dist, done)
    seconds = time.perf_counter() - started
    if not ctx.dist.is_main:
        return f"rank {ctx.dist.rank}: {len(todo)} images, {format_bytes(bytes_written)} written"
    if ctx.dist.active:  # every rank's files
        bytes_written = sum(path_of(r.image_id).stat().st_size for r in todo_records)
    close_stage(
        ctx, "extract", split, len(records),
        extra={
            "backbone": backbone.name, "channels": backbone.channels, "stride": backbone.stride,
            "offset0": backbone.offset0, "scales": list(settings.scales), "flip": flip,
            "trunk_digest": digest,
        },
    )  # fmt: skip
    per_image = f" ({seconds / done:.3f} s/image)" if done else ""
    ranks = f" on {ctx.dist.world} ranks" if ctx.dist.active else ""
    return (
        f"extract ({split}): {done} images{ranks} in {seconds:.1f} s{per_image}, "
        f"{format_bytes(bytes_written)} written, {len(records) - len(todo_records)} already cached"
        + (f", {extractor.cpu_fallbacks} redone on the CPU" if extractor.cpu_fallbacks else "")
    )


class _Extractor:
    """Forward passes for one image on the device, redone on the CPU after a CUDA OOM."""

    def __init__(
        self,
        backbone: Backbone,
        device: torch.device,
        settings: ExtractConfig,
        flip: bool,
    ) -> None:
        # a CPU copy is kept aside before the move: copying after an OOM could run out again
        self.cpu_backbone = copy.deepcopy(backbone) if device.type == "cuda" else backbone
        self.backbone = backbone.to(device)
        self.scales, self.max_long_side = tuple(settings.scales), settings.max_long_side
        self.precision, self.flip = settings.precision, flip
        self.cpu_fallbacks = 0

    def arrays(self, record: ImageRecord, image: np.ndarray, file_fp: str) -> dict[str, np.ndarray]:
        try:
            return self._arrays(self.backbone, image, file_fp)
        except torch.cuda.OutOfMemoryError:
            logger.warning("%s: out of GPU memory; redoing this image on the CPU", record.path)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.cpu_fallbacks += 1
            return self._arrays(self.cpu_backbone, image, file_fp)

    def _arrays(self, backbone: Backbone, image: np.ndarray, file_fp: str) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            settings = (self.scales, self.max_long_side, self.precision)
            maps = compute_maps(backbone, image, *settings)
            flipped = compute_maps(backbone, flip_image(image), *settings) if self.flip else None
            return cache_arrays(maps, flipped, self.scales, image.shape[:2], file_fp)


def _extract_all(
    extractor: _Extractor,
    todo: Sequence[tuple[ImageRecord, Path]],
    fingerprints: Mapping[str, str],
    total: int,
    split: str,
) -> int:
    """Run the images in ``todo``: decode ahead and write behind in threads. Returns bytes."""
    written = 0
    with ThreadPoolExecutor(max_workers=2) as pool:
        pending: deque[Future[int]] = deque()
        bar = tqdm(total=total, initial=total - len(todo), desc=f"extract {split}", unit="img")
        with bar:
            for (record, path), image in _decoded_ahead(pool, todo):
                arrays = extractor.arrays(record, image, fingerprints[record.image_id])
                pending.append(pool.submit(_save, path, arrays))
                while len(pending) > MAX_PENDING_WRITES:
                    written += pending.popleft().result()
                bar.update()
            while pending:
                written += pending.popleft().result()
    return written


def _decoded_ahead(
    pool: ThreadPoolExecutor, todo: Sequence[tuple[ImageRecord, Path]]
) -> Iterator[tuple[tuple[ImageRecord, Path], np.ndarray]]:
    """Each item with its decoded image; the next image decodes while this one runs."""
    upcoming = pool.submit(read_record_image, todo[0][0]) if todo else None
    for position, item in enumerate(todo):
        current = upcoming
        following = position + 1 < len(todo)
        upcoming = pool.submit(read_record_image, todo[position + 1][0]) if following else None
        assert current is not None
        yield item, current.result()


def _save(path: Path, arrays: dict[str, np.ndarray]) -> int:
    save_npz(path, **arrays)  # uncompressed: zlib halves the size but is slow (BENCHMARKS.md)
    return path.stat().st_size


def _cache_bytes(
    record: ImageRecord, backbone: Backbone, scales: Sequence[int], max_long_side: int, flip: bool
) -> int:
    """The float16 conv5 maps of one image at every scale (and mirrored), from the image size and
    the conv size arithmetic."""
    total = 0
    for scale in scales:
        fmap_h, fmap_w = backbone.output_hw(resized_hw(record.image_hw, scale, max_long_side))
        total += backbone.channels * fmap_h * fmap_w * FLOAT16_BYTES
    return total * (2 if flip else 1)


def _check_projected_size(
    sizes: Mapping[str, int], todo: Sequence[ImageRecord], out_dir: Path, force: bool
) -> None:
    """Log the cache size; refuse to start when the images still to write will not fit (with
    --force only warn: the files it replaces free their space as it goes)."""
    needed = sum(sizes[record.image_id] for record in todo)
    logger.info(
        "projected cache size: %s for %d images, %s of it still to write",
        format_bytes(sum(sizes.values())), len(sizes), format_bytes(needed),
    )  # fmt: skip
    if force:
        free = free_bytes(out_dir)
        if free is not None and free < needed:
            logger.warning("only %s free under %s", format_bytes(free), out_dir)
        return
    check_free_space(out_dir, needed, "the conv5 cache")
