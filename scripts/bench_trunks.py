"""The trunks side by side on a VOC-layout set: mAP, wall time per stage and peak memory.

Each cell is one `spp-detect run` with a list of `--set` overrides on a bundled config (the
raccoon one unless the cell names another, or none for the code defaults), run once per seed
(`finetune.seed` and `svm.seed`). Cells that differ only in their test settings (scorer,
regressor) reuse a finished run's folders (hard links) and rerun only test and eval; seeds of a
cell share its proposals and conv5 cache the same way, so their stage times read "done before"
there. Peak memory is the largest of the stages' peaks (the run's timings.json) and of its
processes' resident sets (``os.wait4``: the proposal workers).

    python scripts/bench_trunks.py --root ../shared/datasets/raccoon --out runs/bench_trunks \\
        --cells ci_zf5_random,ci_lite0_s16,ci_lite0_s32 --seeds 6 7

The table goes to stdout and, with every figure, to OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean
from typing import NamedTuple

# -c raccoon is the CI setting of tests/test_pipeline.py: 1 small scale, a short schedule.
CI: list[str] = []
# Five scales at the CI setting: the paper's 480…1200 times 400/688, as the README's raccoon
# table has always had them (the paper's own sizes would be 3× the conv time of these photos).
FIVE = ["extract.scales=[280,335,400,500,700]"]
ZF5_RANDOM = ["extract.backbone=zf5", "extract.weights=none"]
LITE0 = ["extract.backbone=efficientnet_lite0", "extract.weights=imagenet"]
STRIDE32 = ["extract.last_stage=stage7"]
# End to end from stage 4 (Fast R-CNN trains conv3_1 on of VGG16: the later two thirds) with
# the conv layers at Fast R-CNN's rate, 0.001: 0.1 × the CI head's 0.01
CONV = ["finetune.conv_from=stage4", "finetune.conv_lr_mult=0.1"]
CONV_X1 = ["finetune.conv_from=stage4", "finetune.conv_lr_mult=1.0"]  # at the head's rate
LONG = ["finetune.iterations=1200", "finetune.lr_steps=[800]"]  # 4× the CI schedule
SLOW_LR = ["finetune.lr=0.003", "finetune.iterations=600", "finetune.lr_steps=[400]"]
HEAD_BOXES = ["finetune.bbox_loss_weight=1.0"]
HEAD_REG = ["test.regressor=head"]  # the head's box branch instead of the ridge regressors
SOFTMAX = ["test.scorer=softmax"]  # the head's classifier instead of the SVMs


class Cell(NamedTuple):
    """One benchmark setting: ``spp-detect run -c CONFIG --set ...`` (no -c: the code defaults),
    and the cell whose finished run it reuses for all but test and eval ("" for none)."""

    overrides: list[str]
    reuse: str = ""
    config: str | None = "raccoon"


# What a config naming only data.root and data.classes gets (no -c): the code defaults
OWN = ["data.classes=[raccoon]"]

CELLS: dict[str, Cell] = {
    "ci_zf5_random": Cell([*CI, *ZF5_RANDOM]),
    "ci_lite0_s16": Cell([*CI, *LITE0]),
    "ci_lite0_s32": Cell([*CI, *LITE0, *STRIDE32]),
    "ci_lite0_s16_conv": Cell([*CI, *LITE0, *CONV]),
    "ci_lite0_s16_conv_x1": Cell([*CI, *LITE0, *CONV_X1]),
    "ci_lite0_s16_conv_long": Cell([*CI, *LITE0, *CONV, *LONG]),
    "ci_lite0_s16_long": Cell([*CI, *LITE0, *LONG]),  # head-only with the same schedule
    "ci_lite0_s16_paper_lr": Cell([*CI, *LITE0, *LONG, "finetune.lr=0.001"]),  # the paper's rate
    # -c raccoon_conv is ci_lite0_s16_conv; this was it before: the conv layers at 0.003,
    # twice the CI schedule, the head's box branch
    "conv_003_box": Cell([*CI, *LITE0, *CONV_X1, *HEAD_BOXES, *HEAD_REG, *SLOW_LR]),
    "ci_lite0_s16_box": Cell([*CI, *LITE0, *HEAD_BOXES]),
    "ci_lite0_s16_box_head": Cell([*CI, *LITE0, *HEAD_BOXES, *HEAD_REG], "ci_lite0_s16_box"),
    "ci_lite0_s16_box_softmax": Cell([*CI, *LITE0, *HEAD_BOXES, *SOFTMAX], "ci_lite0_s16_box"),
    "ci_lite0_s16_box_softmax_head": Cell(
        [*CI, *LITE0, *HEAD_BOXES, *SOFTMAX, *HEAD_REG], "ci_lite0_s16_box"
    ),
    "5s_zf5_random": Cell([*FIVE, *ZF5_RANDOM]),
    "5s_lite0_s16": Cell([*FIVE, *LITE0]),
    "5s_lite0_s32": Cell([*FIVE, *LITE0, *STRIDE32]),
    "5s_lite0_s16_conv": Cell([*FIVE, *LITE0, *CONV]),
    "5s_lite0_s16_box": Cell([*FIVE, *LITE0, *HEAD_BOXES]),
    "5s_lite0_s16_box_head": Cell([*FIVE, *LITE0, *HEAD_BOXES, *HEAD_REG], "5s_lite0_s16_box"),
    "5s_lite0_s16_box_softmax": Cell([*FIVE, *LITE0, *HEAD_BOXES, *SOFTMAX], "5s_lite0_s16_box"),
    "5s_lite0_s16_box_softmax_head": Cell(
        [*FIVE, *LITE0, *HEAD_BOXES, *SOFTMAX, *HEAD_REG], "5s_lite0_s16_box"
    ),
    "own_defaults": Cell(OWN, config=None),
    "own_1scale_688": Cell([*OWN, "extract.scales=[688]"], config=None),
}
SHARED_STAGES = ("proposals", "features")  # what seeds of one cell share (no seed in them)
TIME_ROW = re.compile(r"^(\S+)\s+(\S+)\s+(ran|done before)\s+([\d.]+)$")


def link_tree(source: Path, target: Path, folders: tuple[str, ...] | None = None) -> None:
    """Hard-link ``source``'s files (or only ``folders`` of it) into ``target``."""
    for folder in folders or [p.name for p in source.iterdir()]:
        path = source / folder
        if path.is_dir():
            shutil.copytree(path, target / folder, copy_function=os.link, dirs_exist_ok=True)
        elif path.is_file():
            target.mkdir(parents=True, exist_ok=True)
            os.link(path, target / folder)


def run_cell(
    root: Path, run_dir: Path, config: str | None, overrides: list[str], threads: int
) -> dict:
    """One `spp-detect run`; its mAP, stage times (s), wall time (s) and peak RSS (MiB)."""
    command = [sys.executable, "-m", "spp_detect", "run", *(["-c", config] if config else [])]
    command += ["--run-dir", str(run_dir), "--workers", str(threads), "--device", "cpu"]
    for item in [f"data.root={root}", *overrides]:
        command += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = (run_dir.parent / f"{run_dir.name}.log").open("w")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{run_dir}: spp-detect run failed; see {log.name}\n{output}")
    stages = {}
    for line in output.splitlines():
        match = TIME_ROW.match(line.strip())
        if match and match.group(3) == "ran":
            key = f"{match.group(1)} ({match.group(2)})"
            stages[key] = stages.get(key, 0.0) + float(match.group(4))
    report = json.loads((run_dir / "eval" / "test.json").read_text())
    peaks = stage_peaks(run_dir, stages)
    return {"mAP": report["mAP"], "stages": stages, "wall_s": wall, "stage_peak_mib": peaks,
            "peak_rss_mib": max([usage.ru_maxrss / 1024, *peaks.values()]),
            "trunk": report.get("trunk")}  # fmt: skip


def stage_peaks(run_dir: Path, stages: dict[str, float]) -> dict[str, float]:
    """Peak resident memory (MiB) of each stage that ran, from the run's timings.json. The
    process's own ru_maxrss misses them: the package resets the peak at each stage
    (/proc/self/clear_refs), so it holds the last stage's, or a proposal worker's."""
    timings = json.loads((run_dir / "timings.json").read_text())
    peaks = {}
    for key in stages:
        stage, split = key.removesuffix(")").split(" (")
        peaks[key] = timings[f"{stage}/{split}"]["peak_rss_mib"]
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_trunks"))
    parser.add_argument("--cells", default=",".join(CELLS), help="comma-separated cell names")
    parser.add_argument("--seeds", type=int, nargs="+", default=[6, 7])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for cell in args.cells.split(","):
        overrides, reuse, config = CELLS[cell]
        for index, seed in enumerate(args.seeds):
            key = f"{cell}/seed{seed}"
            if key in results:
                continue
            run_dir = args.out / cell / f"seed{seed}"
            shutil.rmtree(run_dir, ignore_errors=True)
            if reuse:
                link_tree(args.out / reuse / f"seed{seed}", run_dir)
                shutil.rmtree(run_dir / "detections", ignore_errors=True)
                shutil.rmtree(run_dir / "eval", ignore_errors=True)
            elif index:
                link_tree(args.out / cell / f"seed{args.seeds[0]}", run_dir, SHARED_STAGES)
            seeded = [*overrides, f"finetune.seed={seed}", f"svm.seed={seed}"]
            results[key] = run_cell(args.root.resolve(), run_dir, config, seeded, args.threads)
            results_path.write_text(json.dumps(results, indent=1))
            print(f"{key}: mAP {100 * results[key]['mAP']:.2f}", flush=True)
    print_table(results)


def print_table(results: dict) -> None:
    cells: dict[str, list[dict]] = {}
    for key, value in results.items():
        cells.setdefault(key.split("/")[0], []).append(value)
    print(
        "| cell | mAP per seed | mean | wall s (first seed) | peak RSS MiB | stage s (first seed) |"
    )
    print("| --- | --- | --: | --: | --: | --- |")
    for cell, runs in cells.items():
        maps = " / ".join(f"{100 * r['mAP']:.1f}" for r in runs)
        stages = ", ".join(f"{k} {v:.0f}" for k, v in runs[0]["stages"].items())
        peak = max(r["peak_rss_mib"] for r in runs)
        print(
            f"| {cell} | {maps} | {100 * mean(r['mAP'] for r in runs):.1f} | "
            f"{runs[0]['wall_s']:.0f} | {peak:.0f} | {stages} |"
        )


if __name__ == "__main__":
    main()
