"""What every stage shares: the command-line context, the split's records, fingerprints,
upstream checks and manifests, summaries, and the library objects built from the config
(feature source, trunk, detector)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from spp_detect.config import Config, ExtractConfig, ProposeConfig
from spp_detect.errors import UserError
from spp_detect.runtime.artifacts import (
    atomic_write_text,
    file_digest,
    folder_token,
    load_npz,
    read_manifest,
    remove_stale_temporaries,
    require_manifest,
    save_json,
    stored_fingerprint,
    write_manifest,
)
from spp_detect.runtime.distributed import Dist, map_in_order
from spp_detect.runtime.locks import exclusive
from spp_detect.runtime.run_dir import RunDir
from spp_detect.structures import ImageRecord

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from spp_detect.models.features import FeatureSource


@dataclass(frozen=True)
class StageContext:
    """What every stage gets from the command line."""

    config: Config
    run_dir: RunDir
    device: str
    workers: int
    limit: int | None
    force: bool
    # this process's rank under torchrun (distributed.Dist(): one process, the default)
    dist: Dist = field(default_factory=Dist)


# Config sections each stage's output depends on, its upstream stages' included.
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "propose": ("data", "propose"),
    "extract": ("data", "extract"),
    "finetune": ("data", "propose", "extract", "spp", "finetune"),
    "train-svm": ("data", "propose", "extract", "spp", "finetune", "svm"),
    "train-bbox": ("data", "propose", "extract", "spp", "bbox_reg"),
    "test": ("data", "propose", "extract", "spp", "finetune", "svm", "bbox_reg", "test"),
    "eval": ("data", "propose", "extract", "spp", "finetune", "svm", "bbox_reg", "test", "eval"),
}


# Config sections that one per-item file of a stage depends on (the dataset and the item's image
# are added by item_fingerprint). Narrower than STAGE_SECTIONS, so that e.g. a change of
# data.classes re-labels windows without recomputing proposals or conv5 maps.
ITEM_SECTIONS: dict[str, tuple[str, ...]] = {
    "propose": ("propose",),
    "extract": ("extract",),
    "test": STAGE_SECTIONS["test"],
}


def fingerprint(config: Config, stage: str) -> str:
    """The fingerprint of a stage's manifest: every config section its output depends on
    (train-bbox's pool5 also depends on the fine-tuning when it trains the conv layers)."""
    sections = STAGE_SECTIONS[stage]
    if stage == "train-bbox" and config.finetune.conv_from:
        sections = (*sections, "finetune")
    return config.fingerprint(*sections)


def item_fingerprint(config: Config, stage: str, record: ImageRecord, model: str = "") -> str:
    """The fingerprint stored in ``stage``'s file for one image: its config sections, the
    dataset's absolute root, the image id and the image file's size and modification time.

    A resumed stage keeps a file only when this matches, so an item made from another dataset
    (a run directory pointed at a new data.root with the same ids), from an image rewritten in
    place, with another config or (``model``: its digest) another trained model is recomputed,
    never reused.
    """
    try:
        stat = record.path.stat()
    except OSError:
        raise UserError(f"{record.path}: image not found; check data.root") from None
    payload = [
        config.fingerprint(*ITEM_SECTIONS[stage]),
        str(Path(config.data.root).resolve()),
        record.image_id,
        stat.st_size,
        stat.st_mtime_ns,
        model,
    ]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]


def items_to_do(
    config: Config,
    stage: str,
    records: Sequence[ImageRecord],
    path_of,
    force: bool,
    model: str | Callable[[ImageRecord], str] = "",
) -> tuple[list[ImageRecord], dict[str, str]]:
    """The records whose file ``path_of(image_id)`` is missing or was made from other inputs
    (all of them with ``force``), and every record's item fingerprint by image id. ``model``:
    the digest of what else the item depends on, or a function giving it per record."""
    model_of = model if callable(model) else (lambda record: model)
    fingerprints = {r.image_id: item_fingerprint(config, stage, r, model_of(r)) for r in records}
    todo = [
        r
        for r in records
        if force or stored_fingerprint(path_of(r.image_id)) != fingerprints[r.image_id]
    ]
    return todo, fingerprints


def stage_dir(run_dir: RunDir, stage: str, split: str) -> Path:
    """The folder whose manifest.json closes ``stage`` (``RunDir.stage_dir``)."""
    return run_dir.stage_dir(stage, split)


def upstream_stages(config: Config, stage: str) -> list[tuple[str, str]]:
    """The stages whose manifests ``stage`` reads, with the split they are read for: "own" is
    the stage's split, "train" is data.train_split (the trained models)."""
    cached = config.extract.cache == "disk"
    conv = bool(config.finetune.conv_from)
    maps = [("propose", "own")] + ([("extract", "own")] if cached else [])
    test = config.test
    reads = {
        "propose": [],
        "extract": [("finetune", "train")] if conv else [],
        "finetune": [("propose", "own")] if conv else maps,
        "train-svm": [*maps, ("finetune", "train")],
        "train-bbox": maps + ([("finetune", "train")] if conv else []),
        "test": [*maps, ("finetune", "train")]
        + ([("train-svm", "train")] if test.scorer == "svm" else [])
        + ([("train-bbox", "train")] if test.bbox_reg and test.regressor == "ridge" else []),
        "eval": [("test", "own")],
    }
    return reads[stage]


def close_stage(
    ctx: StageContext,
    stage: str,
    split: str,
    count: int,
    extra: dict | None = None,
    folder: Path | None = None,
    files: Sequence[Path] = (),
) -> None:
    """Write ``stage``'s manifest last, with its config fingerprint, the ``--limit`` it ran
    with, the digest of the split's data (``data_digest``) and the tokens of the upstream
    manifests it read (what `run` compares to decide whether the stage is still current).
    ``files``: the trained files it wrote, whose content digests their readers check
    (``check_file``). ``folder``: where it goes, if not ``RunDir.stage_dir``."""
    config, run_dir = ctx.config, ctx.run_dir
    upstream = {
        name: manifest.get("token", "")
        for name, manifest in _upstream_manifests(config, run_dir, stage, split).items()
    }
    extra = {"limit": ctx.limit, "data": data_digest(config, split, ctx.limit), **(extra or {})}
    if files:
        extra["digests"] = {path.name: file_digest(path) for path in files}
    write_manifest(
        folder or run_dir.stage_dir(stage, split), stage, split, count, fingerprint(config, stage),
        upstream=upstream, extra=extra,
    )  # fmt: skip


def data_digest(config: Config, split: str, limit: int | None = None) -> str:
    """A digest of the split's data as the stages read it: the dataset's absolute root, and per
    image its id, file size and modification time and its ground truth. A dataset regenerated
    or re-annotated in place changes it, so `run` reruns what was made from the old one."""
    digest = hashlib.sha256(str(Path(config.data.root).resolve()).encode())
    for record in split_records(config, split, limit):
        try:
            stat = record.path.stat()
        except OSError:
            raise UserError(f"{record.path}: image not found; check data.root") from None
        digest.update(f"|{record.image_id}|{stat.st_size}|{stat.st_mtime_ns}|".encode())
        for array in (record.gt_boxes, record.gt_labels, record.difficult):
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def check_file(manifest: dict, path: Path, stage: str, split: str) -> None:
    """Refuse a trained file whose content is not the one its ``stage`` manifest recorded
    (corrupted, or replaced by another run's since the stage closed)."""
    expected = manifest.get("digests", {}).get(path.name)
    if expected is None or not path.is_file() or file_digest(path) != expected:
        raise UserError(
            f"{path}: missing, or not the file its {stage} manifest names (changed or replaced "
            f"since); rerun `spp-detect {stage} --split {split} --force`"
        )


def _upstream_manifests(config: Config, run_dir: RunDir, stage: str, split: str) -> dict:
    """The manifests (by stage name) of the upstream stages of ``stage`` that exist."""
    found = {}
    for name, role in upstream_stages(config, stage):
        manifest = read_manifest(
            run_dir.stage_dir(name, config.data.train_split if role == "train" else split)
        )
        if manifest is not None:
            found[name] = manifest
    return found


def require_upstream(config: Config, run_dir: RunDir, stage: str, split: str) -> dict:
    """The manifest of a completed upstream ``stage``, made with the current config."""
    return require_manifest(
        stage_dir(run_dir, stage, split), stage, fingerprint(config, stage), split
    )


def locked(stage: str, sharded: bool = False):
    """Decorate a stage's ``run_*(ctx, split, ...)``: it runs holding the run directory's lock
    for ``stage`` and ``split`` (``locks.exclusive``), after deleting the temporary files a
    killed run left in the stage's folder.

    Under torchrun (``ctx.dist``), rank 0 takes the lock and cleans the folder, then every rank
    checks that it sees the run directory rank 0 writes to (``check_shared_run_dir``). A
    ``sharded`` stage runs on every rank, each on its share of the images (``split_todo``);
    any other runs on rank 0 alone while the others wait. No rank returns before rank 0 has
    finished (its manifest written), so the next stage starts from the same files everywhere.
    """

    def decorate(func):
        @functools.wraps(func)
        def run(ctx: StageContext, split: str, *args, **kwargs):
            what = f"{stage} (split {split}) in {ctx.run_dir.root}"
            dist = ctx.dist
            with exclusive(ctx.run_dir.lock_path(stage, split), what):
                if dist.is_main:  # another rank's file in the making is not stale
                    remove_stale_temporaries(ctx.run_dir.stage_dir(stage, split))
                check_shared_run_dir(dist, ctx.run_dir, stage, split)
                if sharded or dist.is_main:
                    started = time.perf_counter()
                    reset_peak_memory()
                    result = func(ctx, split, *args, **kwargs)
                    if dist.is_main:
                        record_stage(ctx.run_dir, stage, split, time.perf_counter() - started)
                else:
                    result = f"{stage}: rank {dist.rank} idle, rank 0 runs this stage"
                dist.wait_for_all()
                return result

        return run

    return decorate


def reset_peak_memory() -> None:
    """Start counting this process's peak resident memory afresh (Linux: writing 5 to
    /proc/self/clear_refs resets VmHWM); elsewhere the peak stays the process's."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mib() -> float:
    """This process's peak resident memory since ``reset_peak_memory``, MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def record_stage(run_dir: RunDir, stage: str, split: str, seconds: float) -> None:
    """Add a finished stage's seconds and peak memory to the run's ``timings.json`` (what the
    report shows); a run directory that cannot be written is left alone."""
    path = run_dir.timings_path
    try:
        timings = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        timings = {}  # a damaged report input is rebuilt, never fatal
    timings[f"{stage}/{split}"] = {
        "seconds": round(seconds, 3),
        "peak_rss_mib": round(peak_memory_mib(), 1),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    with contextlib.suppress(OSError, UserError):
        save_json(path, timings)


SHARED_CHECK_TRIES = 5  # reads of rank 0's token, a second apart (NFS may show a file late)


def check_shared_run_dir(dist: Dist, run_dir: RunDir, stage: str, split: str) -> None:
    """Refuse, on every rank, to run when the ranks do not share one run directory: rank 0
    writes a fresh token into it and every rank must read that token back. (Ranks writing to
    a local disk each would leave files where rank 0 never merges them.)"""
    if not dist.active:
        return
    path = run_dir.rank_token_path(stage, split)
    token = secrets.token_hex(8) if dist.is_main else ""
    if dist.is_main:
        atomic_write_text(path, token)
    token = dist.broadcast(token)  # rank 0 sends it after the file is written
    seen = _sees_token(path, token)
    blind = [rank for rank, ok in enumerate(dist.all_gather(seen)) if not ok]
    if blind:
        raise UserError(
            f"{path}: rank(s) {blind} do not see the token rank 0 just wrote there, so the ranks "
            f"do not share the run directory {run_dir.root}; put --run-dir on a file system "
            "that every node mounts (NFS or the like)"
        )


def _sees_token(path: Path, token: str) -> bool:
    for attempt in range(SHARED_CHECK_TRIES):
        try:
            if path.read_text() == token:
                return True
        except OSError:
            pass
        if attempt + 1 < SHARED_CHECK_TRIES:
            time.sleep(1.0)
    return False


def split_todo(
    dist: Dist,
    records: Sequence[ImageRecord],
    todo: Sequence[ImageRecord],
    sizes: dict[str, float] | None = None,
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """The items still to do as rank 0 sees them, and this rank's share of those.

    ``records`` (N,): the split; ``todo``: this rank's ``items_to_do``. Every rank must act on
    one list, and rank 0 may start writing before another rank has looked at the folder, so
    rank 0's list (by image id) is the one. The shares are balanced by ``sizes`` (image id →
    cost; the image area by default). One process: ``todo`` twice.
    """
    if not dist.active:
        return list(todo), list(todo)
    by_id = {record.image_id: record for record in records}
    agreed = [by_id[image_id] for image_id in dist.broadcast([r.image_id for r in todo])]
    costs = [sizes[r.image_id] if sizes else r.height * r.width for r in agreed]
    return agreed, dist.share(agreed, costs)


def wait_for_shares(
    dist: Dist, done: int, failures: dict[str, str] | None = None
) -> tuple[int, dict[str, str]]:
    """After this rank's share of a split: wait for every rank, however long the slowest one
    works. Returns the items done and the failures ({image id: reason}) of all ranks."""
    parts = dist.all_gather((done, dict(failures or {})), work=True)
    merged: dict[str, str] = {}
    for _, part in parts:
        merged.update(part)
    return sum(count for count, _ in parts), merged


def per_image(
    dist: Dist, records: list[ImageRecord], source: FeatureSource, fn: Callable, **progress
) -> Iterator:
    """``fn(record)`` of every record in order: one process reads the next image's maps while
    this one runs; under torchrun the ranks share the records (``map_in_order``) and only
    rank 0 gets the results."""
    from tqdm import tqdm

    from spp_detect.models.features import prefetching

    progress = {"total": len(records), "unit": "img", **progress}
    if not dist.active:
        return (fn(record) for record in tqdm(prefetching(source, records), **progress))
    return iter(tqdm(map_in_order(dist, records, fn), **progress))


def split_records(config: Config, split: str, limit: int | None = None) -> list[ImageRecord]:
    """The annotated images of ``split`` (VOC layout or COCO file, data.format), the first
    ``limit`` of them when given."""
    records, split_file, names = _read_split(config, split)
    if not records:
        raise UserError(f"{split_file}: no images")
    records = records[:limit] if limit else records
    if split == config.data.train_split and not any(len(r.gt_boxes) for r in records):
        raise UserError(
            f"{split_file}: no box of data.classes {list(config.data.classes)} in the "
            f"{len(records)} training images; set data.classes to the {names} "
            "(the log line above counts the others)"
        )
    return records


# Splits read by this process: key → (stamp, (records, split file, class-name source)).
_READ_SPLITS: dict[tuple, tuple[tuple, tuple[list[ImageRecord], Path, str]]] = {}


def _read_split(config: Config, split: str) -> tuple[list[ImageRecord], Path, str]:
    """The split's records, the file that lists them, and where its class names are.

    Read once per process: parsing 5,000 annotations and image headers takes seconds, and a
    stage reads its split again to close (``data_digest``), `run` once per stage. A later call
    reuses the records while every file they came from (split list or annotation file, each
    XML, each image) has the size and modification time it had (``_split_stamp``)."""
    data = config.data
    key = (data.format, str(Path(data.root).resolve()), data.annotations, split, data.classes)
    if key in _READ_SPLITS:
        stamp, found = _READ_SPLITS[key]
        if _split_stamp(config, found[0], found[1]) == stamp:
            return found
    found = _parse_split(config, split)
    _READ_SPLITS[key] = (_split_stamp(config, found[0], found[1]), found)
    return found


def _split_stamp(config: Config, records: list[ImageRecord], split_file: Path) -> tuple:
    """Size and modification time of every file a split's records were read from."""
    paths = [split_file, *(record.path for record in records)]
    if config.data.format != "coco":
        annotations = Path(config.data.root) / "Annotations"
        paths += [annotations / f"{record.image_id}.xml" for record in records]
    return tuple(file_identity(path) for path in paths)


def _parse_split(config: Config, split: str) -> tuple[list[ImageRecord], Path, str]:
    root = Path(config.data.root)
    if config.data.format == "coco":
        from spp_detect.data import coco

        path = coco.annotation_path(root, config.data.annotations, split)
        records = coco.read_split(root, path, split, config.data.classes)
        return records, path, f"category names of {path}"
    from spp_detect.data.voc import read_split

    records = read_split(root, split, config.data.classes)
    return records, root / "ImageSets/Main" / f"{split}.txt", f"<name>s of {root / 'Annotations'}"


def load_proposals(config: Config, run_dir: RunDir, split: str, record: ImageRecord) -> np.ndarray:
    """Proposal boxes (R, 4) float32 of one image, checked to come from this image and config;
    a missing or foreign file names the stage to run."""
    path = run_dir.proposal_path(split, record.image_id)
    rerun = f"run `spp-detect propose --split {split}`"
    if not path.is_file():
        raise UserError(f"{path}: no proposals for this image; {rerun}")
    arrays = load_npz(path)
    check_item(path, arrays, item_fingerprint(config, "propose", record), rerun)
    return arrays["boxes"].astype(np.float32, copy=False)


def check_item(path: Path, arrays: dict, expected: str, rerun: str) -> None:
    """Refuse a per-item file made from other inputs than the current ones (another dataset,
    image file, config or model): its stored fingerprint is checked on every read."""
    stored = str(arrays["fingerprint"]) if "fingerprint" in arrays else None
    if stored != expected:
        raise UserError(
            f"{path}: made from other inputs than this run's (dataset, image, config or model); "
            f"{rerun} to recompute it"
        )


def windows_of(record: ImageRecord, proposals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All windows of an image, gt first as in the original roidb.

    docs/method.md#conventions-and-box-format.

    Returns boxes (G + R, 4) float32 and is_gt (G + R,) bool.
    """
    boxes = np.concatenate([record.gt_boxes, proposals]).astype(np.float32, copy=False)
    is_gt = np.zeros(len(boxes), dtype=bool)
    is_gt[: len(record.gt_boxes)] = True
    return boxes, is_gt


@dataclass
class Summary:
    """A stage's one-line ending: items, time, bytes."""

    stage: str
    started: float = field(default_factory=time.perf_counter)
    items: int = 0
    bytes_written: int = 0
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        seconds = time.perf_counter() - self.started
        parts = [f"{self.stage}: {self.items} items in {seconds:.1f} s"]
        if self.items:
            parts.append(f"{seconds / self.items:.3f} s/item")
        if self.bytes_written:
            parts.append(f"{format_bytes(self.bytes_written)} written")
        return ", ".join(parts + self.notes)


def format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count:.1f} TiB"


def dir_bytes(paths: Sequence[Path]) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


def check_classes(manifest: dict, classes: tuple[str, ...], path: Path, stage: str) -> None:
    """Refuse an artefact trained for other classes than ``data.classes``."""
    saved = tuple(manifest.get("classes", classes))
    if saved != tuple(classes):
        raise UserError(
            f"{path}: trained for classes {list(saved)}, config has {list(classes)}; "
            f"rerun `spp-detect {stage} --force` or fix data.classes"
        )


def load_trained_head(config: Config, run_dir: RunDir, device: str, check_data: bool = True):
    """The fine-tuned head (eval mode, on ``device``), checked against the config and, with
    ``check_data``, against the training split's data now (``check_trained_on``)."""
    from spp_detect.models.head import load_head

    path = _trained_file(config, run_dir, "finetune", run_dir.head_path, check_data)
    return load_head(path, device)


def pool_geometry(config: Config, stride: int, offset0: float):
    """The ``features.PoolGeometry`` of a trunk's ``stride`` and ``offset0`` under ``spp``."""
    from spp_detect.models.features import PoolGeometry

    spp = config.spp
    return PoolGeometry(stride, offset0, spp.offset, tuple(spp.levels), spp.target_size)


def build_trunk(config: Config, run_dir: RunDir):
    """The conv trunk whose conv5 maps the later stages use: ``extract.backbone`` with
    ``extract.weights``, or, with ``finetune.conv_from``, the trunk fine-tuned end to end."""
    from spp_detect.models.backbones import build_backbone

    settings = config.extract
    log_trunk(config)
    if not config.finetune.conv_from:
        return build_backbone(settings.backbone, settings.weights, settings.last_stage)
    expected = trunk_digest(config, run_dir)
    if not run_dir.trunk_path.is_file() or file_digest(run_dir.trunk_path) != expected:
        raise UserError(
            f"{run_dir.trunk_path}: missing or not the trunk its finetune manifest names; rerun "
            "`spp-detect finetune --force`"
        )
    return build_backbone(settings.backbone, str(run_dir.trunk_path), settings.last_stage)


def trunk_digest(config: Config, run_dir: RunDir) -> str:
    """The digest of the fine-tuned trunk (``finetune/trunk.pt``); "" with frozen conv layers,
    whose trunk the config alone names."""
    if not config.finetune.conv_from:
        return ""
    manifest = require_upstream(config, run_dir, "finetune", config.data.train_split)
    return str(manifest.get("trunk_digest", ""))


def maps_origin(config: Config, run_dir: RunDir) -> str:
    """What conv5 maps come from besides the extract settings: the fine-tuned trunk's digest,
    the sha256 of a Lite trunk's packaged weights, or the size and modification time of a local
    ``extract.weights`` file (a file converted again under the same name makes the cached maps
    stale)."""
    digest = trunk_digest(config, run_dir)
    if digest:
        return digest
    return packaged_weights_digest(config.extract) or file_identity(Path(config.extract.weights))


RANDOM_TRUNK_NOTE = "RANDOM CONV WEIGHTS (extract.weights=none): not a real detector"


def trunk_provenance(config: Config) -> dict[str, Any]:
    """The trunk, its weights and where they came from: ``backbone``, ``last_stage``,
    ``weights``, ``source`` (words), ``random`` (bool); the run's provenance in
    ``eval/<split>.json``, the logs and the summaries."""
    from importlib.metadata import PackageNotFoundError, version

    from spp_detect.models.efficientnet_lite import VARIANTS

    extract = config.extract
    random = extract.weights.strip().lower() == "none"
    digest = packaged_weights_digest(extract)
    if random:
        source = "random, seeded"
    elif digest:
        package = VARIANTS[extract.backbone].package
        try:
            package += f" {version(package)}"
        except PackageNotFoundError:
            package += " (not installed)"
        source = f"ImageNet, from the {package} package (sha256 {digest[:12]}…)"
    elif Path(extract.weights).expanduser().is_file():
        source = f"the file {extract.weights}"
    else:
        source = f"torchvision {extract.weights} (torch hub cache)"
    if config.finetune.conv_from:
        source += f"; fine-tuned end to end from {config.finetune.conv_from}"
    return {
        "backbone": extract.backbone,
        "last_stage": extract.last_stage,
        "weights": extract.weights,
        "source": source,
        "random": random,
    }


def trunk_line(config: Config) -> str:
    """One line naming the trunk and its weights' origin (loud when they are random)."""
    trunk = trunk_provenance(config)
    name = trunk["backbone"] + (f" to {trunk['last_stage']}" if trunk["last_stage"] else "")
    if trunk["random"]:
        return f"trunk {name}: {RANDOM_TRUNK_NOTE}; for real detection use the defaults"
    return f"trunk {name}, weights: {trunk['source']}"


def log_trunk(config: Config) -> None:
    """Say which trunk a stage uses, once its inputs have passed their checks (a refused
    input stays one line)."""
    line = trunk_line(config)
    if config.extract.weights.strip().lower() == "none":
        logger.warning(line)
    else:
        logger.info(line)


def packaged_weights_digest(extract: ExtractConfig) -> str:
    """The published sha256 of the packaged weights ``extract`` names, else ""."""
    from spp_detect.models.backbones import PACKAGED_WEIGHTS
    from spp_detect.models.efficientnet_lite import VARIANTS

    variant = VARIANTS.get(extract.backbone)
    if variant is None or extract.weights.strip().lower() != PACKAGED_WEIGHTS:
        return ""
    return variant.sha256


def check_trunk(config: Config, run_dir: RunDir, manifest: dict, folder: Path, split: str) -> None:
    """Refuse conv5 maps (the extract ``manifest`` in ``folder``) made with another trunk than
    the one fine-tuned now: after end-to-end fine-tuning, an older cache is stale."""
    if manifest.get("trunk_digest", "") != trunk_digest(config, run_dir):
        raise UserError(
            f"{folder}: conv5 maps made with another conv trunk than the fine-tuned one "
            f"({run_dir.trunk_path}); rerun `spp-detect extract --split {split} --force`"
        )


def is_current(
    config: Config, run_dir: RunDir, stage: str, split: str, limit: int | None = None
) -> bool:
    """Whether ``stage`` has closed ``split`` with the current config and ``limit``, no file of
    its folder changed since, and every upstream output it read is still the one there now
    (make-like: a stage rerun upstream makes it stale)."""
    folder = run_dir.stage_dir(stage, split)
    manifest = read_manifest(folder)
    stage_fingerprint = fingerprint(config, stage)
    if manifest is None or manifest.get("fingerprint") != stage_fingerprint:
        return False
    if manifest.get("limit") != limit:
        return False
    if manifest.get("data") != data_digest(config, split, limit):
        return False
    if manifest.get("token") != folder_token(folder, stage_fingerprint):
        return False
    upstream = manifest.get("upstream", {})
    for name, current in _upstream_manifests(config, run_dir, stage, split).items():
        if upstream.get(name) != current.get("token"):
            return False
    return True


def open_feature_source(config: Config, run_dir: RunDir, split: str, device: str):
    """Conv5 maps of ``split`` as a ``features.FeatureSource``: the extract cache (its manifest
    checked) when ``extract.cache`` is disk, else a backbone that computes them on the fly."""
    from spp_detect.models.features import FeatureSource

    if config.extract.cache != "disk":
        return live_feature_source(config, run_dir, device)
    manifest = require_upstream(config, run_dir, "extract", split)
    origin = maps_origin(config, run_dir)
    check_trunk(config, run_dir, manifest, run_dir.features_dir(split), split)
    log_trunk(config)
    return FeatureSource(
        config.extract.scales,
        pool_geometry(config, int(manifest["stride"]), float(manifest["offset0"])),
        int(manifest["channels"]),
        device,
        cache_path=functools.partial(run_dir.feature_path, split),
        cache_fingerprint=functools.partial(item_fingerprint, config, "extract", model=origin),
        max_long_side=config.extract.max_long_side,
    )


def open_split(config: Config, run_dir: RunDir, split: str, limit: int | None, device: str):
    """The split's records and conv5 maps, after checking that its proposals are complete."""
    records = split_records(config, split, limit)
    require_upstream(config, run_dir, "propose", split)
    return records, open_feature_source(config, run_dir, split, device)


def live_feature_source(config: Config, run_dir: RunDir, device: str):
    """A ``features.FeatureSource`` that runs the trunk (``build_trunk``) on each image (no
    cache needed)."""
    from spp_detect.models.features import FeatureSource

    settings = config.extract
    backbone = build_trunk(config, run_dir)
    return FeatureSource(
        settings.scales,
        pool_geometry(config, backbone.stride, backbone.offset0),
        backbone.channels,
        device,
        backbone=backbone,
        max_long_side=settings.max_long_side,
        precision=settings.precision,
    )


def build_detector(config: Config, run_dir: RunDir, device: str, check_data: bool = True):
    """The run's trained head, SVMs and (when ``test.bbox_reg``) regressors as a
    ``detector.Detector`` with the config's test settings, each checked to be trained on
    ``data.train_split`` with the others (and, with ``check_data``, on its data as it is now:
    ``check_trained_on``)."""
    from spp_detect.models.detector import Detector
    from spp_detect.train.bbox_reg import BoxRegressors
    from spp_detect.train.svm import SvmModel

    head = load_trained_head(config, run_dir, device, check_data)
    svms = None
    if config.test.scorer == "svm":
        path = _trained_file(config, run_dir, "train-svm", run_dir.svm_path, check_data)
        svms = SvmModel.load(path)
    regressors = None
    if config.test.bbox_reg and config.test.regressor == "ridge":
        path = _trained_file(config, run_dir, "train-bbox", run_dir.bbox_path, check_data)
        regressors = BoxRegressors.load(path)
    return Detector(head, svms, regressors, detection_settings(config), device)


def _trained_file(
    config: Config, run_dir: RunDir, stage: str, path: Path, check_data: bool
) -> Path:
    """``path``, once checked against the manifest of the ``stage`` that trained it."""
    split = config.data.train_split
    manifest = require_upstream(config, run_dir, stage, split)
    check_classes(manifest, config.data.classes, path, stage)
    check_file(manifest, path, stage, split)
    check_trained_on(config, run_dir, stage, manifest, path, check_data)
    return path


TRAINED_STAGES = ("finetune", "train-svm", "train-bbox")  # the stages that write trained models


def check_trained_on(
    config: Config, run_dir: RunDir, stage: str, manifest: dict, path: Path, check_data: bool
) -> None:
    """Refuse a trained model (``path``, closed by ``stage``'s ``manifest``) that `run` would
    train again (``is_current``): trained on another split than ``data.train_split`` (e.g.
    ``train-svm --split test``), on another trained model than the run holds now (SVMs of a
    head fine-tuned again since) or, with ``check_data``, on the split's data before a change
    (images or annotations rewritten in place). `detect` and the Python API leave the data out:
    a trained run may travel without its dataset."""
    split = config.data.train_split
    rerun = f"rerun `spp-detect {stage} --split {split} --force`"
    if manifest.get("split") != split:
        raise UserError(
            f"{path}: trained on split {manifest.get('split')!r}, but data.train_split is "
            f"{split!r}; {rerun}"
        )
    for name, token in manifest.get("upstream", {}).items():
        current = read_manifest(run_dir.stage_dir(name, split)) or {}
        if name in TRAINED_STAGES and current.get("token") != token:
            raise UserError(
                f"{path}: trained with another {name} output than the one in {run_dir.root} now "
                f"(rerun since); {rerun}"
            )
    check_data_of(config, manifest, path, stage, split, check_data)


def check_data_of(
    config: Config, manifest: dict, path: Path, stage: str, split: str, check: bool = True
) -> None:
    """Refuse an output (``path``, closed by ``stage``'s ``manifest``) made from ``split``'s data
    as it was before a change: its images or annotations rewritten in place, as `run` finds
    with ``data_digest``."""
    if check and manifest.get("data") != data_digest(config, split, manifest.get("limit")):
        raise UserError(
            f"{path}: made from other data than split {split!r} holds now (images or annotations "
            f"changed since); rerun `spp-detect {stage} --split {split} --force`"
        )


def model_digest(config: Config, run_dir: RunDir) -> str:
    """A digest of every trained file the test stage's detector uses (head, and the SVMs,
    ridge regressors and fine-tuned trunk where they apply): per-image detections made with
    models trained since are recomputed."""
    paths = [run_dir.head_path]
    if config.test.scorer == "svm":
        paths.append(run_dir.svm_path)
    if config.test.bbox_reg and config.test.regressor == "ridge":
        paths.append(run_dir.bbox_path)
    if config.finetune.conv_from:
        paths.append(run_dir.trunk_path)
    digests = [file_digest(path) if path.is_file() else "" for path in paths]
    return hashlib.sha256("".join(digests).encode()).hexdigest()[:16]


def file_identity(path: Path) -> str:
    """Size and modification time of a file ("" when missing): names one version of it."""
    try:
        stat = path.stat()
    except OSError:
        return ""
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def detection_settings(config: Config):
    """The ``detector.DetectionSettings`` of ``config.test``."""
    from spp_detect.models.detector import DetectionSettings

    test = config.test
    softmax = test.scorer == "softmax"
    return DetectionSettings(
        score_thresh=test.softmax_thresh if softmax else test.score_thresh,
        nms_thresh=test.nms_thresh, max_per_class=test.max_per_class,
        batch_windows=test.batch_windows, precision=test.precision, scorer=test.scorer,
        head_boxes=test.bbox_reg and test.regressor == "head",
        fc_compression=test.fc_compression, svd_ranks=(test.svd_rank_fc6, test.svd_rank_fc7),
    )  # fmt: skip


def proposal_params(propose: ProposeConfig) -> dict[str, Any]:
    """Keyword arguments of :func:`proposals.propose_image` from the config section."""
    return {
        "method": propose.method,
        "mode": propose.mode,
        "base_k": propose.base_k,
        "inc_k": propose.inc_k,
        "sigma": propose.sigma,
        "edge_model": propose.edge_model or None,
        "edge_max_boxes": propose.edge_max_boxes,
        "max_side": propose.max_side,
        "min_size": propose.min_size,
        "max_per_image": propose.max_per_image,
    }
