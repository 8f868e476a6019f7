"""Running a stage under torchrun: which rank this process is, the process group, barriers, the
objects ranks exchange, and the split of a list of images across ranks.

Shapes: N items, W ranks (the world size).

torchrun (torch.distributed's elastic launcher) starts one process per rank and puts RANK,
LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE and the rendezvous address in its environment. Without
it (WORLD_SIZE unset or 1) nothing here touches torch.distributed: world 1, rank 0, every barrier
returns at once and every exchange gives back what it was given.

When a rank dies, torchrun's agent sends SIGTERM to the other ranks, and a peer that vanishes
mid-collective makes gloo raise. Both become :class:`RankStopped`, which the CLI prints as one
line; every file is written atomically, so a rerun resumes.

torch is imported inside the functions: the CLI imports this module for every command.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any, TypeVar

from spp_detect.errors import UserError

T = TypeVar("T")
R = TypeVar("R")

# How long a rank waits at a quick sync point (the run-directory check, rank 0's list of items)
# before it gives up on a hung peer: torch's own default. SPP_DETECT_DIST_TIMEOUT overrides it.
DEFAULT_TIMEOUT_S = 1800.0
TIMEOUT_ENV = "SPP_DETECT_DIST_TIMEOUT"
# Waits that last as long as the work (the slowest rank's shard, a stage rank 0 runs alone, such
# as hours of fine-tuning). A rank that dies is caught by torchrun and by closed sockets, not by
# this timeout, which only ends a wait on a rank that hangs forever.
WORK_TIMEOUT = timedelta(days=7)


class RankStopped(BaseException):
    """Another rank failed (or hung): this one stops. A BaseException, as KeyboardInterrupt, so
    that no ``except Exception`` on the way swallows it."""


@dataclass(frozen=True)
class Dist:
    """This process's place among the ranks of a torchrun job (world 1 without torchrun).

    ``groups`` holds the process groups once :func:`start` has joined them: ``sync`` (gloo,
    the quick-sync timeout) and ``work`` (gloo, WORK_TIMEOUT).
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    timeout_s: float = DEFAULT_TIMEOUT_S
    groups: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def active(self) -> bool:
        """Several ranks: the collectives below really communicate."""
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: takes the lock, writes manifests and merged files, logs."""
        return self.rank == 0

    def barrier(self) -> None:
        """Every rank reaches this point, within ``timeout_s``."""
        if self.active:
            _collective(lambda dist: dist.barrier(group=self.groups["sync"]))

    def wait_for_all(self) -> None:
        """Every rank reaches this point, however long the slowest one works (WORK_TIMEOUT)."""
        if self.active:
            _collective(lambda dist: dist.barrier(group=self.groups["work"]))

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (picklable)."""
        if not self.active:
            return obj
        box = [obj]
        _collective(lambda dist: dist.broadcast_object_list(box, src=0, group=self.groups["sync"]))
        return box[0]

    def all_gather(self, obj: T, work: bool = False) -> list[T]:
        """Every rank's ``obj`` (picklable), in rank order (W,), on every rank. ``work``: after
        a shard of work, so wait as long as the slowest rank needs."""
        if not self.active:
            return [obj]
        gathered: list[Any] = [None] * self.world
        group = self.groups["work" if work else "sync"]
        _collective(lambda dist: dist.all_gather_object(gathered, obj, group=group))
        return gathered

    def gather(self, obj: T) -> list[T] | None:
        """Every rank's ``obj`` (picklable) on rank 0, in rank order (W,); None on the others.
        Waits as long as the slowest rank works."""
        if not self.active:
            return [obj]
        gathered: list[Any] | None = [None] * self.world if self.is_main else None
        group = self.groups["work"]
        _collective(lambda dist: dist.gather_object(obj, gathered, dst=0, group=group))
        return gathered

    def all_reduce_sum(self, tensor: Any) -> Any:
        """``tensor`` summed over the ranks, in place; returns it. On the default group: gloo
        for CPU tensors, nccl for GPU ones; every rank gets the same bits."""
        if self.active:
            _collective(lambda dist: dist.all_reduce(tensor))
        return tensor

    def share(self, items: Sequence[T], sizes: Sequence[float]) -> list[T]:
        """This rank's part of ``items`` (N,), the parts balanced by ``sizes`` (N,), in the
        items' order (:func:`balanced_shards`)."""
        if not self.active:
            return list(items)
        return [items[i] for i in balanced_shards(sizes, self.world)[self.rank]]


def map_in_order(dist: Dist, items: Sequence[T], fn: Callable[[T], R]) -> Iterator[R]:
    """``fn(item)`` of every item (N,), yielded on rank 0 in the items' order, computed by all
    the ranks: in rounds of W items, item i by rank i mod W, each round gathered on rank 0.
    The other ranks yield nothing (iterate to the end all the same: that is where they work).
    One process: ``map(fn, items)``.

    For a sequential consumer on rank 0 (hard-negative mining) fed by costly per-item work.
    """
    if not dist.active:
        yield from map(fn, items)
        return
    for start in range(0, len(items), dist.world):
        batch = items[start : start + dist.world]
        mine = fn(batch[dist.rank]) if dist.rank < len(batch) else None
        gathered = dist.gather(mine)
        if gathered is not None:
            yield from gathered[: len(batch)]


def from_env(env: Mapping[str, str] = os.environ) -> Dist:
    """The rank and world that torchrun put in ``env``; world 1 when it is absent or 1."""
    world = _int_var(env, "WORLD_SIZE", 1)
    if world <= 1:
        return Dist()
    if "RANK" not in env:
        raise UserError(f"WORLD_SIZE is {world} but RANK is not set; launch with torchrun")
    return Dist(
        rank=_int_var(env, "RANK", 0),
        world=world,
        local_rank=_int_var(env, "LOCAL_RANK", 0),
        local_world=_int_var(env, "LOCAL_WORLD_SIZE", 1),
        timeout_s=float(env.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)),
    )


def _int_var(env: Mapping[str, str], name: str, default: int) -> int:
    try:
        return int(env.get(name, default))
    except ValueError:
        raise UserError(f"{name}={env[name]!r}: not an integer; launch with torchrun") from None


def start(dist: Dist, device: str) -> Dist:
    """Join the process group (nccl when ``device`` is a GPU, gloo on the CPU) and make SIGTERM
    stop this rank cleanly; returns ``dist`` with its groups. World 1: ``dist`` unchanged."""
    if not dist.active:
        return dist
    import torch
    import torch.distributed as torch_dist

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(torch.device(device))
    sync_timeout = timedelta(seconds=dist.timeout_s)
    try:
        torch_dist.init_process_group("nccl" if cuda else "gloo", timeout=sync_timeout)
        # barriers and exchanges of Python objects run on gloo groups, on the CPU, with or
        # without nccl: they need no GPU memory and gloo honours their timeouts
        groups = {
            "sync": torch_dist.new_group(backend="gloo", timeout=sync_timeout),
            "work": torch_dist.new_group(backend="gloo", timeout=WORK_TIMEOUT),
        }
    except (RuntimeError, ValueError) as exc:
        raise UserError(
            f"rank {dist.rank}: could not join the other ranks: {_first_line(exc)}"
        ) from None
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    return replace(dist, groups=groups)


def stop(dist: Dist) -> None:
    """Leave the process group after a successful command (every rank has synchronised)."""
    if dist.active:
        import torch.distributed as torch_dist

        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    # torchrun's agent sends SIGTERM to every rank when one of them fails
    raise RankStopped("another rank failed")


def _collective(call: Callable[[Any], Any]) -> Any:
    """Run ``call(torch.distributed)``; a peer that died or timed out becomes RankStopped."""
    import torch.distributed as torch_dist

    try:
        return call(torch_dist)
    except RuntimeError as exc:  # DistError and gloo's errors are RuntimeErrors
        raise RankStopped(f"lost another rank ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def balanced_shards(sizes: Sequence[float], world: int) -> list[list[int]]:
    """Indices of ``sizes`` (N,) split into ``world`` lists of about equal total size.

    Greedy (longest processing time first): items from the largest down, each to the rank with
    the least total so far; ties go to the lower index and the lower rank, so every rank
    computes the same split. Each list is in index order.
    """
    loads = [0.0] * world
    shards: list[list[int]] = [[] for _ in range(world)]
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        shards[rank].append(index)
        loads[rank] += sizes[index]
    return [sorted(shard) for shard in shards]
