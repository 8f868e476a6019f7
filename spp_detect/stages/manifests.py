"""Manifests: what closes a stage, and the checks of the upstream outputs a stage reads
(docs/contracts.md#resuming-and-fingerprints).

A stage folder ends with ``manifest.json``, written last; `run` compares it to decide whether
the stage is still current (``is_current``), and every reader refuses an upstream output made
with another config, split, data, model or trunk than the one it works with now, with one line
naming the stage to rerun.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from spp_detect._version import __version__
from spp_detect.config import Config
from spp_detect.errors import UserError
from spp_detect.runtime.artifacts import file_identity, load_json, save_json
from spp_detect.runtime.run_dir import RunDir
from spp_detect.stages.context import StageContext
from spp_detect.stages.provenance import (
    data_digest,
    file_digest,
    folder_token,
    packaged_weights_digest,
    stage_fingerprint,
)

MANIFEST = "manifest.json"


def write_manifest(
    stage_dir: str | Path,
    stage: str,
    split: str | None,
    count: int,
    fingerprint: str,
    upstream: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Close a stage: written last, so its presence means every item before it is complete.

    ``token`` names this exact output: the config fingerprint and every file of the folder
    (:func:`folder_token`); a later stage records the tokens it read (``upstream``), so a rerun
    upstream, or a file changed after the manifest, shows.
    """
    manifest = {
        "stage": stage,
        "split": split,
        "count": count,
        "fingerprint": fingerprint,
        "token": folder_token(stage_dir, fingerprint),
        "upstream": dict(upstream or {}),
        "version": __version__,
        **dict(extra or {}),
    }
    save_json(Path(stage_dir) / MANIFEST, manifest)


def read_manifest(stage_dir: str | Path) -> dict[str, Any] | None:
    path = Path(stage_dir) / MANIFEST
    return load_json(path) if path.is_file() else None


def require_manifest(
    stage_dir: str | Path, stage: str, fingerprint: str, split: str | None = None
) -> dict[str, Any]:
    """The upstream manifest, or a :class:`UserError` naming the stage to (re)run."""
    manifest = read_manifest(stage_dir)
    if manifest is None:
        raise UserError(
            f"{stage_dir}: no completed '{stage}' output; "
            f"run `spp-detect {stage}{_split_option(split)}` first"
        )
    if manifest.get("fingerprint") != fingerprint:
        raise UserError(
            f"{Path(stage_dir) / MANIFEST}: made with a different config than the current one; "
            f"rerun `spp-detect {stage}{_split_option(split)} --force` or use another --run-dir"
        )
    return manifest


def _split_option(split: str | None) -> str:
    return f" --split {split}" if split else ""


def clear_manifest(stage_dir: str | Path) -> None:
    """Mark a stage as incomplete before it starts writing."""
    # missing_ok: under torchrun every rank clears it, concurrently
    (Path(stage_dir) / MANIFEST).unlink(missing_ok=True)


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
        folder or run_dir.stage_dir(stage, split), stage, split, count,
        stage_fingerprint(config, stage),
        upstream=upstream, extra=extra,
    )  # fmt: skip


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
        run_dir.stage_dir(stage, split), stage, stage_fingerprint(config, stage), split
    )


def is_current(
    config: Config, run_dir: RunDir, stage: str, split: str, limit: int | None = None
) -> bool:
    """Whether ``stage`` has closed ``split`` with the current config and ``limit``, no file of
    its folder changed since, and every upstream output it read is still the one there now
    (make-like: a stage rerun upstream makes it stale)."""
    folder = run_dir.stage_dir(stage, split)
    manifest = read_manifest(folder)
    expected = stage_fingerprint(config, stage)
    if manifest is None or manifest.get("fingerprint") != expected:
        return False
    if manifest.get("limit") != limit:
        return False
    if manifest.get("data") != data_digest(config, split, limit):
        return False
    if manifest.get("token") != folder_token(folder, expected):
        return False
    upstream = manifest.get("upstream", {})
    for name, current in _upstream_manifests(config, run_dir, stage, split).items():
        if upstream.get(name) != current.get("token"):
            return False
    return True


def check_file(manifest: dict, path: Path, stage: str, split: str) -> None:
    """Refuse a trained file whose content is not the one its ``stage`` manifest recorded
    (corrupted, or replaced by another run's since the stage closed)."""
    expected = manifest.get("digests", {}).get(path.name)
    if expected is None or not path.is_file() or file_digest(path) != expected:
        raise UserError(
            f"{path}: missing, or not the file its {stage} manifest names (changed or replaced "
            f"since); rerun `spp-detect {stage} --split {split} --force`"
        )


def check_classes(manifest: dict, classes: tuple[str, ...], path: Path, stage: str) -> None:
    """Refuse an artefact trained for other classes than ``data.classes``."""
    saved = tuple(manifest.get("classes", classes))
    if saved != tuple(classes):
        raise UserError(
            f"{path}: trained for classes {list(saved)}, config has {list(classes)}; "
            f"rerun `spp-detect {stage} --force` or fix data.classes"
        )


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
        if name not in TRAINED_STAGES:  # proposals and maps: their own checks when read
            continue
        if (read_manifest(run_dir.stage_dir(name, split)) or {}).get("token") != token:
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


def check_item(path: Path, arrays: dict, expected: str, rerun: str) -> None:
    """Refuse a per-item file made from other inputs than the current ones (another dataset,
    image file, config or model): its stored fingerprint is checked on every read."""
    stored = str(arrays["fingerprint"]) if "fingerprint" in arrays else None
    if stored != expected:
        raise UserError(
            f"{path}: made from other inputs than this run's (dataset, image, config or model); "
            f"{rerun} to recompute it"
        )


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


def check_trunk(config: Config, run_dir: RunDir, manifest: dict, folder: Path, split: str) -> None:
    """Refuse conv5 maps (the extract ``manifest`` in ``folder``) made with another trunk than
    the one fine-tuned now: after end-to-end fine-tuning, an older cache is stale."""
    if manifest.get("trunk_digest", "") != trunk_digest(config, run_dir):
        raise UserError(
            f"{folder}: conv5 maps made with another conv trunk than the fine-tuned one "
            f"({run_dir.trunk_path}); rerun `spp-detect extract --split {split} --force`"
        )
