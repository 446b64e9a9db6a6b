"""No input makes the front end crash, hang or report an unlocated error.

Property (b) of the language issue: arbitrary text, arbitrary bytes and mutations of the shipped
policies either check cleanly or produce errors that each carry a line and a column. The CI
profile runs 1,000 examples per property (HYPOTHESIS_PROFILE=ci).
"""

from __future__ import annotations

import re
import sys
import time

import pytest
from hypothesis import given, strategies as st

from conftest import POLICIES, ROOT, SHIPPED, run_cli
from kvpolicy.diagnostics import PolicyError, Source
from kvpolicy.lang.fmt import format_policy
from kvpolicy.lang.lower import check_source
from kvpolicy.lang.parser import parse_source
from kvpolicy.lang.source import decode_source

sys.path.insert(0, str(ROOT / "bench"))
from hostile_files import HOSTILE  # noqa: E402

TEXTS = [p.read_text(encoding="utf-8") for p in SHIPPED]
TOKEN = re.compile(r"\s+|#[^\n]*|\"[^\"\n]*\"|[A-Za-z_][\w\-]*|-?\d+(?:\.\d+)?(?:e\d+)?|.", re.S)
VOCABULARY = ["policy", "keep", "sinks", "window", "retain", "layer", "last", "layers", "{", "}",
              "keys", "values", "int2", "int3", "fp16", "group", "per", "channel", "token",
              "guard", "of", "retained", "at", "by", "score", "snapkv", "(", ")", "=", ",", ";",
              "..", "%", "\n", "extends", '"aggressive.kvp"', "none", "1e999", "nan", "-1", "0",
              "18%", "adapt", "temperature", "cluster", "evicted", "k", "interpolate", "model"]


def assert_located(text: str) -> None:
    result = check_source(Source("fuzz.kvp", text), POLICIES)
    lines = text.count("\n") + 1
    for diagnostic in result.diagnostics:
        assert diagnostic.span is not None, diagnostic
        if diagnostic.span.path == "fuzz.kvp":
            assert 1 <= diagnostic.span.line <= lines + 1, diagnostic
        assert diagnostic.span.column >= 1, diagnostic
        diagnostic.render()
    if result.policy is not None:  # what checks cleanly also formats and round-trips
        formatted = format_policy(parse_source(Source("fuzz.kvp", text)).tree)
        again = check_source(Source("fuzz.kvp", formatted), POLICIES)
        assert again.policy == result.policy


@given(st.text(max_size=400))
def test_arbitrary_text(text):
    assert_located(text)


@given(st.lists(st.sampled_from(VOCABULARY), max_size=40).map(" ".join))
def test_arbitrary_token_soup(text):
    assert_located(text)


@given(st.binary(max_size=300))
def test_arbitrary_bytes(data):
    try:
        source = decode_source("fuzz.kvp", data)
    except PolicyError as exc:
        (error,) = exc.errors
        assert error.span is not None and error.span.line >= 1 and error.span.column >= 1
        return
    assert_located(source.text)


@st.composite
def mutated_policies(draw):
    tokens = TOKEN.findall(draw(st.sampled_from(TEXTS)))
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(tokens) - 1))
        operation = draw(st.sampled_from(["delete", "duplicate", "swap", "replace", "bytes"]))
        if operation == "delete":
            del tokens[i]
        elif operation == "duplicate":
            tokens.insert(i, tokens[i])
        elif operation == "swap":
            j = draw(st.integers(0, len(tokens) - 1))
            tokens[i], tokens[j] = tokens[j], tokens[i]
        elif operation == "replace":
            tokens[i] = draw(st.sampled_from(VOCABULARY))
        else:
            tokens.insert(i, draw(st.binary(min_size=1, max_size=6)).decode("latin-1"))
        if not tokens:
            tokens = [""]
    return "".join(tokens)


@given(mutated_policies())
def test_mutated_shipped_policies(text):
    assert_located(text)


# ---- hostile files through the command line --------------------------------------------------
# (the files themselves live in bench/hostile_files.py, which bench/frontend.py times)

VALID = {"just_under_limit.kvp"}  # big but well-formed: must check clean, and fast


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_file_gives_located_errors_quickly(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(HOSTILE[name])
    started = time.perf_counter()
    result = run_cli("check", str(path))
    elapsed = time.perf_counter() - started
    assert "Traceback" not in result.stderr
    if name in VALID:
        assert result.returncode == 0, result.stderr
        return
    assert result.returncode == 1, result.stderr
    first_error = next(line for line in result.stderr.splitlines() if ": error: " in line)
    assert re.match(rf"{re.escape(str(path))}:\d+:\d+: error: ", first_error), first_error
    # A generous bound that only a hang or a quadratic blow-up exceeds; bench/frontend.py
    # records the real times (each well under a second).
    assert elapsed < 10, elapsed
