"""docs/bad-inputs.md: every catalogued bad input names a test that exists (issue 18)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "bad-inputs.md"
TEST_REF = re.compile(r"(tests/[\w/]+\.py)::(\w+)")  # a "[param id]" after the name is ignored
ENTRY = re.compile(r"^(\d+)\. (.*?)(?=^\d+\. |^#|\Z)", re.MULTILINE | re.DOTALL)


def test_every_named_test_exists():
    refs = set(TEST_REF.findall(DOC.read_text()))
    assert refs
    missing = [
        f"{path}::{name}"
        for path, name in sorted(refs)
        if not (ROOT / path).is_file() or f"def {name}(" not in (ROOT / path).read_text()
    ]
    assert not missing, f"docs/bad-inputs.md names tests that do not exist: {missing}"


def test_at_least_50_numbered_entries_each_with_a_test():
    entries = ENTRY.findall(DOC.read_text())
    numbers = [int(number) for number, _ in entries]
    assert numbers == list(range(1, len(numbers) + 1)), "entries are numbered 1, 2, 3, ..."
    assert len(numbers) >= 50
    untested = [number for number, text in entries if not TEST_REF.search(text)]
    assert not untested, f"entries without a test: {untested}"
