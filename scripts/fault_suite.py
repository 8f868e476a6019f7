"""Fault-injection suite of the reliability issue (#18), on the toy dataset, through the CLI.

Every check runs `spp-detect` in subprocesses, as a user would, and compares what is left on
disk with an uninterrupted reference run:

1. **kill -9**: each of the 7 stages killed (its whole process group) at seeded random times
   inside its measured duration (from taking its lock to its exit), then rerun with the same
   command; the stage's artefacts must equal the reference (arrays with ``np.array_equal``,
   tensors with ``torch.equal``, JSON apart from timing fields and the mtime-based manifest
   ``token``), and no temporary file may stay.
2. **corruption**: one file of each artefact kind truncated, overwritten with garbage, or with
   a few bytes inverted (bit rot); the next stage that reads it must stop with exit 2 and one
   ``error:`` line (not numpy's advice to load it with pickle), or recompute it.
3. **stale data**: another dataset with the same ids, the dataset regenerated in place, a
   config change, two writers at once, and files replaced by ones of other origin. A "silent"
   case (exit 0 with results that are not the ones of the current inputs) is a failure.
4. **disk full**: extract and finetune on a tmpfs (``mount`` where permitted) filled up once
   they are writing (and, in the full run, too small from the start), else with ``ENOSPC``
   injected into ``numpy.savez``/``torch.save``: one line naming a path, exit 2, no ``.tmp``
   left, and a rerun with space resumes to the reference.
5. **SIGINT**: exit 130, "interrupted; rerun to resume", no ``.tmp`` left, the rerun resumes.
6. **wild inputs** (issue 27): datasets edited as found in the wild (EXIF-rotated photos, CMYK,
   16-bit and RGBA images, namespaced XML, a BOM, CRLF, UTF-16 or spaces in the split file, long
   ids, a stale ``<filename>``, a nan coordinate, a decompression bomb), bad config values, models
   of another split or data, ``detect`` over its inputs or into a file, and ``extract`` out of
   memory under ``ulimit -v``: each read right (the reference's proposals), warned about or
   refused in one line; "silent" (exit 0, wrong result) and tracebacks fail.

Prints one markdown table (rows: check groups with counts) and the failures; exit code 0 only
when every check passed. ``--quick`` is the CI slice (tests/test_fault_suite.py).

    python scripts/fault_suite.py --quick
    python scripts/fault_suite.py --kills-per-stage 8 --seed 0 --out fault_table.md
    python scripts/fault_suite.py --quick --only "wild inputs"
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

ENTRY_POINT = Path(sys.executable).with_name("spp-detect")  # `python -m spp_detect` has no main
MAIN = "from spp_detect.cli import main; main()"
TIMING_KEYS = frozenset({"seconds", "seconds_per_image", "token"})  # differ between equal runs
CROSS_RUN_KEYS = TIMING_KEYS | {"fingerprint", "upstream"}  # also differ with another data.root
CROSS_RUN_ARTEFACTS = (  # what two runs on equal images must share, whatever their paths
    "proposals", "features", "finetune/head.pt", "svm/svms.npz", "bbox_reg/regressors.npz",
    "detections/test.npz", "eval/test.json",
)  # fmt: skip
INTERRUPTED = "interrupted; rerun to resume"
# when SIGINT comes, as fractions of the stage's work time: a stage that ends first tries the next
SIGINT_FRACTIONS = (0.3, 0.1, 0.0)
SUBPROCESS_TIMEOUT = 1800  # s: a hung stage fails its check instead of hanging the suite

# ENOSPC injected after `sys.argv[1]` successful writes, each failing write leaving a few
# bytes behind (as a full disk does); the rest of argv is the spp-detect command line.
ENOSPC_DRIVER = """
import errno, sys
import numpy, torch
budget = [int(sys.argv[1])]
def _full(path_or_handle):
    if hasattr(path_or_handle, "write"):
        path_or_handle.write(b"PK-partial")
    else:
        with open(path_or_handle, "wb") as handle:
            handle.write(b"partial")
    raise OSError(errno.ENOSPC, "No space left on device (injected)")
def _savez(file, *args, _original=numpy.savez, **kwargs):
    budget[0] -= 1
    return _original(file, *args, **kwargs) if budget[0] >= 0 else _full(file)
def _save(obj, f, *args, _original=torch.save, **kwargs):
    budget[0] -= 1
    return _original(obj, f, *args, **kwargs) if budget[0] >= 0 else _full(f)
numpy.savez, torch.save = _savez, _save
sys.argv = ["spp-detect", *sys.argv[2:]]
from spp_detect.cli import main
main()
"""

# Pays the start-up (torch import), says so by creating argv[1], waits for argv[2] to exist,
# then runs the command line in the rest of argv: a second writer that starts on cue.
ON_CUE_DRIVER = """
import os, sys, time
import torch, torchvision
import spp_detect.stages.extract
from spp_detect.cli import main
open(sys.argv[1], "w").close()
while not os.path.exists(sys.argv[2]):
    time.sleep(0.01)
sys.argv = ["spp-detect", *sys.argv[3:]]
main()
"""


@dataclass(frozen=True)
class Profile:
    """Toy dataset size and config overrides of a suite run."""

    num_train: int
    num_test: int
    sets: tuple[str, ...]
    alt_scales: str  # another extract.scales, for the config-change checks


FULL = Profile(  # tests/test_pipeline.py's TOY_SETTINGS on the 12/6 toy set
    12, 6,
    ("extract.scales=[160,240]", "finetune.fc_dim=256", "finetune.iterations=150",
     "finetune.lr_steps=[120]", "finetune.checkpoint_every=50"),
    "[160]",
)  # fmt: skip
QUICK = Profile(  # smaller, still three checkpoints to resume from and every stage
    6, 3,
    ("extract.scales=[160]", "propose.max_side=256", "finetune.fc_dim=64",
     "finetune.iterations=30", "finetune.lr_steps=[20]", "finetune.checkpoint_every=10"),
    "[200]",
)  # fmt: skip


@dataclass(frozen=True)
class Stage:
    """A stage as the suite runs it: its verb, split and what it writes under the run dir."""

    name: str
    split: str
    outputs: tuple[str, ...]

    def lock(self, run_dir: Path) -> Path:
        return run_dir / ".locks" / f"{self.name}.{self.split}.lock"


STAGES = (
    Stage("propose", "trainval", ("proposals/trainval",)),
    Stage("extract", "trainval", ("features/trainval",)),
    Stage("finetune", "trainval", ("finetune",)),
    Stage("train-svm", "trainval", ("svm",)),
    Stage("train-bbox", "trainval", ("bbox_reg",)),
    Stage("test", "test", ("detections",)),
    Stage("eval", "test", ("eval",)),
)
STAGE = {stage.name: stage for stage in STAGES}
PIPELINE = (  # the reference, one command per stage and split, in `spp-detect run`'s order
    STAGE["propose"], Stage("propose", "test", ("proposals/test",)),
    STAGE["extract"], Stage("extract", "test", ("features/test",)),
    *STAGES[2:],
)  # fmt: skip
# The file whose appearance shows a stage is past its free-space check and writing: the moment
# the disk is filled up under it.
FILL_TRIGGER = {"extract": "features/trainval/*.npz", "finetune": "finetune/checkpoint.pt"}
CORRUPTIONS = ("truncated", "garbage", "flipped bytes")
UNSAFE_ADVICE = ("allow_pickle", "pickle.load")  # numpy's advice, wrong for a damaged artefact


class SuiteError(Exception):
    """The suite itself cannot go on (e.g. the reference run failed)."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- processes ---------------------------------------------------------------------------------


def cli(*args: object) -> list[str]:
    """The `spp-detect` command line (the venv's entry point, else the same through python -c)."""
    prefix = [str(ENTRY_POINT)] if ENTRY_POINT.exists() else [sys.executable, "-c", MAIN]
    return prefix + [str(a) for a in args]


@dataclass
class Outcome:
    """A finished process."""

    rc: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]

    @property
    def last_line(self) -> str:
        return self.lines[-1] if self.lines else ""

    def one_line_error(self) -> bool:
        """Exit 2, exactly one stderr line starting with ``error:`` and it is the last one,
        no traceback (progress bars and log lines before it are allowed)."""
        errors = [line for line in self.lines if line.startswith("error:")]
        return (
            self.rc == 2
            and len(errors) == 1
            and self.last_line == errors[0]
            and "Traceback" not in self.stderr
        )

    def summary(self) -> str:
        return f"exit {self.rc}: {self.last_line[:300]}"


class Proc:
    """A CLI process in its own session (so that its workers can be signalled as a group)."""

    counter = 0
    running: ClassVar[set[Proc]] = set()  # killed when the suite ends, however it ends

    def __init__(self, cmd: Sequence[str], logs: Path) -> None:
        Proc.counter += 1
        logs.mkdir(parents=True, exist_ok=True)
        self.out_path = logs / f"{Proc.counter:04d}.out"
        self.err_path = logs / f"{Proc.counter:04d}.err"
        self.started = time.perf_counter()
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.popen = subprocess.Popen(cmd, stdout=out, stderr=err, start_new_session=True)
        self.pid = self.popen.pid
        Proc.running.add(self)

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float = SUBPROCESS_TIMEOUT) -> Outcome:
        try:
            rc = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            rc = -9
        Proc.running.discard(self)
        out, err = (path.read_text(errors="replace") for path in (self.out_path, self.err_path))
        return Outcome(rc, out, err, time.perf_counter() - self.started)

    def signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signum)

    def kill(self) -> None:
        """SIGKILL the whole group, reap the leader, and wait until no member runs any more."""
        self.signal_group(signal.SIGKILL)
        self.popen.wait()
        deadline = time.monotonic() + 10
        while _group_members(self.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        Proc.running.discard(self)

    @classmethod
    def kill_all(cls) -> None:
        for proc in list(cls.running):
            proc.kill()

    def holds_lock(self, lock: Path) -> bool:
        """Whether this process has taken the stage lock (its pid is written into the file)."""
        try:
            return f"pid {self.pid} " in lock.read_text()
        except OSError:
            return False

    def wait_for_lock(self, lock: Path, timeout: float = 600) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.poll() is None:
            if self.holds_lock(lock):
                return True
            time.sleep(0.02)
        return False


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, from /proc ([] where there is none)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


# --- comparing artefacts -----------------------------------------------------------------------


def tree_differences(ref: Path, got: Path, ignore: frozenset[str] = TIMING_KEYS) -> list[str]:
    """What differs between two copies of an output folder (or file): missing or extra files,
    stale temporaries, and files whose content differs (``ignore``: keys not compared)."""
    if ref.is_file() or got.is_file():
        reason = file_difference(ref, got, ignore)
        return [f"{got}: {reason}"] if reason else []
    ref_files = {p.relative_to(ref) for p in _files(ref) if not p.name.startswith(".")}
    got_all = {p.relative_to(got) for p in _files(got)}
    got_files = {p for p in got_all if not p.name.startswith(".")}
    diffs = [f"{got / p}: missing" for p in sorted(ref_files - got_files)]
    diffs += [f"{got / p}: not in the reference" for p in sorted(got_files - ref_files)]
    diffs += [f"{got / p}: stale temporary" for p in sorted(got_all - got_files)]
    for rel in sorted(ref_files & got_files):
        reason = file_difference(ref / rel, got / rel, ignore)
        if reason:
            diffs.append(f"{got / rel}: {reason}")
    return diffs


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []


def file_difference(a: Path, b: Path, ignore: frozenset[str] = TIMING_KEYS) -> str | None:
    """None when the two files hold the same artefact, else what differs."""
    if not a.is_file() or not b.is_file():
        return "missing"
    try:
        if a.suffix == ".npz":
            return _npz_difference(a, b, ignore)
        if a.suffix == ".pt":
            return _value_difference(_load_torch(a), _load_torch(b), "")
        if a.suffix == ".json":
            return _value_difference(
                _strip(json.loads(a.read_text()), ignore),
                _strip(json.loads(b.read_text()), ignore), "",
            )  # fmt: skip
    except Exception as exc:  # a damaged file is a difference, not a suite crash
        return f"unreadable ({type(exc).__name__}: {str(exc)[:100]})"
    return None if a.read_bytes() == b.read_bytes() else "bytes differ"


def _npz_difference(a: Path, b: Path, ignore: frozenset[str]) -> str | None:
    with np.load(a, allow_pickle=False) as left, np.load(b, allow_pickle=False) as right:
        keys_a, keys_b = set(left.files) - ignore, set(right.files) - ignore
        if keys_a != keys_b:
            return f"keys {sorted(keys_a)} != {sorted(keys_b)}"
        for key in sorted(keys_a):
            x, y = left[key], right[key]
            if x.dtype != y.dtype or not np.array_equal(x, y):
                return f"array {key!r} differs"
    return None


def _load_torch(path: Path):
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def _strip(value, ignore: frozenset[str]):
    """A JSON value without the ``ignore`` keys at any depth."""
    if isinstance(value, dict):
        return {k: _strip(v, ignore) for k, v in value.items() if k not in ignore}
    if isinstance(value, list):
        return [_strip(v, ignore) for v in value]
    return value


def _value_difference(x, y, where: str) -> str | None:
    """The first place where two nested dicts/lists of tensors and plain values differ."""
    import torch

    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        same = (
            isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
            and x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
        )  # fmt: skip
        return None if same else f"tensor {where or '.'} differs"
    if isinstance(x, dict) and isinstance(y, dict):
        if set(x) != set(y):
            return f"keys of {where or '.'} differ: {sorted(set(x) ^ set(y))[:5]}"
        for key in x:
            reason = _value_difference(x[key], y[key], f"{where}.{key}")
            if reason:
                return reason
        return None
    if isinstance(x, list | tuple) and isinstance(y, list | tuple) and len(x) == len(y):
        for index, (u, v) in enumerate(zip(x, y, strict=True)):
            reason = _value_difference(u, v, f"{where}[{index}]")
            if reason:
                return reason
        return None
    return None if x == y else f"{where or '.'}: {str(x)[:60]} != {str(y)[:60]}"


def stale_temporaries(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.tmp") if p.is_file())


def parse_times(stdout: str) -> dict[tuple[str, str], tuple[str, float]]:
    """`spp-detect run`'s time table: (stage, split) -> (status, seconds)."""
    rows = {}
    for match in re.finditer(r"^(\S+)\s+(\S+)\s+(ran|done before)\s+([\d.]+)$", stdout, re.M):
        rows[(match[1], match[2])] = (match[3], float(match[4]))
    return rows


# --- results -----------------------------------------------------------------------------------


@dataclass
class Group:
    """One row of the table: a family of checks, with outcome labels counted."""

    title: str
    counts: Counter = field(default_factory=Counter)
    passed: int = 0
    total: int = 0
    failures: list[str] = field(default_factory=list)

    def record(self, ok: bool, label: str, detail: str) -> None:
        self.total += 1
        self.passed += bool(ok)
        self.counts[label] += 1
        if not ok:
            self.failures.append(detail)
        log(f"  {'ok  ' if ok else 'FAIL'} {detail}")

    def notes(self) -> str:
        return ", ".join(f"{count} {label}" for label, count in self.counts.items())


def markdown(groups: Sequence[Group], header: str) -> str:
    lines = [header, "", "| check | passed | notes |", "| --- | --: | --- |"]
    lines += [f"| {g.title} | {g.passed}/{g.total} | {g.notes()} |" for g in groups]
    failures = [f"- {g.title.split(':')[0]}: {f}" for g in groups for f in g.failures]
    lines += ["", "Failures:" if failures else "Failures: none", *failures]
    return "\n".join(lines) + "\n"


# --- the suite ---------------------------------------------------------------------------------


class Suite:
    """The reference run and the five sections of checks, all under ``work``."""

    def __init__(self, work: Path, quick: bool, seed: int) -> None:
        self.work, self.quick, self.seed = work, quick, seed
        self.profile = QUICK if quick else FULL
        self.rng = random.Random(seed)
        self.logs = work / "logs"
        self.toy = work / "toy"  # the reference dataset (regenerated in place last, by (b))
        self.other_toy = work / "toy_other"  # same ids, other images
        self.ref = work / "reference"
        self.work_seconds: dict[str, float] = {}  # per stage (its split): lock taken -> exit

    # helpers

    def args(
        self, run_dir: Path, *sets: str, root: Path | None = None, config: str = "toy"
    ) -> list[str]:
        items = [f"data.root={root or self.toy}", *self.profile.sets, *sets]
        return ["-c", config, "--run-dir", str(run_dir), "--workers", "2"] + [
            part for item in items for part in ("--set", item)
        ]

    def stage_argv(self, stage: Stage, run_dir: Path, *sets: str) -> list[str]:
        """The stage's command line after `spp-detect` (``sets``: extra overrides)."""
        return [stage.name, *self.args(run_dir, *sets), "--split", stage.split]

    def stage_cmd(self, stage: Stage, run_dir: Path, *sets: str) -> list[str]:
        return cli(*self.stage_argv(stage, run_dir, *sets))

    def start(self, cmd: Sequence[str]) -> Proc:
        return Proc(cmd, self.logs)

    def run(self, cmd: Sequence[str]) -> Outcome:
        return self.start(cmd).wait()

    def copy_reference(self, name: str, drop: Iterable[str] = ()) -> Path:
        """A copy of the reference run dir (mtimes kept) without the ``drop`` paths."""
        dest = self.work / name
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(self.ref, dest, ignore=shutil.ignore_patterns(".locks"))
        for rel in drop:
            _remove(dest / rel)
        return dest

    def ids(self, split: str) -> list[str]:
        return sorted(p.stem for p in (self.ref / "proposals" / split).glob("*.npz"))

    # reference

    def build_reference(self) -> None:
        """The toy sets, and every stage run uninterrupted, one command each: the reference
        artefacts and each stage's duration, from taking its lock to its exit."""
        for root, seed in ((self.toy, self.seed), (self.other_toy, self.seed + 1)):
            self.make_toy(root, seed)
        for stage in PIPELINE:
            proc = self.start(self.stage_cmd(stage, self.ref))
            proc.wait_for_lock(stage.lock(self.ref))
            locked = time.perf_counter() - proc.started
            outcome = proc.wait()
            if outcome.rc != 0:
                raise SuiteError(f"reference {stage.name} failed: {outcome.summary()}")
            self.work_seconds.setdefault(stage.name, max(0.0, outcome.seconds - locked))
        log("reference, s of work after taking the lock: "
            + ", ".join(f"{k} {v:.1f}" for k, v in self.work_seconds.items()))  # fmt: skip

    def make_toy(self, root: Path, seed: int) -> None:
        p = self.profile
        toy = self.run(cli("make-toy", root, "--num-train", p.num_train, "--num-test",
                           p.num_test, "--seed", seed))  # fmt: skip
        if toy.rc != 0:
            raise SuiteError(f"make-toy failed: {toy.summary()}")

    # 1. kill -9

    def kill_points(self, per_stage: int) -> Group:
        group = Group("kill -9 points survived, identical results", Counter(differences=0))
        for stage in STAGES:
            for index in range(per_stage):  # stratified: one time in each slice of the window
                fraction = (index + self.rng.random()) / per_stage
                self.kill_point(group, stage, index, fraction * self.work_seconds[stage.name])
        return group

    def kill_point(self, group: Group, stage: Stage, index: int, at: float) -> None:
        work = self.copy_reference(f"kill_{stage.name}_{index}", drop=stage.outputs)
        cmd = self.stage_cmd(stage, work)
        where = self.kill_at(cmd, at, stage, work)
        rerun = self.run(cmd)
        diffs = [f"rerun {rerun.summary()}"] if rerun.rc else []
        diffs = diffs or [d for rel in stage.outputs for d in self.differences(work, rel)]
        group.counts["differences"] += len(diffs)
        detail = f"{stage.name}: kill -9 {at:.2f} s after it took its lock ({where})"
        group.record(not diffs, f"killed {where}", f"{detail}: {'; '.join(diffs[:3])}".rstrip(": "))
        shutil.rmtree(work, ignore_errors=True)

    def kill_at(self, cmd: Sequence[str], at: float, stage: Stage, work: Path) -> str:
        """Start ``cmd`` and SIGKILL its group ``at`` seconds after it took the stage's lock
        (start-up, mostly imports, varies with the load and writes nothing); where it landed.
        A run that ends first is a new measurement of the stage's duration, at today's load:
        the window of the next points shrinks to it."""
        proc = self.start(cmd)
        if proc.wait_for_lock(stage.lock(work)):
            locked = time.perf_counter()
            try:
                proc.popen.wait(timeout=at)
            except subprocess.TimeoutExpired:
                proc.kill()
                return "in the stage"
            seconds = time.perf_counter() - locked
            self.work_seconds[stage.name] = min(self.work_seconds[stage.name], seconds)
        return f"after the end (exit {proc.wait().rc})"

    def differences(self, work: Path, rel: str, ignore: frozenset[str] = TIMING_KEYS) -> list:
        return tree_differences(self.ref / rel, work / rel, ignore)

    # 2. corruption

    def corruption(self) -> Group:
        group = Group("corruption: one line and exit 2, or recomputed", Counter(silent=0))
        test_id = self.rng.choice(self.ids("test"))
        cases = corruption_cases(test_id)
        for index, (kind, target, reader, prepare) in enumerate(cases):
            modes = CORRUPTIONS  # in the CI slice one per kind, in turn
            for mode in [CORRUPTIONS[(index + self.seed) % 3]] if self.quick else modes:
                self.corruption_case(group, kind, target, reader, prepare, mode)
        return group

    def corruption_case(
        self, group: Group, kind: str, target: str, reader: Stage, prepare: dict, mode: str
    ) -> None:
        work = self.copy_reference(f"corrupt_{kind.replace('/', '_')}_{mode}")
        for rel in prepare.get("drop", ()):
            _remove(work / rel)
        if "copy_from" in prepare:
            shutil.copyfile(work / prepare["copy_from"], work / target)
        corrupt(work / target, mode, self.rng)
        if kind == "config.yaml":  # read as the run's saved config: no -c, no --set
            cmd = cli(reader.name, "--run-dir", work, "--workers", "2", "--split", reader.split)
        else:
            cmd = self.stage_cmd(reader, work)
        outcome = self.run([*cmd, *prepare.get("options", ())])
        recovered = not any(self.differences(work, rel) for rel in reader.outputs)
        label = classify(outcome, recovered)
        detail = f"{kind} {mode}, read by `{reader.name}`: {label} ({outcome.summary()})"
        group.record(label in ("refused", "recomputed"), label, detail)
        shutil.rmtree(work, ignore_errors=True)

    # 3. stale data

    def stale_matrix(self) -> Group:
        group = Group("stale-data matrix: recomputed or refused, never silent", Counter(silent=0))
        other = self.other_root_run(group)
        changed = self.config_change(group, with_run=not self.quick)
        self.concurrent_writers(group)
        self.replaced_files(group, other, changed)
        self.regenerated_in_place(group, other)
        return group

    def other_root_run(self, group: Group) -> Path:
        """(a) data.root pointed at another toy set with the same ids, then `run`."""
        work = self.copy_reference("stale_other_root")
        outcome = self.run(cli("run", *self.args(work, root=self.other_toy)))
        times = parse_times(outcome.stdout)
        not_rerun = [f"{s} {p}" for (s, p), (status, _) in times.items() if status != "ran"]
        same_boxes = not any(self.differences(work, "proposals/test", CROSS_RUN_KEYS))
        ok = outcome.rc == 0 and not not_rerun and not same_boxes and len(times) == 9
        label = "recomputed" if ok else ("silent" if outcome.rc == 0 else "failed")
        detail = f"(a) another data.root, same ids, `run`: {label} ({outcome.summary()}"
        detail += f"; kept: {', '.join(not_rerun)})" if not_rerun else ")"
        if same_boxes:
            detail += "; proposals equal the old dataset's"
        group.record(ok, label, detail)
        if not self.quick:  # a fresh run on that dataset must give the same results
            fresh = self.work / "stale_fresh_other"
            shutil.rmtree(fresh, ignore_errors=True)
            ran = self.run(cli("run", *self.args(fresh, root=self.other_toy)))
            diffs = self.cross_run_differences(work, fresh) if ran.rc == 0 else [ran.summary()]
            label = "recomputed" if not diffs else ("silent" if ran.rc == 0 else "failed")
            group.record(
                not diffs, label,
                f"(a) ... equals a fresh run on the other dataset: {'; '.join(diffs[:3]) or 'yes'}",
            )  # fmt: skip
        return work

    def cross_run_differences(self, a: Path, b: Path) -> list[str]:
        """Artefacts of two runs on equal images (manifests, config and ids aside)."""
        diffs = []
        for rel in CROSS_RUN_ARTEFACTS:
            if (a / rel).is_dir():
                for path in _files(a / rel):
                    if path.suffix == ".npz":
                        other = b / path.relative_to(a)
                        reason = file_difference(path, other, CROSS_RUN_KEYS)
                        diffs += [f"{other}: {reason}"] if reason else []
            else:
                diffs += tree_differences(a / rel, b / rel, CROSS_RUN_KEYS)
        return diffs

    def config_change(self, group: Group, with_run: bool) -> Path | None:
        """(c) extract.scales changed: a reader refuses; `run` recomputes from extract on."""
        alt = f"extract.scales={self.profile.alt_scales}"
        work = self.copy_reference("stale_config_refuse")
        outcome = self.run([*cli("test", *self.args(work, alt)), "--split", "test", "--force"])
        label = classify(outcome, recovered=False)  # other scales: the old output is stale
        group.record(label == "refused", label, f"(c) {alt}, `test`: {label} ({outcome.summary()})")
        shutil.rmtree(work, ignore_errors=True)
        if not with_run:
            return None
        work = self.copy_reference("stale_config_run")
        outcome = self.run(cli("run", *self.args(work, alt)))
        times = parse_times(outcome.stdout)
        must_run = [k for k in times if k[0] != "propose"]
        kept = [f"{s} {p}" for s, p in must_run if times[(s, p)][0] != "ran"]
        scales = _npz_key(work / "features" / "test" / f"{self.ids('test')[0]}.npz", "scales")
        new_maps = scales is not None and list(scales) == json.loads(self.profile.alt_scales)
        ok = outcome.rc == 0 and not kept and new_maps
        label = "recomputed" if ok else ("silent" if outcome.rc == 0 else "failed")
        group.record(ok, label, f"(c) {alt}, `run`: {label} ({outcome.summary()}; kept {kept})")
        return work

    def concurrent_writers(self, group: Group) -> None:
        """(d) a second `extract` (other scales, --limit 3, as in the issue) starts while one
        runs: it must stop with one line naming the first; the first's cache stays pure."""
        stage = STAGE["extract"]
        work = self.copy_reference("stale_concurrent", drop=stage.outputs)
        ready, go = work / "second.ready", work / "second.go"
        alt = f"extract.scales={self.profile.alt_scales}"
        second_argv = [*self.stage_argv(stage, work, alt), "--limit", "3"]
        second = self.start([sys.executable, "-c", ON_CUE_DRIVER, ready, go, *second_argv])
        while not ready.exists() and second.poll() is None:
            time.sleep(0.02)
        first = self.start(self.stage_cmd(stage, work))
        overlapped = first.wait_for_lock(stage.lock(work))
        go.touch()
        late = second.wait()
        overlapped = overlapped and first.poll() is None  # still writing when the second ended
        early = first.wait()
        diffs = self.differences(work, stage.outputs[0]) if early.rc == 0 else [early.summary()]
        names_first = f"pid {first.pid}" in late.last_line
        ok = late.one_line_error() and names_first and not diffs
        label = "refused" if ok else ("silent" if late.rc == 0 else "failed")
        if not overlapped and not ok:
            label = "inconclusive"
        detail = (
            f"(d) two `extract` at once: second {late.summary()}; names the first: {names_first};"
            f" first's cache {'identical' if not diffs else '; '.join(diffs[:2])}"
        )
        group.record(ok, label, detail)
        shutil.rmtree(work, ignore_errors=True)

    def replaced_files(self, group: Group, other: Path, changed: Path | None) -> None:
        """(d) one file replaced by the same file of another run: a reader refuses or recomputes."""
        test_id = self.ids("test")[0]
        cases = [
            ("proposal .npz of another dataset", other, f"proposals/test/{test_id}.npz", "test"),
            ("feature .npz of another dataset", other, f"features/test/{test_id}.npz", "test"),
            ("head.pt trained on another dataset", other, "finetune/head.pt", "test"),
            ("detections/test.npz of another dataset", other, "detections/test.npz", "eval"),
        ]
        if changed is not None:
            cases.append(("feature .npz of other scales", changed,
                          f"features/test/{test_id}.npz", "test"))  # fmt: skip
        for what, source, rel, reader in cases:
            work = self.copy_reference("stale_replaced")
            shutil.copy2(source / rel, work / rel)
            options = ("--force",) if reader == "test" else ()
            outcome = self.run([*self.stage_cmd(STAGE[reader], work), *options])
            recovered = not any(self.differences(work, r) for r in STAGE[reader].outputs)
            label = classify(outcome, recovered)
            detail = f"(d) {what} in {rel}, read by `{reader}`: {label} ({outcome.summary()})"
            group.record(label in ("refused", "recomputed"), label, detail)
            shutil.rmtree(work, ignore_errors=True)

    def regenerated_in_place(self, group: Group, other: Path) -> None:
        """(b) the dataset regenerated in place (same path, the other seed), then `run`: the
        results must be those of the other dataset's run (same images), or refused. Last:
        it rewrites the reference dataset."""
        work = self.copy_reference("stale_in_place")
        self.make_toy(self.toy, self.seed + 1)
        outcome = self.run(cli("run", *self.args(work)))
        diffs = self.cross_run_differences(other, work) if outcome.rc == 0 else []
        times = parse_times(outcome.stdout)
        kept = [f"{s} {p}" for (s, p), (status, _) in times.items() if status != "ran"]
        if outcome.one_line_error():
            label = "refused"
        elif outcome.rc == 0:
            label = "recomputed" if not diffs else "silent"
        else:
            label = "failed"
        detail = f"(b) dataset regenerated in place, `run`: {label} ({outcome.summary()}"
        detail += f"; done before: {', '.join(kept)}" if kept else ""
        detail += f"; {len(diffs)} artefacts differ, e.g. {diffs[0]})" if diffs else ")"
        group.record(label in ("refused", "recomputed"), label, detail)

    # 4. disk full

    def disk_full(self) -> Group:
        method = "tmpfs" if self.can_mount() else "injected ENOSPC"
        group = Group(f"disk full ({method}): one line naming a path, no .tmp, resumes")
        for name, inputs in (("extract", ()), ("finetune", ("proposals", "features/trainval"))):
            if method != "tmpfs":
                self.disk_full_injected(group, STAGE[name])
                continue
            self.disk_full_tmpfs(group, STAGE[name], inputs, fill_during=True)
            if not self.quick:
                self.disk_full_tmpfs(group, STAGE[name], inputs, fill_during=False)
        return group

    def can_mount(self) -> bool:
        if not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("mount"):
            return False
        probe = self.work / "mount_probe"
        probe.mkdir(exist_ok=True)
        if not _mount_tmpfs(probe, 1 << 20):
            return False
        _umount(probe)
        return True

    def disk_full_tmpfs(
        self, group: Group, stage: Stage, inputs: Sequence[str], fill_during: bool
    ) -> None:
        """The stage on a tmpfs holding its inputs and either about a third of its output from
        the start, or room enough until it has started writing, when a filler takes the rest."""
        needed = sum(_disk_bytes(self.ref / rel) for rel in inputs)
        output = _disk_bytes(self.ref / stage.outputs[0])
        room = 8 * output + (16 << 20) if fill_during else max(64 << 10, output // 3)
        mount = self.work / f"tmpfs_{stage.name}"
        mount.mkdir(exist_ok=True)
        if not _mount_tmpfs(mount, needed + room):
            group.record(False, "failed", f"{stage.name}: mount failed")
            return
        try:
            run_dir = mount / "run"
            for rel in inputs:
                shutil.copytree(self.ref / rel, run_dir / rel)
            proc = self.start(self.stage_cmd(stage, run_dir))
            if fill_during:
                while not list(run_dir.glob(FILL_TRIGGER[stage.name])) and proc.poll() is None:
                    time.sleep(0.02)
                fill_up(mount / "filler", leave=16 << 10)
            outcome = proc.wait()
            left = stale_temporaries(mount)
            resumed = self.work / f"disk_full_{stage.name}"
            shutil.rmtree(resumed, ignore_errors=True)
            shutil.copytree(run_dir, resumed)
        finally:
            _umount(mount)
        when = "filled while writing" if fill_during else "full from the start"
        self.judge_disk_full(group, stage, outcome, left, str(mount), resumed, when)

    def disk_full_injected(self, group: Group, stage: Stage) -> None:
        """The stage with ENOSPC injected after one good write (none for finetune)."""
        resumed = self.copy_reference(f"disk_full_{stage.name}", drop=stage.outputs)
        allowed = 1 if stage.name == "extract" else 0
        argv = self.stage_argv(stage, resumed)
        outcome = self.run([sys.executable, "-c", ENOSPC_DRIVER, str(allowed), *argv])
        left = stale_temporaries(resumed)
        self.judge_disk_full(group, stage, outcome, left, str(resumed), resumed, "injected")

    def judge_disk_full(
        self, group: Group, stage: Stage, outcome: Outcome, left: list, root: str, resumed: Path,
        when: str,
    ) -> None:  # fmt: skip
        """One line naming a path under ``root``, nothing half-written, a rerun resumes."""
        problems = [] if outcome.one_line_error() else [f"not one line: {outcome.summary()}"]
        if outcome.one_line_error() and root not in outcome.last_line:
            problems.append(f"names no path under {root}: {outcome.last_line}")
        problems += [f"left {p}" for p in left]
        rerun = self.run(self.stage_cmd(stage, resumed))
        if rerun.rc:
            problems.append(f"rerun {rerun.summary()}")
        else:
            problems += self.differences(resumed, stage.outputs[0])
        label = "handled" if not problems else "failed"
        detail = f"{stage.name} ({when}): {outcome.summary()}"
        group.record(not problems, label, f"{detail}; {'; '.join(problems[:3])}".rstrip("; "))

    # 5. SIGINT

    def sigint(self) -> Group:
        group = Group("SIGINT: exit 130, nothing half-written, resumes")
        for name in ("extract", "finetune"):
            stage = STAGE[name]
            work, outcome, finished_first = self.interrupted(stage)
            problems = ["finished before the signal"] if finished_first else []
            # a signal that comes once the stage has ended (its summary line printed) is ignored
            ended = outcome.rc == 0 and any(
                line.startswith(name) for line in outcome.stdout.splitlines()
            )
            if not ended and (outcome.rc != 130 or outcome.last_line != INTERRUPTED):
                problems.append(f"got {outcome.summary()}")
            if "Traceback" in outcome.stderr:
                problems.append("traceback")
            problems += [f"left {p}" for p in stale_temporaries(work)]
            rerun = self.run(self.stage_cmd(stage, work))
            problems += [f"rerun {rerun.summary()}"] if rerun.rc else []
            problems += self.differences(work, stage.outputs[0]) if not rerun.rc else []
            detail = f"{name}: SIGINT after {outcome.seconds:.1f} s: {outcome.summary()}"
            label = ("ended first" if ended else "interrupted") if not problems else "failed"
            group.record(not problems, label,
                         f"{detail}; {'; '.join(problems[:3])}".rstrip("; "))  # fmt: skip
            shutil.rmtree(work, ignore_errors=True)
        return group

    def interrupted(self, stage: Stage) -> tuple[Path, Outcome, bool]:
        """The stage in a fresh copy, sent SIGINT part-way through its work: its run dir, its
        outcome and whether it had finished before the signal. A stage that finishes first (a
        less loaded machine than the reference run's) is tried again with an earlier signal."""
        for fraction in SIGINT_FRACTIONS:
            work = self.copy_reference(f"sigint_{stage.name}", drop=stage.outputs)
            proc = self.start(self.stage_cmd(stage, work))
            proc.wait_for_lock(stage.lock(work))
            time.sleep(fraction * self.work_seconds[stage.name])
            finished_first = proc.poll() is not None
            proc.signal_group(signal.SIGINT)
            outcome = proc.wait(timeout=120)
            if not finished_first:
                break
        return work, outcome, finished_first

    # 6. inputs from the wild

    def wild_inputs(self) -> Group:
        """Images, annotations, split files, configs and `detect` calls as found in the wild
        (issue 27): each read right, warned about, or refused in one line; never silent, never
        a traceback."""
        group = Group(WILD_TITLE, Counter(silent=0, traceback=0))
        for what, edit, expect, fragment in wild_dataset_cases():
            self.wild_dataset_case(group, what, edit, expect, fragment)
        self.wild_config_cases(group)
        self.wild_provenance_cases(group)
        self.wild_detect_cases(group)
        self.wild_out_of_memory(group)
        return group

    def judge_wild(
        self, group: Group, what: str, outcome: Outcome, expect: str, fragment: str = "",
        problems: Sequence[str] = (),
    ) -> None:  # fmt: skip
        """``expect``: "refused" (one line holding ``fragment``), "read" (exit 0) or "warned"
        (exit 0, ``fragment`` in the log); ``problems``: what else the case got wrong."""
        if expect == "refused":
            ok = outcome.one_line_error() and fragment in outcome.last_line and not problems
        else:
            ok = outcome.rc == 0 and fragment in outcome.stderr and not problems
        if ok:
            label = expect
        elif "Traceback" in outcome.stderr:
            label = "traceback"
        else:
            label = "silent" if outcome.rc == 0 else "failed"
        detail = f"{what}: {label} ({outcome.summary()})"
        if problems and not ok:
            detail += f"; {'; '.join(problems[:2])}"
        group.record(ok, label, detail)

    def wild_dataset_case(
        self, group: Group, what: str, edit: Callable, expect: str, fragment: str
    ) -> None:
        """A copy of the toy set edited by ``edit(root, test ids)`` (which returns the renamed
        test ids), then `propose --split test` on it: a read case must give the reference's
        proposals and recall (so its boxes and sizes were read as the reference's were)."""
        folder = self.work / "wild" / re.sub(r"\W+", "_", what)[:60]
        shutil.rmtree(folder, ignore_errors=True)
        root = Path(shutil.copytree(self.toy, folder / "toy"))
        renamed = edit(root, self.ids("test")) or {}
        run_dir = folder / "run"
        outcome = self.run([*cli("propose", *self.args(run_dir, root=root)), "--split", "test"])
        problems = self.proposal_differences(run_dir, renamed) if outcome.rc == 0 else []
        if what.startswith("CMYK"):  # converted pixels: only the gt count must agree
            problems = [p for p in problems if "num_gt" in p]
        self.judge_wild(group, f"dataset: {what}", outcome, expect, fragment, problems)
        shutil.rmtree(folder, ignore_errors=True)

    def proposal_differences(self, run_dir: Path, renamed: dict[str, str]) -> list[str]:
        """How `propose --split test` in ``run_dir`` differs from the reference: recall report
        and every image's boxes (``renamed``: new id -> reference id)."""
        path = run_dir / "proposals/test/report.json"
        if not path.is_file():  # written only when the split has gt boxes
            return ["no recall report (no gt box read)"]
        report = json.loads(path.read_text())
        ref = json.loads((self.ref / "proposals/test/report.json").read_text())
        problems = []
        if report["num_gt"] != ref["num_gt"]:
            problems.append(f"num_gt {report['num_gt']} != {ref['num_gt']}")
        if report["recall"] != ref["recall"]:
            problems.append(f"recall {report['recall']['all']} != {ref['recall']['all']}")
        for path in sorted((run_dir / "proposals/test").glob("*.npz")):
            ref_id = renamed.get(path.stem, path.stem)
            boxes = _npz_key(path, "boxes")
            ref_boxes = _npz_key(self.ref / "proposals/test" / f"{ref_id}.npz", "boxes")
            if boxes is None or ref_boxes is None or not np.array_equal(boxes, ref_boxes):
                problems.append(f"boxes of {path.stem[:40]} differ")
        return problems

    def wild_config_cases(self, group: Group) -> None:
        """Config values from the wild, each on a copy of the finished reference run: refused
        when the config loads, the run left as it was."""
        twice = self.work / "wild_twice.yaml"
        twice.write_text("name: toy\nfinetune:\n  iterations: 30\nfinetune:\n  lr: 0.01\n")
        cases = [
            ("a YAML key given twice", "finetune", ["-c", str(twice)], "is given twice"),
            ("a class listed twice", "eval", ["--set", "data.classes=[circle,circle,square]"],
             "more than once"),
            ("test.score_thresh=nan", "test", ["--set", "test.score_thresh=nan", "--force"],
             "must be a finite number"),
            ("finetune.seed=-1 on a finished run", "finetune", ["--set", "finetune.seed=-1"],
             "finetune.seed must be in"),
            ("svm.seed=-1", "train-svm", ["--set", "svm.seed=-1", "--force"], "svm.seed"),
            ("bbox_reg.ridge_lambda=0", "train-bbox", ["--set", "bbox_reg.ridge_lambda=0"],
             "bbox_reg.ridge_lambda must be positive"),
        ]  # fmt: skip
        for what, verb, options, fragment in cases:
            work = self.copy_reference("wild_config")
            stage = STAGE[verb]
            config = options[1] if options[0] == "-c" else "toy"
            options = options[2:] if options[0] == "-c" else options
            argv = [verb, *self.args(work, config=config), "--split", stage.split, *options]
            outcome = self.run(cli(*argv))
            kept = [d for rel in stage.outputs for d in self.differences(work, rel)]
            self.judge_wild(group, f"config: {what}", outcome, "refused", fragment, kept)
            shutil.rmtree(work, ignore_errors=True)

    def wild_provenance_cases(self, group: Group) -> None:
        """Artefacts of one split or dataset state read as another's: refused."""
        work = self.copy_reference("wild_provenance")
        trained = self.run(self.stage_cmd(Stage("train-svm", "test", ("svm",)), work))
        outcome = self.run([*self.stage_cmd(STAGE["test"], work), "--force"])
        if trained.rc:
            outcome = trained
        what = "provenance: `train-svm --split test`, then `test --force`"
        self.judge_wild(group, what, outcome, "refused", "trained on split 'test'")
        shutil.rmtree(work, ignore_errors=True)
        work = self.copy_reference("wild_provenance")
        image = next((self.toy / "JPEGImages").glob(f"{self.ids('test')[0]}.*"))
        stat = image.stat()
        os.utime(image, ns=(1, 1))  # the image rewritten in place since `test`
        try:
            outcome = self.run(self.stage_cmd(STAGE["eval"], work))
        finally:
            os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        what = "provenance: a test image rewritten after `test`, then `eval`"
        self.judge_wild(group, what, outcome, "refused", "made from other data")
        shutil.rmtree(work, ignore_errors=True)

    def wild_detect_cases(self, group: Group) -> None:
        """`detect` on the reference run: its inputs never overwritten, no output name shared,
        the run's saved config left as it is."""
        work = self.copy_reference("wild_detect")
        folder = self.work / "wild_detect_inputs"
        shutil.rmtree(folder, ignore_errors=True)
        source = next((self.toy / "JPEGImages").glob(f"{self.ids('test')[0]}.*"))
        a, b, png = (folder / name for name in ("a/img.jpg", "b/img.jpg", "c/img.png"))
        for path in (a, b, png):
            path.parent.mkdir(parents=True, exist_ok=True)
            _save_image(path, _rgb(source))
        (folder / "empty.jpg").write_bytes(b"")
        (folder / "file").write_text("not a folder")
        out = str(folder / "out")
        cases = [
            ("two inputs of one stem", [a, b, "--out", out], "both would write"),
            ("--out set to the input's folder", [png, "--out", png.parent], "not an output of"),
            ("--out below a file", [a, "--out", folder / "file/out"], "is a file, not a folder"),
            ("an empty image file", [folder / "empty.jpg"], "empty file (0 bytes)"),
        ]
        for what, args, fragment in cases:
            kept = png.read_bytes()
            outcome = self.run(cli("detect", "--run-dir", work, "--workers", "2", *args))
            problems = ["dataset advice"] if "drop its id" in outcome.last_line else []
            problems += ["input overwritten"] if png.read_bytes() != kept else []
            png.write_bytes(kept)  # the next case starts from the input as it was
            self.judge_wild(group, f"detect: {what}", outcome, "refused", fragment, problems)
        saved = (work / "config.yaml").read_bytes()
        outcome = self.run(cli("detect", "--run-dir", work, a, "--out", out,
                               "--set", "test.nms_thresh=0.4"))  # fmt: skip
        problems = [] if (work / "config.yaml").read_bytes() == saved else ["config.yaml rewritten"]
        problems += [] if (folder / "out/img.json").is_file() else ["no img.json"]
        self.judge_wild(group, "detect: --set on a run", outcome, "read", "", problems)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)

    def wild_out_of_memory(self, group: Group) -> None:
        """`extract` at a WILD_HUGE_SCALE scale under a virtual-memory cap (`ulimit -v`) of what
        the imports take plus WILD_MEMORY_ROOM: one line naming the image and the fix."""
        probe = self.run([sys.executable, "-c", VM_PROBE])
        work = self.copy_reference("wild_memory", drop=("features/test",))
        if probe.rc or not probe.stdout.strip().isdigit():
            group.record(False, "failed", f"memory: the probe failed ({probe.summary()})")
            return
        cap_kib = int(probe.stdout) + WILD_MEMORY_ROOM // 1024
        scales = f"extract.scales=[{WILD_HUGE_SCALE}]"
        argv = ["extract", *self.args(work, scales), "--split", "test",
                "--limit", "1", "--device", "cpu"]  # fmt: skip
        outcome = self.run(["sh", "-c", f'ulimit -v {cap_kib} && exec "$@"', "sh", *cli(*argv)])
        what = f"memory: extract at a {WILD_HUGE_SCALE:,} px scale under ulimit -v"
        self.judge_wild(group, what, outcome, "refused", "out of memory while extracting")
        shutil.rmtree(work, ignore_errors=True)


def corruption_cases(test_id: str) -> list[tuple[str, str, Stage, dict]]:
    """(kind, file to corrupt, the stage that reads it, preparation) for each artefact kind."""
    test, force = STAGE["test"], {"options": ("--force",)}
    return [
        ("proposal .npz", f"proposals/test/{test_id}.npz", test, force),
        ("feature .npz", f"features/test/{test_id}.npz", test, force),
        ("head.pt", "finetune/head.pt", test, force),
        ("svms.npz", "svm/svms.npz", test, force),
        ("regressors.npz", "bbox_reg/regressors.npz", test, force),
        ("detection part .npz", f"detections/test/{test_id}.npz", test, {}),
        ("detections/test.npz", "detections/test.npz", STAGE["eval"], {}),
        ("manifest.json", "proposals/test/manifest.json", test, force),
        ("config.yaml", "config.yaml", test, force),
        ("finetune checkpoint.pt", "finetune/checkpoint.pt", STAGE["finetune"],
         {"drop": ("finetune/manifest.json",), "copy_from": "finetune/head.pt"}),
    ]  # fmt: skip


def corrupt(path: Path, mode: str, rng: random.Random) -> None:
    """Truncate ``path`` to half its size, overwrite it with as many random bytes, or invert 4
    bytes in its middle half (bit rot: the size and the structure around them stay)."""
    data = bytearray(path.read_bytes())
    if mode == "truncated":
        data = data[: len(data) // 2]
    elif mode == "garbage":
        data = bytearray(rng.randbytes(len(data)))
    else:
        for _ in range(4):
            data[rng.randrange(len(data) // 4, 3 * len(data) // 4)] ^= 0xFF
    path.write_bytes(bytes(data))


def classify(outcome: Outcome, recovered: bool) -> str:
    """refused (one line, exit 2), recomputed (exit 0, the reference's results), silent (exit 0,
    other results), unsafe advice (refused, but advising to load the file with pickle) or
    crashed (anything else: traceback, other exit code, several lines)."""
    if outcome.one_line_error():
        unsafe = any(word in outcome.last_line for word in UNSAFE_ADVICE)
        return "refused with unsafe advice" if unsafe else "refused"
    if outcome.rc == 0:
        return "recomputed" if recovered else "silent"
    return "crashed"


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _npz_key(path: Path, key: str):
    try:
        with np.load(path, allow_pickle=False) as data:
            return data[key] if key in data.files else None
    except Exception:
        return None


def _disk_bytes(path: Path) -> int:
    """Bytes ``path`` takes on a page-granular file system (files rounded up to 4 KiB)."""
    files = [path] if path.is_file() else _files(path)
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in files) + 64 * 4096


def _mount_tmpfs(folder: Path, size: int) -> bool:
    size = -(-size // 4096) * 4096
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True)  # fmt: skip
    return done.returncode == 0


def fill_up(path: Path, leave: int) -> None:
    """Take all but ``leave`` bytes of the file system of ``path`` with one file."""
    stats = os.statvfs(path.parent)
    size = max(0, stats.f_bavail * stats.f_frsize - leave)
    with open(path, "wb") as handle:
        try:
            os.posix_fallocate(handle.fileno(), 0, size)
        except OSError:  # no fallocate: write zeros until the end
            with contextlib.suppress(OSError):
                for _ in range(size // (1 << 20) + 1):
                    handle.write(bytes(min(1 << 20, size - handle.tell())))


def _umount(folder: Path) -> None:
    if subprocess.run(["umount", str(folder)], capture_output=True).returncode:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


# --- inputs from the wild ----------------------------------------------------------------------

WILD_TITLE = "wild inputs: read, warned or refused in one line; never silent, no traceback"
# Virtual memory allowed above what the imports take (VM_PROBE) in the out-of-memory case: less
# than the trunk's first maps of a toy image at a WILD_HUGE_SCALE shorter side (32 channels at
# half its 8,000 x 10,667 px, float32: 2.7 GB), more than start-up needs.
WILD_MEMORY_ROOM = 2 << 30
WILD_HUGE_SCALE = 8000  # px; config.py refuses scales above 10,000 (a typo's extra zero)
VM_PROBE = (  # the peak virtual memory (KiB) of a process that has imported what extract does
    "import torch, torchvision, spp_detect.cli, spp_detect.stages.extract; "
    "print(open('/proc/self/status').read().split('VmPeak:')[1].split()[0])"
)
EXIF_ORIENTATION = 0x0112  # the EXIF Orientation tag
STORED_TURNS = {6: 1, 8: -1}  # orientation -> np.rot90 turns from the upright to the stored image
BOMB_SIZE = (20_000, 10_000)  # width, height: past PIL's decompression-bomb limit (179 MP)


def wild_dataset_cases() -> list[tuple[str, Callable, str, str]]:
    """(what, edit(root, test ids) -> {new id: old id} or None, expected outcome, fragment of
    the refusal or warning) for each dataset from the wild."""
    return [
        ("EXIF-rotated photos, upright <size> and boxes", _exif_upright, "read", ""),
        ("EXIF-rotated photo annotated on its stored pixels", _exif_stored_size, "refused",
         "EXIF orientation"),
        ("namespaced VOC XML", _namespaced, "read", ""),
        ("16-bit and RGBA PNGs", _png_kinds, "read", ""),
        ("CMYK JPEG", _cmyk, "read", ""),
        ("split file with a UTF-8 BOM and CRLF", _bom_crlf, "read", ""),
        ("an id of 240 characters", _long_id, "read", ""),
        ("<filename> naming another file", _filename_elsewhere, "warned",
         "<filename> names another file"),
        ("<filename> naming another listed id", _filename_of_listed_id, "refused",
         "is the image of id"),
        ("a nan coordinate", _nan_coordinate, "refused", "not a finite number"),
        ("a UTF-16 split file", _utf16_split, "refused", "UTF-16"),
        ("an id with a space", _id_with_space, "refused", "holds a space"),
        ("an id longer than a file name may be", _id_too_long, "refused", "an id of 300 bytes"),
        ("an image over the decompression-bomb limit", _bomb, "refused", "decompression bombs"),
    ]  # fmt: skip


def _image_of(root: Path, image_id: str) -> Path:
    return next((root / "JPEGImages").glob(f"{image_id}.*"))


def _xml_of(root: Path, image_id: str) -> Path:
    return root / "Annotations" / f"{image_id}.xml"


def _split_of(root: Path) -> Path:
    return root / "ImageSets" / "Main" / "test.txt"


def _rgb(path: Path) -> np.ndarray:
    """The pixels as stored, RGB (the reference run decoded the toy JPEGs so)."""
    import cv2

    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    return cv2.cvtColor(cv2.imread(str(path), flags), cv2.COLOR_BGR2RGB)


def _save_image(path: Path, pixels: np.ndarray, mode: str | None = None, **options) -> None:
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(pixels))
    (image.convert(mode) if mode else image).save(path, **options)


def _sideways_png(root: Path, image_id: str, orientation: int) -> Path:
    """The image stored turned, as a PNG whose EXIF ``orientation`` turns it upright again."""
    from PIL import Image

    jpg = _image_of(root, image_id)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    png = jpg.with_suffix(".png")
    _save_image(png, np.rot90(_rgb(jpg), STORED_TURNS[orientation]), exif=exif)
    jpg.unlink()
    return png


def _exif_upright(root: Path, ids: list[str]) -> None:
    for index, image_id in enumerate(ids):
        _sideways_png(root, image_id, (6, 8)[index % 2])


def _exif_stored_size(root: Path, ids: list[str]) -> None:
    """A photo turned by its EXIF whose <size> is the stored (sideways) one."""
    for image_id in ids:
        xml = _xml_of(root, image_id)
        text = xml.read_text()
        width, height = (re.search(rf"<{t}>(\d+)</{t}>", text)[1] for t in ("width", "height"))
        if width != height:  # a square image looks the same either way
            _sideways_png(root, image_id, 6)
            stored = f"<width>{height}</width><height>{width}</height>"
            xml.write_text(text.replace(f"<width>{width}</width><height>{height}</height>", stored))
            return


def _namespaced(root: Path, ids: list[str]) -> None:
    for image_id in ids:
        xml = _xml_of(root, image_id)
        ns = '<annotation xmlns="http://www.example.com/voc">'
        xml.write_text(xml.read_text().replace("<annotation>", ns, 1))


def _png_kinds(root: Path, ids: list[str]) -> None:
    """A 16-bit PNG and an RGBA PNG of the same pixels (both decode to them exactly)."""
    import cv2

    for image_id, kind in zip(ids, ("16-bit", "rgba"), strict=False):
        jpg = _image_of(root, image_id)
        pixels = _rgb(jpg)
        if kind == "16-bit":
            bgr16 = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR).astype(np.uint16) * 257
            cv2.imwrite(str(jpg.with_suffix(".png")), bgr16)
        else:
            _save_image(jpg.with_suffix(".png"), pixels, mode="RGBA")
        jpg.unlink()


def _cmyk(root: Path, ids: list[str]) -> None:
    jpg = _image_of(root, ids[0])
    _save_image(jpg, _rgb(jpg), mode="CMYK", quality=95)


def _bom_crlf(root: Path, ids: list[str]) -> None:
    _split_of(root).write_bytes(("\ufeff" + "".join(f"{i}\r\n" for i in ids)).encode())


def _long_id(root: Path, ids: list[str]) -> dict[str, str]:
    old = ids[0]
    new = old + "x" * (240 - len(old))
    image = _image_of(root, old)
    image.rename(image.with_name(new + image.suffix))
    xml = _xml_of(root, old)
    xml.with_name(f"{new}.xml").write_text(xml.read_text().replace(f"{old}.", f"{new}."))
    xml.unlink()
    split = _split_of(root)
    split.write_text(split.read_text().replace(f"{old}\n", f"{new}\n"))
    return {new: old}


def _set_filename(root: Path, image_id: str, filename: str) -> None:
    xml = _xml_of(root, image_id)
    text = re.sub(
        r"<filename>[^<]*</filename>", f"<filename>{filename}</filename>", xml.read_text()
    )
    xml.write_text(text)


def _filename_elsewhere(root: Path, ids: list[str]) -> None:
    shutil.copy2(_image_of(root, ids[1]), root / "JPEGImages" / "elsewhere.jpg")
    _set_filename(root, ids[0], "elsewhere.jpg")


def _filename_of_listed_id(root: Path, ids: list[str]) -> None:
    _set_filename(root, ids[0], _image_of(root, ids[1]).name)


def _nan_coordinate(root: Path, ids: list[str]) -> None:
    xml = _xml_of(root, ids[0])
    xml.write_text(re.sub(r"<xmin>\d+</xmin>", "<xmin>nan</xmin>", xml.read_text(), count=1))


def _utf16_split(root: Path, ids: list[str]) -> None:
    _split_of(root).write_bytes("".join(f"{i}\r\n" for i in ids).encode("utf-16"))


def _id_with_space(root: Path, ids: list[str]) -> None:
    with _split_of(root).open("a") as split:
        split.write("my photo\n")


def _id_too_long(root: Path, ids: list[str]) -> None:
    with _split_of(root).open("a") as split:
        split.write("y" * 300 + "\n")


def _bomb(root: Path, ids: list[str]) -> None:
    """The image replaced by a PNG header claiming BOMB_SIZE (a few bytes on disk)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    image = _image_of(root, ids[0])
    header = struct.pack(">IIBBBBB", *BOMB_SIZE, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")
    image.with_suffix(".png").write_bytes(png)
    image.unlink()


# --- main --------------------------------------------------------------------------------------


SECTIONS = ("kill -9", "corruption", "SIGINT", "disk full", "wild inputs", "stale data")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="The CI slice (minutes).")
    parser.add_argument("--kills-per-stage", type=int, default=None,
                        help="kill -9 points per stage (default 8, 2 with --quick).")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="Seeds kill times and corruptions.")
    parser.add_argument("--work", type=Path, default=None, help="Work folder (default: temp).")
    parser.add_argument("--out", type=Path, default=None, help="Also write the table here.")
    parser.add_argument("--only", action="append", choices=SECTIONS, default=None,
                        help="Run only this section (repeatable); the reference run is always "
                        "built.")  # fmt: skip
    return parser.parse_args(argv)


def run_suite(args: argparse.Namespace, work: Path) -> list[Group]:
    kills = args.kills_per_stage or (2 if args.quick else 8)
    suite = Suite(work, args.quick, args.seed)
    suite.build_reference()
    sections: list[tuple[str, Callable[[], Group]]] = [
        ("kill -9", lambda: suite.kill_points(kills)),
        ("corruption", suite.corruption),
        ("SIGINT", suite.sigint),
        ("disk full", suite.disk_full),
        ("wild inputs", suite.wild_inputs),
        ("stale data", suite.stale_matrix),  # last: rewrites the dataset
    ]
    groups = []
    for name, section in sections:
        if args.only and name not in args.only:
            continue
        log(f"== {name}")
        try:
            groups.append(section())
        except Exception as exc:  # a broken section is a failed row, the others still run
            broken = Group(f"{name}: section crashed")
            broken.record(False, "crashed", f"{type(exc).__name__}: {exc}")
            groups.append(broken)
    return groups


def _minutes(seconds: float) -> str:
    return f"{int(seconds) // 60} min {int(seconds) % 60} s"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # children must see SIGINT
    started = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="fault_suite_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        groups = run_suite(args, work)
    except SuiteError as exc:
        log(f"error: {exc}")
        return 1
    finally:
        Proc.kill_all()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    command = " ".join(["python scripts/fault_suite.py", *(argv or sys.argv[1:])])
    header = (
        f"Fault suite ({'quick' if args.quick else 'full'}, seed {args.seed}): "
        f"{_minutes(time.perf_counter() - started)} wall, "
        f"{_minutes(children.ru_utime + children.ru_stime)} CPU, `{command}`"
    )
    table = markdown(groups, header)
    print(table, end="")
    if args.out:
        args.out.write_text(table)
    return 0 if all(g.passed == g.total and g.total for g in groups) else 1


if __name__ == "__main__":
    sys.exit(main())
