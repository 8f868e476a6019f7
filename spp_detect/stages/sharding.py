"""Running a stage on every rank under torchrun: the check that the ranks share one run
directory, each rank's share of a split's images, and the wait for the slowest share
(docs/contracts.md, "Under torchrun").

torch is imported inside the functions: the propose stage's worker processes import the stages
and must not pay for it.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from spp_detect.errors import UserError
from spp_detect.runtime.artifacts import atomic_write_text
from spp_detect.runtime.distributed import Dist, map_in_order
from spp_detect.runtime.run_dir import RunDir
from spp_detect.structures import ImageRecord

if TYPE_CHECKING:
    from spp_detect.models.features import FeatureSource


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
