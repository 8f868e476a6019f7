"""A crash-tolerant pool of worker processes for per-image jobs.

Each job runs in a spawned worker process (OpenCV single-threaded in each), so a job on which
native code crashes its process costs only that job: the pool is restarted, the jobs that were in
flight with it are retried one at a time, and one that crashes alone is reported as failed.
A job is any picklable object with ``image_id`` and ``image_path`` attributes; the job function
must be a module-level function (it is pickled to the workers).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Protocol

from tqdm import tqdm

logger = logging.getLogger(__name__)

MAX_REASON_CHARS = 300  # native errors span many lines; keep one short line per job
# spawn: a fresh interpreter per worker, safe whatever threads the parent runs (torch, OpenCV)
# and the same on Linux, macOS and Windows.
MP_START_METHOD = "spawn"
PARENT_POLL_SECONDS = 1.0  # how often a worker checks that the parent process is still alive


class Job(Protocol):
    image_id: str
    image_path: str


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # parallelism comes from the processes
    # Ctrl-C reaches the whole process group: the parent stops the pool, workers finish the
    # image in hand (each written atomically) instead of printing tracebacks.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A killed stage (SIGKILL, SIGTERM) would leave its workers blocked on the job queue forever.
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()


def _exit_with_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_SECONDS)
    os._exit(1)


def _guarded(job_fn: Callable[[Any], Any], job: Job) -> tuple[bool, Any]:
    """Run ``job_fn`` in a worker; a Python exception becomes (False, one-line reason)."""
    try:
        return True, job_fn(job)
    except Exception as exc:  # OpenCV raises cv2.error; any failure is one image's failure
        reason = " ".join(str(exc).split()) or type(exc).__name__
        return False, f"{type(exc).__name__}: {reason}"[:MAX_REASON_CHARS]


def run_jobs(
    jobs: Iterable[Job],
    workers: int,
    job_fn: Callable[[Any], Any],
    desc: str = "jobs",
) -> dict[str, str]:
    """Run ``job_fn`` on every job in ``workers`` processes; returns {image_id: failure reason}.

    ``job_fn`` must be a module-level function (it is pickled to spawned workers). When a worker
    process dies, every job in flight with it is retried alone in a fresh pool; a job that kills
    its worker while alone is reported as failed and the others carry on.
    """
    waiting = deque(jobs)
    suspects: deque[Job] = deque()  # in flight when a worker died: retried one at a time
    failures: dict[str, str] = {}
    context = multiprocessing.get_context(MP_START_METHOD)
    with tqdm(total=len(waiting), desc=desc, unit="img") as bar:

        def finish(job: Job, outcome: tuple[bool, Any]) -> None:
            ok, value = outcome
            if not ok:
                failures[job.image_id] = str(value)
                logger.warning("%s: %s", job.image_path, value)
            bar.update(1)

        while waiting or suspects:
            # suspects get a one-process pool of their own; the rest a full one
            queue = suspects if suspects else waiting
            num_workers = 1 if suspects else max(1, min(workers, len(waiting)))
            with ProcessPoolExecutor(
                num_workers, mp_context=context, initializer=_init_worker
            ) as pool:
                lost = _drain(pool, num_workers, queue, job_fn, finish)
            if len(lost) == 1:
                finish(
                    lost[0],
                    (False, "the worker process crashed on this image (e.g. inside OpenCV)"),
                )
            else:
                suspects.extend(lost)
    return failures


def _drain(
    pool: ProcessPoolExecutor,
    num_workers: int,
    queue: deque[Job],
    job_fn: Callable[[Any], Any],
    finish: Callable[[Job, tuple[bool, Any]], None],
) -> list[Job]:
    """Feed ``pool`` from ``queue`` until it is empty or a worker dies; returns the jobs lost.

    At most ``num_workers`` jobs are in flight; the lost ones are those in flight at the crash.
    """
    in_flight: dict[Future, Job] = {}
    while queue or in_flight:
        while queue and len(in_flight) < num_workers:
            job = queue.popleft()
            in_flight[pool.submit(_guarded, job_fn, job)] = job
        done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
        broken = False
        for future in done:
            job = in_flight.pop(future)
            try:
                finish(job, future.result())
            except BrokenProcessPool:
                in_flight[future] = job
                broken = True
        if broken:
            return _collect_lost(in_flight, finish)
    return []


def _collect_lost(
    in_flight: dict[Future, Job],
    finish: Callable[[Job, tuple[bool, Any]], None],
) -> list[Job]:
    """After a worker died: finish the jobs that completed anyway, return the others."""
    wait(in_flight)  # the executor fails every pending future once the pool is broken
    lost = []
    for future, job in in_flight.items():
        if future.exception() is None:
            finish(job, future.result())
        else:
            lost.append(job)
    return lost
