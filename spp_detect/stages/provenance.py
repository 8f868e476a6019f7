"""Every fingerprint and digest that decides whether an output is still current
(docs/contracts.md#resuming-and-fingerprints), and where the trunk's weights came from.

* A stage's fingerprint: the config sections its output depends on (``STAGE_SECTIONS``).
* A per-item file's fingerprint: its sections (``ITEM_SECTIONS``), the dataset, the image file
  and the trained model it was made with (``item_fingerprint``).
* A split's data digest, the digest of a trained file and of the test stage's models, and a
  stage folder's token (every artefact's name, size and modification time).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from spp_detect.config import Config, ExtractConfig
from spp_detect.errors import UserError
from spp_detect.runtime.run_dir import RunDir
from spp_detect.stages.context import split_records
from spp_detect.structures import ImageRecord

logger = logging.getLogger(__name__)

DIGEST_CHARS = 16  # hex digits kept of a SHA-256: short to read, and no two versions share one


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


def short_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:DIGEST_CHARS]


def sections_fingerprint(config: Config, *sections: str) -> str:
    """A digest of the named config sections (in any order; the config's name left out)."""
    values = config.to_dict()
    return short_digest(json.dumps({s: values[s] for s in sections}, sort_keys=True))


def stage_fingerprint(config: Config, stage: str) -> str:
    """The fingerprint of a stage's manifest: every config section its output depends on
    (train-bbox's pool5 also depends on the fine-tuning when it trains the conv layers)."""
    sections = STAGE_SECTIONS[stage]
    if stage == "train-bbox" and config.finetune.conv_from:
        sections = (*sections, "finetune")
    return sections_fingerprint(config, *sections)


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
        sections_fingerprint(config, *ITEM_SECTIONS[stage]),
        str(Path(config.data.root).resolve()),
        record.image_id,
        stat.st_size,
        stat.st_mtime_ns,
        model,
    ]
    return short_digest(json.dumps(payload))


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
    return digest.hexdigest()[:DIGEST_CHARS]


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
    return short_digest("".join(digests))


def stored_fingerprint(path: str | Path) -> str | None:
    """The ``fingerprint`` key of a per-item ``.npz``; None when absent, missing or damaged.

    Per-item files carry the fingerprint of the config that made them, so a resumed stage
    recomputes the items made with another config instead of mixing them in.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            return str(data["fingerprint"]) if "fingerprint" in data.files else None
    except Exception:  # missing or damaged: the item is simply computed again
        return None


def file_digest(path: str | Path) -> str:
    """Short SHA-256 of a file's bytes: names a saved model's content, so an artefact made from
    it can tell when the model was trained again."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:DIGEST_CHARS]


# What later stages read: arrays and weights. Reports (JSON, PNG, devkit text) are for people
# and may be rewritten alone (`propose --report`) without making anything downstream stale.
TOKEN_SUFFIXES = (".npz", ".pt")


def folder_token(stage_dir: str | Path, fingerprint: str) -> str:
    """A digest of ``fingerprint`` and the name, size and modification time of every artefact
    (``TOKEN_SUFFIXES``) in ``stage_dir``: changes whenever one is rewritten."""
    folder = Path(stage_dir)
    entries = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else ():
        if path.suffix in TOKEN_SUFFIXES and not path.name.startswith(".") and path.is_file():
            stat = path.stat()
            entries.append((path.name, stat.st_size, stat.st_mtime_ns))
    return short_digest(json.dumps([fingerprint, entries]))


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
    from spp_detect.models.efficientnet_lite import VARIANTS
    from spp_detect.models.weights import PACKAGED_WEIGHTS

    variant = VARIANTS.get(extract.backbone)
    if variant is None or extract.weights.strip().lower() != PACKAGED_WEIGHTS:
        return ""
    return variant.sha256
