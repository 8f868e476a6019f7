"""Conv5 maps of an image at every scale, from the disk cache or computed on the fly, and pooling.

Shapes: R windows, C channels, S scales, H_k/W_k the map at scale k, D = C·Σn² pooled dim.

Cache file (docs/contracts.md#artefacts), one per image, ``features/<split>/<image_id>.npz``:
``fmap_<k>`` float16 (C, H_k, W_k) for scale index k; ``flip_fmap_<k>`` the same for the
horizontally flipped image (training splits with ``extract.flip``); ``scales`` int64 (S,);
``image_hw`` int64 (2,) of the original image; ``fingerprint`` str (the extract config that made
it, so a resumed run never keeps a stale file).
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from spp_detect.data.image import (
    flip_image,
    image_to_tensor,
    read_image,
    resize_short_side,
    resized_hw,
)
from spp_detect.errors import UserError
from spp_detect.models.backbones import Backbone
from spp_detect.ops.spp import PoolGeometry, pool_windows, select_scale
from spp_detect.runtime.artifacts import short_reason
from spp_detect.runtime.device import autocast, check_precision, resolve_device
from spp_detect.structures import ImageRecord

FLOAT16_MAX = 65504.0  # largest finite float16; cached maps are clipped to it instead of inf
CACHE_MODES = ("disk", "none")
PREFETCHED_IMAGES = 2  # pending background reads kept: the image in hand's and the next one's


def check_scales(scales: Sequence[int]) -> tuple[int, ...]:
    """``extract.scales`` as a tuple; UserError when empty, repeated or not positive."""
    values = tuple(scales)
    if not values:
        raise UserError("extract.scales: empty; give at least one shorter-side size, e.g. [688]")
    if any(not isinstance(s, int) or isinstance(s, bool) or s <= 0 for s in values):
        raise UserError(f"extract.scales: sizes must be positive integers (px), got {list(values)}")
    if len(set(values)) != len(values):
        raise UserError(f"extract.scales: a size is repeated in {list(values)}; list each once")
    return values


def check_scales_fit(backbone: Backbone, scales: Sequence[int]) -> None:
    """UserError when the smallest scale leaves the backbone no conv cell."""
    smallest = min(scales)
    if min(backbone.output_hw((smallest, smallest))) < 1:
        fits = next(s for s in range(smallest, 10_000) if min(backbone.output_hw((s, s))) >= 1)
        raise UserError(
            f"extract.scales: {smallest} px is too small for {backbone.name}; use at least {fits}"
        )


def check_levels(levels: Sequence[int]) -> tuple[int, ...]:
    values = tuple(levels)
    if not values or any(not isinstance(n, int) or n <= 0 for n in values):
        raise UserError(
            f"spp.levels: need positive bin counts, e.g. [6, 3, 2, 1]; got {list(values)}"
        )
    return values


def check_extract_settings(
    scales: Sequence[int], max_long_side: int, cache: str, precision: str
) -> None:
    check_scales(scales)
    check_precision(precision, "extract.precision")
    if max_long_side < 0:
        raise UserError(
            f"extract.max_long_side: must be 0 (no cap) or positive, got {max_long_side}"
        )
    if cache not in CACHE_MODES:
        raise UserError(f"extract.cache: must be one of {', '.join(CACHE_MODES)}, got {cache!r}")


def effective_scales(
    image_hw: tuple[int, int], scales: Sequence[int], max_long_side: int = 0
) -> list[int]:
    """The shorter side each scale gives this image (less than the scale only under a cap)."""
    return [min(resized_hw(image_hw, s, max_long_side)) for s in scales]


def read_record_image(record: ImageRecord) -> np.ndarray:
    """The record's image; UserError when its decoded size is not the record's (H, W)."""
    image = read_image(record.path)
    if image.shape[:2] != record.image_hw:
        raise UserError(
            f"{record.path}: decodes to {image.shape[0]}×{image.shape[1]} but its header says "
            f"{record.height}×{record.width} (rewritten since the split was read?); replace the "
            "file, or drop its id from the split"
        )
    return image


def compute_maps(
    backbone: Backbone,
    image: np.ndarray,
    scales: Sequence[int],
    max_long_side: int = 0,
    precision: str = "fp32",
) -> list[Tensor]:
    """One forward pass per scale of uint8 (H, W, 3) RGB ``image``: S maps (C, H_k, W_k) float32
    on the backbone's device, the trunk run in ``precision`` (``spp_detect.runtime.device``). Call
    under ``torch.no_grad`` or ``torch.inference_mode``."""
    device = next(backbone.parameters()).device
    maps = []
    for scale in scales:
        resized = resize_short_side(image, scale, max_long_side)
        pixels = image_to_tensor(resized, backbone.normalization, device)
        with autocast(device, precision):
            maps.append(backbone(pixels[None])[0].float())
    return maps


def compute_maps_batch(
    backbone: Backbone,
    images: Sequence[np.ndarray],
    scales: Sequence[int],
    max_long_side: int = 0,
    precision: str = "fp32",
) -> list[list[Tensor]]:
    """:func:`compute_maps` of several images of the same size at every scale (same
    ``pyramid_hw``), one forward pass of them all per scale: per image, S maps. Equal to
    ``compute_maps`` of each image up to the order in which conv kernels sum (another batch size
    may pick another algorithm), not bit for bit. Call under ``torch.inference_mode``."""
    device = next(backbone.parameters()).device
    per_image: list[list[Tensor]] = [[] for _ in images]
    for scale in scales:
        pixels = torch.stack(
            [
                image_to_tensor(resize_short_side(image, scale, max_long_side),
                                backbone.normalization, device)
                for image in images
            ]
        )  # fmt: skip
        with autocast(device, precision):
            batch = backbone(pixels).float()
        for maps, fmap in zip(per_image, batch, strict=True):
            maps.append(fmap)
    return per_image


def pyramid_hw(
    image_hw: tuple[int, int], scales: Sequence[int], max_long_side: int = 0
) -> tuple[tuple[int, int], ...]:
    """The resized (H, W) of an image at every scale: images with the same one can share the
    trunk's forward passes (:func:`compute_maps_batch`)."""
    return tuple(resized_hw(image_hw, scale, max_long_side) for scale in scales)


def to_float16(fmap: Tensor) -> np.ndarray:
    """A map as float16 numpy for the cache; values beyond float16's range are clipped."""
    return fmap.clamp(max=FLOAT16_MAX).to(torch.float16).cpu().numpy()


def cache_arrays(
    maps: Sequence[Tensor],
    flipped_maps: Sequence[Tensor] | None,
    scales: Sequence[int],
    image_hw: tuple[int, int],
    fingerprint: str,
) -> dict[str, np.ndarray]:
    """The arrays of one cache file (module docstring)."""
    arrays = {f"fmap_{k}": to_float16(fmap) for k, fmap in enumerate(maps)}
    for k, fmap in enumerate(flipped_maps or ()):
        arrays[f"flip_fmap_{k}"] = to_float16(fmap)
    arrays["scales"] = np.asarray(scales, dtype=np.int64)
    arrays["image_hw"] = np.asarray(image_hw, dtype=np.int64)
    arrays["fingerprint"] = np.asarray(fingerprint)
    return arrays


class FeatureSource:
    """Conv5 maps and pooled windows of the images of one split.

    ``scales`` (S,) shorter sides, ``geometry`` (:class:`PoolGeometry`), ``channels`` (C) and
    ``device``. Maps come from the cache (``cache_path(image_id)`` → .npz) or, with
    ``backbone`` instead, are computed on the fly (the trunk in ``precision``). With
    ``cache_fingerprint(record)``, each cache file's stored fingerprint must equal it (a file
    of another origin is refused, never pooled). The last
    image's maps are kept, so ``maps`` and ``pool`` on the same image read or compute them once.
    """

    def __init__(
        self,
        scales: Sequence[int],
        geometry: PoolGeometry,
        channels: int,
        device: str | torch.device,
        *,
        cache_path: Callable[[str], Path] | None = None,
        cache_fingerprint: Callable[[ImageRecord], str] | None = None,
        backbone: Backbone | None = None,
        max_long_side: int = 0,
        precision: str = "fp32",
    ) -> None:
        if (cache_path is None) == (backbone is None):
            raise ValueError("give exactly one of cache_path and backbone")
        self.scales = check_scales(scales)
        self.geometry = geometry
        self.channels = int(channels)
        self.device = resolve_device(device)
        self.max_long_side = max_long_side
        self.precision = precision  # of the backbone, for maps computed on the fly
        self._cache_path = cache_path
        self._cache_fingerprint = cache_fingerprint
        self._backbone = backbone.to(self.device).eval() if backbone is not None else None
        if backbone is not None:
            check_scales_fit(backbone, self.scales)
        self._last_key: tuple[str, bool] | None = None
        self._last_maps: list[Tensor | None] = []
        self._reader: ThreadPoolExecutor | None = None  # one background thread, for prefetch
        self._prefetched: dict[tuple[str, bool], Future[list[Tensor]]] = {}  # oldest first

    @property
    def feature_dim(self) -> int:
        return self.geometry.feature_dim(self.channels)

    def maps(self, record: ImageRecord, flipped: bool = False) -> list[Tensor]:
        """S float32 maps (C, H_k, W_k) on the device; ``flipped``: of the mirrored image."""
        maps = self._maps(record, flipped, range(len(self.scales)))
        return [fmap.float() for fmap in maps if fmap is not None]

    def image_scales(self, record: ImageRecord) -> list[int]:
        """The shorter side of each level of this image's pyramid (S,)."""
        return effective_scales(record.image_hw, self.scales, self.max_long_side)

    def scale_index(self, record: ImageRecord, boxes: np.ndarray | Tensor) -> Tensor:
        """The best scale (R,) of each window (R, 4), as :meth:`pool` picks it by default."""
        scales = self.image_scales(record)
        return select_scale(boxes, record.image_hw, scales, self.geometry.target_size)

    def pool(
        self,
        record: ImageRecord,
        boxes: np.ndarray | Tensor,
        scale_index: Tensor | np.ndarray | None = None,
        flipped: bool = False,
        *,
        out: Tensor | None = None,
        keep_order: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """Pooled features (R, D) float32 on the device of the windows ``boxes`` (R, 4), and
        rows (R,) int64 on the CPU, row i of pooled being window ``rows[i]``.

        ``scale_index`` (R,) picks each window's scale (fine-tuning draws it at random); None
        picks the best scale (``select_scale``). With ``flipped`` the boxes are in the
        coordinates of the mirrored image (``boxes.flip_boxes``). ``keep_order``: True gives
        input order (rows = arange(R)); False skips the final reorder (the test path needs no
        input order). ``out``: a float32 buffer (≥ R, D) on the device to pool into, as in
        ``spp.pool_windows``.
        """
        boxes = torch.as_tensor(boxes if isinstance(boxes, Tensor) else np.asarray(boxes))
        scales = self.image_scales(record)
        if scale_index is None:
            index = select_scale(boxes, record.image_hw, scales, self.geometry.target_size)
        else:
            index = torch.as_tensor(scale_index).to(device="cpu", dtype=torch.long).reshape(-1)
        if len(index) and not (int(index.min()) >= 0 and int(index.max()) < len(scales)):
            raise ValueError(f"scale_index must lie in [0, {len(scales)})")
        maps = self._maps(record, flipped, sorted(set(index.tolist())) or [0])
        return pool_windows(
            maps, boxes, record.image_hw, scales, index, self.geometry,
            out_dtype=torch.float32, out=out, keep_order=keep_order,
        )  # fmt: skip

    def prefetch(self, record: ImageRecord, flipped: bool = False) -> None:
        """Start reading ``record``'s cached maps (every scale) in a background thread, so the
        disk read and the copy to the device overlap the work on the current image; the next
        :meth:`maps` or :meth:`pool` call for it takes them. The last PREFETCHED_IMAGES reads
        asked for are kept until used (``prefetching`` asks for the next image while the current
        one's read may still be pending). No-op for maps computed on the fly.
        """
        key = (str(record.path), flipped)
        if self._cache_path is None or key in self._prefetched:
            return
        if self._reader is None:
            self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spp-prefetch")
        scales = range(len(self.scales))
        # the copies to the device go on the caller's current stream, which then reads them: a
        # thread's own current stream is the default one, which the caller may not be using
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        while len(self._prefetched) >= PREFETCHED_IMAGES:  # a read nobody asked for since
            self._prefetched.pop(next(iter(self._prefetched))).cancel()  # if not started yet
        self._prefetched[key] = self._reader.submit(self._read_on, stream, record, flipped, scales)

    def compute_from(self, record: ImageRecord, image: np.ndarray) -> None:
        """Compute ``record``'s maps (every scale) from its decoded ``image`` uint8 (H, W, 3)
        RGB instead of its file, for an image that has none (the Python API); the next
        :meth:`maps` and :meth:`pool` calls on ``record`` use them. Maps computed on the fly
        only."""
        if self._backbone is None:
            raise ValueError("compute_from needs a FeatureSource with a backbone")
        if tuple(image.shape[:2]) != record.image_hw:
            raise ValueError(f"image is {image.shape[:2]}, the record says {record.image_hw}")
        with torch.no_grad():
            maps = compute_maps(
                self._backbone, image, self.scales, self.max_long_side, self.precision
            )
        self._last_key, self._last_maps = (str(record.path), False), list(maps)

    def _maps(
        self, record: ImageRecord, flipped: bool, needed: Sequence[int]
    ) -> list[Tensor | None]:
        """Maps of the ``needed`` scale indices (float16 from the cache, float32 computed);
        the others may be None."""
        key = (str(record.path), flipped)
        if self._last_key != key:
            self._last_key, self._last_maps = key, [None] * len(self.scales)
            future = self._prefetched.pop(key, None)
            if future is not None:
                self._last_maps = list(future.result())
        missing = [k for k in needed if self._last_maps[k] is None]
        if missing:
            load = self._read if self._backbone is None else self._compute
            for k, fmap in zip(missing, load(record, flipped, missing), strict=True):
                self._last_maps[k] = fmap
        return list(self._last_maps)

    def _read_on(
        self,
        stream: torch.cuda.Stream | None,
        record: ImageRecord,
        flipped: bool,
        needed: Sequence[int],
    ) -> list[Tensor]:
        """:meth:`_read` with its copies to the device ordered on ``stream`` (and its device)."""
        if stream is None:
            return self._read(record, flipped, needed)
        with torch.cuda.stream(stream):
            return self._read(record, flipped, needed)

    def _read(self, record: ImageRecord, flipped: bool, needed: Sequence[int]) -> list[Tensor]:
        """The cached float16 maps of the ``needed`` scale indices, on the device. On CUDA each
        map is copied to page-locked memory and from there to the device with
        ``non_blocking=True``, queued on the current stream: work queued after it on that
        stream sees the copied map, and torch keeps the page-locked block until the copy is
        done. On the CPU the maps stay the arrays read (pinning would be a wasted copy)."""
        assert self._cache_path is not None
        path = self._cache_path(record.image_id)
        prefix = "flip_fmap" if flipped else "fmap"
        try:
            with np.load(path, allow_pickle=False) as data:
                self._check_cache(path, data, record, flipped)
                arrays = [data[f"{prefix}_{k}"] for k in needed]
        except FileNotFoundError:
            raise UserError(
                f"{path}: no cached conv5 maps for this image; run `spp-detect extract` for "
                "this split"
            ) from None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            raise UserError(
                f"{path}: unreadable cache file ({short_reason(exc)}); delete it and rerun "
                "`spp-detect extract`"
            ) from None
        # kept float16: pooling (a max) is exact in it and moves half the bytes
        tensors = [torch.from_numpy(array) for array in arrays]
        if self.device.type == "cuda":
            return [t.pin_memory().to(self.device, non_blocking=True) for t in tensors]
        return tensors

    def _check_cache(self, path: Path, data, record: ImageRecord, flipped: bool) -> None:
        if self._cache_fingerprint is not None:
            stored = str(data["fingerprint"]) if "fingerprint" in data.files else None
            if stored != self._cache_fingerprint(record):
                raise UserError(
                    f"{path}: conv5 maps made from other inputs than this run's (dataset, image, "
                    "extract settings or trunk); run `spp-detect extract` for this split to "
                    "recompute them"
                )
        cached = tuple(int(s) for s in data["scales"])
        if cached != self.scales:
            raise UserError(
                f"{path}: cached for scales {list(cached)}, the config has {list(self.scales)}; "
                "rerun `spp-detect extract --force`"
            )
        cached_hw = tuple(int(v) for v in data["image_hw"])
        if cached_hw != record.image_hw:
            raise UserError(
                f"{path}: cached for a {cached_hw[0]}×{cached_hw[1]} image, {record.path} is "
                f"{record.height}×{record.width}; rerun `spp-detect extract --force`"
            )
        if flipped and "flip_fmap_0" not in data.files:
            raise UserError(
                f"{path}: no flipped maps cached; set extract.flip=true and rerun "
                "`spp-detect extract --force` on the training split"
            )

    def _compute(self, record: ImageRecord, flipped: bool, needed: Sequence[int]) -> list[Tensor]:
        assert self._backbone is not None
        image = read_record_image(record)
        if flipped:
            image = flip_image(image)
        with torch.no_grad():
            scales = [self.scales[k] for k in needed]
            return compute_maps(self._backbone, image, scales, self.max_long_side, self.precision)


def prefetching(source: FeatureSource, records: Sequence[ImageRecord]) -> Iterator[ImageRecord]:
    """``records`` in order; while the caller works on one, the next one's cached maps are read
    in the background (:meth:`FeatureSource.prefetch`)."""
    for position, record in enumerate(records):
        if position + 1 < len(records):
            source.prefetch(records[position + 1])
        yield record
