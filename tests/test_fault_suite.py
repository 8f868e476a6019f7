"""The CI slice of the fault-injection suite (scripts/fault_suite.py --quick): kill -9 in every
stage, one corruption of each artefact kind, the stale-data matrix, disk full, SIGINT and the
inputs from the wild, all through the CLI on a small toy set. Slow (minutes: some 100 CLI
processes), so marked ``slow``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fault_suite.py"
ROWS = (
    "kill -9 points survived, identical results",
    "corruption: one line and exit 2, or recomputed",
    "SIGINT: exit 130, nothing half-written, resumes",
    "disk full (",
    "stale-data matrix: recomputed or refused, never silent",
    "wild inputs: read, warned or refused in one line; never silent, no traceback",
)
TIMEOUT = 3600  # s: some 70 CLI start-ups; far more than an idle 2-core machine needs


def test_quick_fault_suite_passes(tmp_path):
    table_path = tmp_path / "table.md"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--work", str(tmp_path / "work"),
         "--out", str(table_path)],
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert table_path.is_file(), done.stderr[-4000:]
    table = table_path.read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    for title in ROWS:
        assert any(row.startswith(f"| {title}") for row in rows), (title, table)
    assert "Failures: none" in table, table  # the table lists every failed check
    for row in rows[1:]:  # every group: passed == total, and at least one check
        passed, total = row.split("|")[2].strip().split("/")
        assert passed == total != "0", row
    assert done.returncode == 0, table + done.stderr[-4000:]
