"""Atomic saving and strict loading of artefacts (the manifests that close each stage are
``stages/manifests.py``'s, their digests ``stages/provenance.py``'s).

Every write goes to a temporary file in the same folder and is moved into place with
``os.replace``, so a killed process never leaves a file that looks complete. Arrays are ``.npz``
loaded with ``allow_pickle=False``; weights are ``.pt`` loaded with ``weights_only=True``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from spp_detect.errors import UserError


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _default_file_mode()


# Write failures a user can fix, each with the fix; anything else stays a bug with a traceback.
WRITE_ERRORS = {
    errno.ENOSPC: "the disk is full; free space or use another --run-dir",
    errno.EDQUOT: "the disk quota is exceeded; free space or use another --run-dir",
    errno.EROFS: "the file system is read-only; use another --run-dir",
    errno.EACCES: "permission denied; fix the folder's permissions or use another --run-dir",
    errno.EPERM: "operation not permitted; fix the folder's permissions or use another --run-dir",
    errno.EIO: "the disk reported an I/O error; check the device, then rerun to resume",
    errno.ENOTDIR: "a part of that path is a file, not a folder; use another --run-dir or --out",
    errno.ENAMETOOLONG: (
        "a name in that path is longer than the file system allows; use a shorter --run-dir or "
        "--out, or shorter image ids"
    ),
}


def write_error(path: str | Path, exc: OSError, needed: int | None = None) -> UserError:
    """One line for a failed write of ``path``: what failed, the bytes it needed where known,
    the space left and the fix."""
    reason = WRITE_ERRORS.get(exc.errno or 0, exc.strerror or str(exc))
    parts = [f"{path}: could not write ({exc.strerror or exc})"]
    if needed is not None:
        parts.append(f"needed {needed:,} bytes")
    free = free_bytes(Path(path).parent)
    if free is not None:
        parts.append(f"{free:,} bytes free")
    return UserError(f"{', '.join(parts)}; {reason}")


def free_bytes(folder: Path) -> int | None:
    """Free bytes on the file system of ``folder`` (or its nearest existing parent)."""
    for candidate in (folder, *folder.parents):
        try:
            if candidate.is_dir():
                return shutil.disk_usage(candidate).free
        except OSError:  # a name too long, or no access: no figure
            return None
    return None


def check_free_space(folder: Path, needed: int, what: str) -> None:
    """Refuse to start writing ``needed`` bytes of ``what`` under ``folder`` when the file system
    has less free: better one line now than a full disk hours later."""
    free = free_bytes(folder)
    if free is not None and free < needed:
        raise UserError(
            f"{folder}: {what} needs about {needed:,} bytes, {free:,} are free; free space or "
            "use another --run-dir"
        )


def is_write_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in WRITE_ERRORS


@contextmanager
def atomic_path(path: str | Path, needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds.

    A write error (full disk, read-only or forbidden folder, I/O error) becomes one
    :class:`UserError` naming ``path`` (and ``needed`` bytes when the caller knows them); the
    temporary file is removed either way, so nothing half-written stays.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temporary_prefix(path), suffix=".tmp")
        os.close(fd)
        yield Path(tmp)
        os.chmod(tmp, _FILE_MODE)  # mkstemp creates 0600; artefacts get the usual umask mode
        os.replace(tmp, path)
    except OSError as exc:
        if is_write_error(exc):
            raise write_error(path, exc, needed) from None
        raise
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


# The temporary name adds 14 bytes to the file's (".", ".", 8 random characters, ".tmp"): a
# file name of up to 255 bytes (Linux's NAME_MAX), such as a long image id's <id>.npz, keeps
# only its first 200 bytes in it.
TEMPORARY_NAME_BYTES = 200


def _temporary_prefix(path: Path) -> str:
    name = path.name.encode()[:TEMPORARY_NAME_BYTES].decode(errors="ignore")
    return f".{name}."


def remove_stale_temporaries(folder: Path) -> int:
    """Delete the temporary files (``.<name>.*.tmp``, see :func:`atomic_path`) that a killed
    process left in ``folder``; only safe while holding the folder's stage lock. Returns the
    count."""
    removed = 0
    for stale in folder.glob(".*.tmp") if folder.is_dir() else ():
        stale.unlink(missing_ok=True)
        removed += 1
    return removed


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_npz(path: str | Path, compress: bool = False, **arrays: Any) -> None:
    """Write arrays to ``path`` atomically (``path`` must end in ``.npz``)."""
    for name, array in arrays.items():
        if np.asarray(array).dtype.hasobject:  # np.savez would pickle these silently
            raise ValueError(f"{name}: object arrays need pickle; store plain numeric/str arrays")
    needed = sum(np.asarray(array).nbytes for array in arrays.values())
    with atomic_path(path, needed) as tmp, open(tmp, "wb") as handle:
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
        raise UserError(
            f"{path}: unreadable ({short_reason(exc)}); delete it and rerun the stage"
        ) from None


def short_reason(exc: Exception) -> str:
    """The first sentence of a loader's message: numpy's own advice (to load with pickle
    enabled) is wrong for a damaged artefact."""
    text = str(exc).split(". ")[0].split("\n")[0].strip()
    return text or type(exc).__name__


def file_identity(path: str | Path) -> str:
    """Size and modification time of a file ("" when missing): names one version of it."""
    try:
        stat = Path(path).stat()
    except OSError:
        return ""
    return f"{stat.st_size}:{stat.st_mtime_ns}"


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

    needed = tensor_bytes(obj)
    with atomic_path(path, needed) as tmp:
        try:
            # through a handle: torch names the archive inside after a path's file name, and
            # the temporary name is random, so the same tensors would give other bytes
            with open(tmp, "wb") as handle:
                torch.save(obj, handle)
        except RuntimeError as exc:
            if not _TORCH_WRITE_FAILURE.search(str(exc)):
                raise
            # torch's writer hides the errno ("basic_ios::clear: iostream error")
            free = free_bytes(tmp.parent) or 0
            code = errno.ENOSPC if free < max(needed, _LOW_SPACE) else errno.EIO
            raise OSError(code, os.strerror(code)) from None


# torch's writer: "basic_ios::clear: iostream error", "failed writing file", and a full disk
# mid-archive: "[enforce fail at inline_container.cc] . unexpected pos N vs M"
_TORCH_WRITE_FAILURE = re.compile(r"iostream|write|unexpected pos|inline_container", re.IGNORECASE)
_LOW_SPACE = 1 << 20  # bytes: below this a failed write is taken for a full disk


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested dict/list (the size a checkpoint needs, about)."""
    if hasattr(obj, "element_size") and hasattr(obj, "nelement"):
        return obj.element_size() * obj.nelement()
    if isinstance(obj, Mapping):
        return sum(tensor_bytes(value) for value in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(value) for value in obj)
    return 0


def load_torch(path: str | Path, map_location: str = "cpu") -> Any:
    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        raise UserError(f"{path}: unreadable ({type(exc).__name__}); delete it and rerun") from None
