"""Golden tests: the exact text of `kvpolicy check` for files with mistakes.

Each tests/golden/NAME.kvp has NAME.err: the expected stderr, then `exit: N`. After a deliberate
change of wording, regenerate with `UPDATE_GOLDEN=1 pytest tests/test_golden_errors.py` and
review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import run_cli

GOLDEN = Path(__file__).resolve().parent / "golden"
CASES = sorted(p.name for p in GOLDEN.glob("*.kvp"))


@pytest.mark.parametrize("name", CASES)
def test_check_output_is_golden(name):
    result = run_cli("check", name, cwd=GOLDEN)
    actual = result.stderr + f"exit: {result.returncode}\n"
    expected_path = GOLDEN / (name[:-4] + ".err")
    if os.environ.get("UPDATE_GOLDEN"):
        expected_path.write_text(actual, encoding="utf-8")
    assert actual == expected_path.read_text(encoding="utf-8")
    assert "Traceback" not in actual


def test_three_mistakes_are_all_reported_with_locations():
    result = run_cli("check", "three_mistakes.kvp", cwd=GOLDEN)
    errors = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert [line.split(": error: ")[0] for line in errors] == [
        "three_mistakes.kvp:4:5", "three_mistakes.kvp:5:10", "three_mistakes.kvp:6:11"]
    assert result.returncode == 1
