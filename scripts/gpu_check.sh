#!/usr/bin/env bash
# The GPU check (issue 13) in one command, from the source tree, nothing installed:
#   scripts/gpu_check.sh               # on a machine with CUDA; OUT=DIR also keeps gpu_check.md
#   scripts/gpu_check.sh --dry-run     # the same steps on the CPU at tiny sizes (also without CUDA)
# Prints the environment, runs `pytest -m cuda` and the benchmarks (each under a time limit) and
# ends with one markdown table; scripts/gpu_check.py holds the steps and their sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
