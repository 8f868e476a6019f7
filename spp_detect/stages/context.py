"""What every stage gets and gives: the command-line context, the lock a stage runs under, the
record of its time and memory, its one-line summary, and the split's records.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from spp_detect.config import Config
from spp_detect.data.splits import read_split
from spp_detect.errors import UserError
from spp_detect.runtime.artifacts import remove_stale_temporaries, save_json
from spp_detect.runtime.distributed import Dist
from spp_detect.runtime.locks import exclusive
from spp_detect.runtime.run_dir import RunDir
from spp_detect.stages.sharding import check_shared_run_dir
from spp_detect.structures import ImageRecord


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


def split_records(config: Config, split: str, limit: int | None = None) -> list[ImageRecord]:
    """The annotated images of ``split`` (VOC layout or COCO file, data.format), the first
    ``limit`` of them when given."""
    data = config.data
    records, listing, class_names_from = read_split(
        data.format, data.root, data.annotations, split, data.classes
    )
    if not records:
        raise UserError(f"{listing}: no images")
    records = records[:limit] if limit else records
    if split == data.train_split and not any(len(r.gt_boxes) for r in records):
        raise UserError(
            f"{listing}: no box of data.classes {list(data.classes)} in the "
            f"{len(records)} training images; set data.classes to the {class_names_from} "
            "(the log line above counts the others)"
        )
    return records
