"""`spp-detect extract`: conv5 maps of every image at every scale, cached as float16 .npz.

Steps: 1. check the settings and build the backbone; 2. log the projected cache size and stop
when what is left to write does not fit the free space (unless --force); 3. per
image, skip a file already made with the same settings (unless --force), else one forward pass
per scale (plus the mirrored image on training splits with ``extract.flip``) and an atomic write;
with ``extract.batch_images`` > 1, images of the same size at every scale share their forward
passes (still one file each); an image that runs out of GPU memory is redone on the CPU (a batch
first one image at a time), and any other CUDA error stops the stage with one line naming the
image, the files written so far kept, as does running out of the machine's memory (a huge image
or scale); 4. the manifest, last.
Cache layout: ``spp_detect.models.features`` (module docstring) and docs/contracts.md#artefacts.
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

from spp_detect.config import ExtractConfig
from spp_detect.data.image import flip_image, resized_hw
from spp_detect.models.backbones import Backbone
from spp_detect.models.features import (
    cache_arrays,
    check_scales_fit,
    compute_maps,
    compute_maps_batch,
    pyramid_hw,
    read_record_image,
)
from spp_detect.runtime.artifacts import check_free_space, free_bytes, save_npz
from spp_detect.runtime.device import device_errors, resolve_device
from spp_detect.stages.builders import build_trunk
from spp_detect.stages.context import StageContext, format_bytes, locked, split_records
from spp_detect.stages.manifests import clear_manifest, close_stage, maps_origin, trunk_digest
from spp_detect.stages.provenance import items_to_do
from spp_detect.stages.sharding import split_todo, wait_for_shares
from spp_detect.structures import ImageRecord

logger = logging.getLogger(__name__)

MAX_PENDING_WRITES = 2  # cache files (per image of a batch) written in the background meanwhile
FLOAT16_BYTES = 2
LOWER_MEMORY = (
    "extract.batch_images=1, smaller extract.scales, extract.max_long_side (e.g. 1000) or "
    "extract.precision=bf16"
)


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
    batches = _batches(todo, settings)
    bytes_written = _extract_all(extractor, batches, fingerprints, shown, split)
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
    """Forward passes for one image, or a batch of same-size images, on the device; an image
    that runs out of GPU memory is redone on the CPU, a batch first redone one image at a time."""

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

    def batch_arrays(
        self, records: Sequence[ImageRecord], images: Sequence[np.ndarray], file_fps: Sequence[str]
    ) -> list[dict[str, np.ndarray]]:
        """The cache arrays of each image of a batch (images of the same ``pyramid_hw``); one
        image goes through :meth:`arrays` exactly as without batching."""
        if len(records) == 1:
            return [self.arrays(records[0], images[0], file_fps[0])]
        try:
            with torch.inference_mode():
                settings = (self.scales, self.max_long_side, self.precision)
                maps = compute_maps_batch(self.backbone, images, *settings)
                flipped = (
                    compute_maps_batch(self.backbone, [flip_image(i) for i in images], *settings)
                    if self.flip
                    else [None] * len(images)
                )
                return [
                    cache_arrays(m, f, self.scales, image.shape[:2], fp)
                    for m, f, image, fp in zip(maps, flipped, images, file_fps, strict=True)
                ]
        except torch.cuda.OutOfMemoryError:
            logger.warning(
                "%s and %d more: out of GPU memory in one batch; redoing them one at a time",
                records[0].path, len(records) - 1,
            )  # fmt: skip
        # out of the except block: the failed batch's tensors are freed before the retries
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return [self.arrays(*item) for item in zip(records, images, file_fps, strict=True)]

    def _arrays(self, backbone: Backbone, image: np.ndarray, file_fp: str) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            settings = (self.scales, self.max_long_side, self.precision)
            maps = compute_maps(backbone, image, *settings)
            flipped = compute_maps(backbone, flip_image(image), *settings) if self.flip else None
            return cache_arrays(maps, flipped, self.scales, image.shape[:2], file_fp)


Item = tuple[ImageRecord, Path]  # an image to extract and its cache file


def _batches(todo: Sequence[Item], settings: ExtractConfig) -> list[list[Item]]:
    """``todo`` in batches of at most ``extract.batch_images`` images of the same resized size
    at every scale. One image a batch in ``todo``'s order when batch_images is 1; else the
    images of each size together, in the order each size first appears."""
    size = settings.batch_images
    if size == 1:
        return [[item] for item in todo]
    groups: dict[tuple[tuple[int, int], ...], list[Item]] = {}
    for item in todo:
        key = pyramid_hw(item[0].image_hw, settings.scales, settings.max_long_side)
        groups.setdefault(key, []).append(item)
    return [group[i : i + size] for group in groups.values() for i in range(0, len(group), size)]


def _extract_all(
    extractor: _Extractor,
    batches: Sequence[Sequence[Item]],
    fingerprints: Mapping[str, str],
    total: int,
    split: str,
) -> int:
    """Run the images in ``batches``: decode ahead and write behind in threads. Returns bytes.
    A CUDA error ends it with a UserError naming the image, once the files of the images done
    are written."""
    written = 0
    done = total - sum(len(batch) for batch in batches)  # already cached (this rank's share)
    most_pending = MAX_PENDING_WRITES * max((len(batch) for batch in batches), default=1)
    pending: deque[Future[int]] = deque()

    def settle(keep: int) -> None:
        nonlocal written
        while len(pending) > keep:
            written += pending.popleft().result()

    bar = tqdm(total=total, initial=done, desc=f"extract {split}", unit="img")
    with ThreadPoolExecutor(max_workers=2) as pool, bar:
        for batch, decoding in _decoded_ahead(pool, batches):
            records = [record for record, _ in batch]
            file_fps = [fingerprints[record.image_id] for record in records]
            where = _where(records)
            with device_errors(where, "extracting", done, LOWER_MEMORY, lambda: settle(0)):
                images = [future.result() for future in decoding]  # a huge image may not fit
                arrays = extractor.batch_arrays(records, images, file_fps)
            for (_, path), image_arrays in zip(batch, arrays, strict=True):
                pending.append(pool.submit(_save, path, image_arrays))
            settle(most_pending)
            done += len(batch)
            bar.update(len(batch))
        settle(0)
    return written


def _where(records: Sequence[ImageRecord]) -> str:
    """The image a CUDA error is reported at: the batch's first."""
    where = str(records[0].path)
    if len(records) > 1:
        where += f" (in a batch with {len(records) - 1} more)"
    return where


def _decoded_ahead(
    pool: ThreadPoolExecutor, batches: Sequence[Sequence[Item]]
) -> Iterator[tuple[Sequence[Item], list[Future[np.ndarray]]]]:
    """Each batch with its images being decoded; the next batch decodes while this one runs."""

    def decode(batch: Sequence[Item]) -> list[Future[np.ndarray]]:
        return [pool.submit(read_record_image, record) for record, _ in batch]

    upcoming = decode(batches[0]) if batches else []
    for position, batch in enumerate(batches):
        current = upcoming
        upcoming = decode(batches[position + 1]) if position + 1 < len(batches) else []
        yield batch, current


def _save(path: Path, arrays: dict[str, np.ndarray]) -> int:
    # uncompressed: zlib halves the size but is slow (docs/benchmarks-history.md)
    save_npz(path, **arrays)
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
