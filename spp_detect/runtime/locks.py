"""One writer per run directory and stage: an advisory ``fcntl.flock`` on a lock file.

Two processes writing the same stage of one run directory would leave files of mixed origin
under one manifest. The second one stops instead, naming the first. The kernel drops the lock
when its holder exits, killed or not, so a crash never leaves a stale lock behind.

Under ``torchrun`` every rank runs the stage: only rank 0 (``RANK`` unset or 0) takes the lock,
which then stands for the whole job.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from spp_detect.errors import UserError
from spp_detect.runtime.artifacts import is_write_error, write_error


@contextmanager
def exclusive(lock_path: Path, what: str) -> Iterator[None]:
    """Hold ``lock_path`` for the block; a :class:`UserError` naming the holder if another
    process has it. ``what`` says what the lock guards (for the message)."""
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    handle = _open(lock_path)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = Path(lock_path).read_text().strip() or "another process"
            raise UserError(
                f"{lock_path}: {holder} is already writing {what}; wait for it to end, or use "
                "another --run-dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"spp-detect (pid {os.getpid()} on {socket.gethostname()})")
        handle.flush()
        yield
    finally:
        handle.close()  # closing releases the lock


def _open(lock_path: Path):
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        return open(lock_path, "a+")
    except OSError as exc:
        if is_write_error(exc):
            raise write_error(lock_path, exc) from None
        raise
