"""Documentation that cannot drift: the README's table and commands, the language reference."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import ROOT
from kvpolicy.lang import ast


def test_readme_seed_table_is_what_the_tool_computes():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- seed-table:start -->\n(.*?)\n<!-- seed-table:end -->", readme, re.S)
    generated = subprocess.run([sys.executable, str(ROOT / "examples" / "seed_table.py")],
                               capture_output=True, text=True, check=True, cwd=ROOT)
    assert block.group(1) == generated.stdout.strip()


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    test_command = next(line for line in readme.splitlines()
                        if line.startswith("./scripts/install") and "pytest" in line)
    assert test_command in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_every_statement_has_one_name_from_grammar_to_docs():
    grammar = (ROOT / "grammar" / "kvp.lark").read_text(encoding="utf-8")
    language = (ROOT / "docs" / "language.md").read_text(encoding="utf-8")
    rules = set(re.findall(r"^([a-z]\w*_stmt):", grammar, re.M))
    classes = {cls.__name__ for cls in ast.STATEMENT_NAMES}
    assert {"".join(p.title() for p in rule.split("_")) for rule in rules} == classes
    for rule in rules:
        assert f"`{rule}`" in language, f"docs/language.md does not document {rule}"
