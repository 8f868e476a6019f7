"""Benchmark stages under torchrun: 1 process against 2 ranks, side by side in one run.

Each measurement runs the real command in a fresh run directory, as a user would:
``python -m spp_detect <stage> ...`` (with the default threads, and with OMP_NUM_THREADS=1 as
torchrun sets it in each rank) against ``python -m torch.distributed.run --nproc-per-node 2 -m
spp_detect <stage> ...``, the modes taking turns ``--repeats`` times. It reports the wall time
of the whole command (interpreter start, imports, rendezvous included) and the stage's own time
(its summary line), and prints a markdown table. Example (docs/benchmarks-history.md):

    python scripts/bench_torchrun.py --root ../shared/datasets/raccoon --limit 40
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The raccoon CI setting (README, "Results"): proposals on images shrunk to 400 px, 1 scale.
SETTINGS = ["--set", "propose.max_side=400", "--set", "extract.scales=[400]", "--device", "cpu"]
STAGE_SECONDS = re.compile(r"in ([0-9.]+) s")  # "propose: 40 items in 51.2 s, ..."


def command(stage: str, ranks: int, run_dir: Path, args: argparse.Namespace) -> list[str]:
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc-per-node", str(ranks)]
    return [
        *launcher, "-m", "spp_detect", stage, "-c", "raccoon", "--run-dir", str(run_dir),
        "--set", f"data.root={args.root}", "--split", args.split, "--limit", str(args.limit),
        *SETTINGS,
    ]  # fmt: skip


# (label, ranks, OMP_NUM_THREADS or None for the default) of each mode measured
MODES = [("1 process", 1, None), ("1 process, 1 thread", 1, "1"), ("2 ranks", 2, None)]


def measure(stage: str, mode: tuple[str, int, str | None], args: argparse.Namespace) -> dict:
    """One fresh run of ``stage`` in ``mode``: wall and stage seconds, load before."""
    label, ranks, threads = mode
    env = {**os.environ, **({"OMP_NUM_THREADS": threads} if threads else {})}
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_torchrun_") as tmp:
        started = time.perf_counter()
        result = subprocess.run(
            command(stage, ranks, Path(tmp), args), env=env, capture_output=True, text=True
        )
        wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"{stage}, {label} failed:\n{result.stderr[-2000:]}")
    summary = [line for line in result.stdout.splitlines() if line.startswith(stage)][-1]
    stage_seconds = float(STAGE_SECONDS.search(summary).group(1))
    return {"stage": stage, "mode": label, "wall": wall, "seconds": stage_seconds, "load": load}


def table(rows: list[dict]) -> str:
    """One line per stage and repeat: each mode's wall s (stage s), and the 2-rank speed-ups."""
    labels = [label for label, _, _ in MODES]
    lines = [
        "| stage | run | " + " | ".join(f"{label}: wall s (stage s)" for label in labels)
        + " | 2 ranks' speed-up over 1 process, wall (stage) | over 1 thread | load avg |",
        "| --- | --: |" + " --: |" * (len(labels) + 3),
    ]  # fmt: skip
    runs: dict[tuple[str, int], dict[str, dict]] = {}
    for row in rows:
        runs.setdefault((row["stage"], row["repeat"]), {})[row["mode"]] = row
    for (stage, repeat), by_mode in runs.items():
        cells = [f"{by_mode[m]['wall']:.1f} ({by_mode[m]['seconds']:.1f})" for m in labels]
        two, one, single = by_mode["2 ranks"], by_mode["1 process"], by_mode[labels[1]]
        loads = "–".join(f"{by_mode[m]['load']:.1f}" for m in labels)
        lines.append(
            f"| {stage} | {repeat + 1} | " + " | ".join(cells)
            + f" | **{one['wall'] / two['wall']:.2f}×** ({one['seconds'] / two['seconds']:.2f}×)"
            + f" | {single['wall'] / two['wall']:.2f}× ({single['seconds'] / two['seconds']:.2f}×)"
            + f" | {loads} |"
        )  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("../shared/datasets/raccoon"))
    parser.add_argument("--split", default="trainval")
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--stages", default="propose,extract")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    args.root = args.root.resolve()
    rows = []
    for stage in args.stages.split(","):
        for repeat in range(args.repeats):
            # the modes take turns, reversed every other repeat, so that a change of the
            # machine's load hits them all
            for mode in MODES if repeat % 2 == 0 else MODES[::-1]:
                row = measure(stage, mode, args)
                row["repeat"] = repeat
                rows.append(row)
                print(row, file=sys.stderr, flush=True)
    print(f"{os.cpu_count()} cores, {args.limit} images of {args.root.name} {args.split}")
    print(table(rows))


if __name__ == "__main__":
    main()
