"""Atomic saving and strict loading of artefacts, and the manifests that close each stage.

Every write goes to a temporary file in the same folder and is moved into place with
``os.replace``, so a killed process never leaves a file that looks complete. Arrays are ``.npz``
loaded with ``allow_pickle=False``; weights are ``.pt`` loaded with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from spp_detect import __version__
from spp_detect.errors import UserError

MANIFEST = "manifest.json"


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _default_file_mode()


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _FILE_MODE)  # mkstemp creates 0600; artefacts get the usual umask mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_npz(path: str | Path, compress: bool = False, **arrays: Any) -> None:
    """Write arrays to ``path`` atomically (``path`` must end in ``.npz``)."""
    for name, array in arrays.items():
        if np.asarray(array).dtype.hasobject:  # np.savez would pickle these silently
            raise ValueError(f"{name}: object arrays need pickle; store plain numeric/str arrays")
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        (np.savez_compressed if compress else np.savez)(handle, **arrays)


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz``, read eagerly; a corrupt or missing file is a ``UserError``."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except Exception as exc:  # numpy/zipfile/zlib/tokenize raise many types for a corrupt file
        raise UserError(f"{path}: unreadable ({exc}); delete it and rerun the stage") from None


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
    return digest.hexdigest()[:16]


def save_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def load_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable JSON ({exc}); delete it and rerun the stage") from None


def save_torch(path: str | Path, obj: Any) -> None:
    """Save tensors (nested dicts/lists of tensors and plain values) atomically."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_torch(path: str | Path, map_location: str = "cpu") -> Any:
    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        raise UserError(f"{path}: unreadable ({type(exc).__name__}); delete it and rerun") from None


def write_manifest(
    stage_dir: str | Path,
    stage: str,
    split: str | None,
    count: int,
    fingerprint: str,
    upstream: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Close a stage: written last, so its presence means every item before it is complete."""
    manifest = {
        "stage": stage,
        "split": split,
        "count": count,
        "fingerprint": fingerprint,
        "upstream": dict(upstream or {}),
        "version": __version__,
        **dict(extra or {}),
    }
    save_json(Path(stage_dir) / MANIFEST, manifest)


def read_manifest(stage_dir: str | Path) -> dict[str, Any] | None:
    path = Path(stage_dir) / MANIFEST
    return load_json(path) if path.is_file() else None


def require_manifest(stage_dir: str | Path, stage: str, fingerprint: str) -> dict[str, Any]:
    """The upstream manifest, or a :class:`UserError` naming the stage to (re)run."""
    manifest = read_manifest(stage_dir)
    if manifest is None:
        raise UserError(
            f"{stage_dir}: no completed '{stage}' output; run `spp-detect {stage}` first"
        )
    if manifest.get("fingerprint") != fingerprint:
        raise UserError(
            f"{Path(stage_dir) / MANIFEST}: made with a different config than the current one; "
            f"rerun `spp-detect {stage} --force` or use another --run-dir"
        )
    return manifest


def clear_manifest(stage_dir: str | Path) -> None:
    """Mark a stage as incomplete before it starts writing."""
    path = Path(stage_dir) / MANIFEST
    if path.exists():
        path.unlink()
